"""One loaded run as the server answers with it: a batch of queries -> answers, each with its provenance.

A batch is one ``route`` (encoder, router, neurons for the familiar rows) and one greedy generation;
rows may be routed differently, use different templates and ask for different lengths. In plain mode
the router is bypassed and no row gets a neuron, so the same code path runs the untouched LM: the
baseline ``bench/serve.py`` measures MeG against.

Not thread-safe (the neuron's weights are state on the LM): the server calls ``answer`` from one thread.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from megedit.edited_model import EditedLM, Routing
from megedit.serve.validation import Query


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str  # "stop": the model ended its answer (EOS); "length": max_tokens cut it
    prompt_tokens: int
    completion_tokens: int
    provenance: dict  # routed, entropy, threshold, nearest_edit (see docs/serving.md)
    model: str  # the name of the engine that answered (after a reload, in-flight requests end on the old one)
    batch_size: int  # prompts in the model call this one was part of


def unrouted(n: int, neuron_dim: int) -> Routing:
    """A routing that attaches no neuron to any of n rows, without running the encoder or the router."""
    return Routing(embeddings=torch.zeros(n, 0), entropy=torch.full((n,), float("nan")),
                   familiar=torch.zeros(n, dtype=torch.bool), weights=torch.zeros(n, neuron_dim))


def _number(value: float) -> float | None:
    return None if math.isnan(value) else round(value, 4)  # NaN (router bypassed) is not JSON


class Engine:
    def __init__(self, lm: EditedLM, run: str | Path, plain: bool = False):
        self.lm, self.run, self.plain = lm, str(run), plain
        self.loaded_at = time.time()

    @classmethod
    def load(cls, run: str | Path, plain: bool = False, **lm_options) -> "Engine":
        """Load a run folder (``EditedLM.load`` with ``lm_options``) and warm it up, ready to swap in."""
        engine = cls(EditedLM.load(run, **lm_options), run, plain)
        engine.warm_up()
        return engine

    @property
    def mode(self) -> str:
        return "plain" if self.plain else "meg"

    @property
    def name(self) -> str:
        """The model name responses carry: the run folder's name, suffixed in plain mode."""
        return Path(self.run).name + ("-plain" if self.plain else "")

    @property
    def threshold(self) -> float | None:
        return None if self.plain else float(self.lm.router.threshold)

    @property
    def router(self) -> str | None:
        """Which score ``entropy`` holds: ``entropy`` (the familiarity net's, nats) or ``nearest`` (1 - cosine)."""
        return None if self.plain else self.lm.router.kind

    def answer(self, queries: Sequence[Query]) -> list[Answer]:
        texts = [q.text for q in queries]
        kinds = [q.kind for q in queries]
        limits = [q.max_tokens for q in queries]
        routing = unrouted(len(texts), self.lm.spec.neuron_dim) if self.plain else self.lm.route(texts)
        ids = self.lm.generate_ids(texts, kinds, limits, routing=routing)
        prompt_ids = self.lm.tokenizer(self.lm.lm_prompts(texts, kinds))["input_ids"]
        return [Answer(text=self.lm.tokenizer.decode(toks, skip_special_tokens=True).strip(),
                       finish_reason="length" if len(toks) >= limit else "stop",
                       prompt_tokens=len(prompt), completion_tokens=len(toks), provenance=prov,
                       model=self.name, batch_size=len(queries))
                for toks, limit, prompt, prov in zip(ids, limits, prompt_ids, self._provenance(routing))]

    def _provenance(self, routing: Routing) -> list[dict]:
        n = len(routing.familiar)
        if self.plain:
            return [{"routed": False, "router": None, "entropy": None, "threshold": None, "nearest_edit": None}
                    for _ in range(n)]
        nearest = self.lm.nearest_edits(routing.embeddings)
        return [{"routed": bool(familiar), "router": self.router, "entropy": _number(entropy),
                 "threshold": self.threshold, "nearest_edit": edit}
                for familiar, entropy, edit in zip(routing.familiar.tolist(), routing.entropy.tolist(), nearest)]

    def warm_up(self) -> None:
        """One tiny batch before serving: embeds the edit prompts for nearest_edits, first-call allocations."""
        self.answer([Query("warm-up", "question", 1)])

    @property
    def n_edits(self) -> int:
        return len(self.lm.prepared.edits)

    def edits(self, offset: int, limit: int) -> list[dict]:
        """The run's edits [offset, offset + limit), as GET /v1/edits lists them."""
        return [{"index": i, "id": e.id, "subject": e.subject, "prompt": e.prompt, "prompt_kind": e.prompt_kind,
                 "target_new": e.target_new}
                for i, e in enumerate(self.lm.prepared.edits[offset:offset + limit], start=offset)]

    def describe(self) -> dict:
        return {"run": self.run, "model": self.name, "mode": self.mode, "edits": self.n_edits,
                "router": self.router, "threshold": self.threshold, "loaded_at": round(self.loaded_at, 3)}
