"""The edited model: a frozen LM that answers the MeG way.

Per query: encoder embedding -> familiarity entropy -> if familiar, DDIM-generated neuron
weights (batched); if not, no neuron at all, so the LM is exactly the unedited one ->
the LM's forward pass or greedy generation with that row's neuron attached throughout.
Rows of one batch may be routed differently.

A run with versions (``megedit edits add | remove``, ``megedit.edits.versions``) loads its latest complete
version unless told another. Edits a version removed are never routed to: a familiar query whose most
similar edit prompt is a removed edit runs on the unedited LM, and removed edits are left out of
``nearest_edits`` (``megedit.edits.removed``).

    lm = EditedLM.load("runs/smollm2-counterfact-1024")
    lm.generate(["The mother tongue of Danielle Darrieux is"])
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch

from megedit.artifacts import ArtifactError, check_lineage, check_upstream, read_manifest
from megedit.components.neuron import DynamicNeuron, scale_value
from megedit.components.text_encoder import TextEncoder
from megedit.defaults import DEFAULT_STEPS
from megedit.graph import SERVED
from megedit.loading import load_lm
from megedit.prepare.artifact import Prepared, load_prepared
from megedit.scoring import greedy_generate, teacher_forced, greedy_match



@dataclass
class Routing:
    """What the router decided for a batch of queries, and the neuron weights that follow."""

    embeddings: torch.Tensor  # [B, H]
    entropy: torch.Tensor  # [B] (nan when the router is bypassed)
    familiar: torch.Tensor  # [B] bool
    weights: torch.Tensor  # [B, D]; zero rows for unfamiliar queries
    # [B] bool: familiar to the router, but the nearest edit is removed, so not routed (``route`` sets it;
    # None in a routing built without the router, e.g. the server's plain mode)
    removed: torch.Tensor | None = None
    timings: dict = field(default_factory=dict)  # seconds per component


class EditedLM:
    def __init__(self, prepared: Prepared, lm, tokenizer, encoder: TextEncoder, router, generator,
                 use_router: bool = True, steps: int = DEFAULT_STEPS, sampler: str = "ddim", seed: int = 0,
                 sample_batch_size: int = 64, noise_scale: float | None = None, value_scale: float | None = None,
                 removed: Iterable[str] = ()):
        self.prepared, self.spec = prepared, prepared.spec
        self.lm, self.tokenizer, self.encoder, self.router, self.generator = lm, tokenizer, encoder, router, generator
        self.neuron = DynamicNeuron(lm, self.spec)
        self.use_router, self.steps, self.sampler, self.seed = use_router, steps, sampler, seed
        self.sample_batch_size = sample_batch_size
        self.noise_scale = noise_scale  # None: the generator's own default (generator.json)
        self.value_scale = generator.value_scale if value_scale is None else float(value_scale)  # likewise
        self._edit_embeddings: torch.Tensor | None = None
        self.folder: Path | None = None  # set by ``load``: the run or version folder, and its version number
        self.version: int | None = None
        ids = [e.id for e in prepared.edits]
        unknown = sorted(set(removed) - set(ids))
        if unknown:
            raise ArtifactError(f"removed edits {unknown[:5]} are not edits of {prepared.dir}")
        self.removed_ids = frozenset(removed)
        self._removed_mask = torch.tensor([i in self.removed_ids for i in ids], dtype=torch.bool)

    # ------------------------------------------------------------------ loading
    @classmethod
    def load(cls, run_dir: str | Path, device: str = "cpu", version: int | None = None, **options) -> "EditedLM":
        """Load a run (``prepare/ encoder/ familiarity/ diffusion/``), refusing mixed runs: its latest complete
        version, or ``version`` (0: the run as the pipeline made it); a version folder loads as itself."""
        from megedit.diffusion.artifact import load_generator
        from megedit.edits.removed import read_removed
        from megedit.edits.versions import resolve_version
        from megedit.encoder.artifact import load_encoder
        from megedit.familiarity.artifact import load_router

        run, number = resolve_version(run_dir, version)
        dirs = {name: run / name for name in SERVED}
        manifests = {name: read_manifest(d, stage=name) for name, d in dirs.items()}
        check_lineage(manifests)
        check_upstream(manifests["diffusion"], "encoder", dirs["encoder"], where=f"generator {dirs['diffusion']}")
        for name in ("familiarity", "diffusion"):  # both learnt this folder's edits, not another version's
            check_upstream(manifests[name], "prepare", dirs["prepare"], where=f"{name} artifact {dirs[name]}")
        prepared = load_prepared(dirs["prepare"])
        lm, tokenizer = load_lm(prepared.spec)
        lm.to(device)
        encoder = load_encoder(dirs["encoder"], check=False).to(device).eval()  # manifest read above
        router = load_router(dirs["familiarity"], encoder_dir=dirs["encoder"], device=device)
        generator = load_generator(dirs["diffusion"], device=device)
        if generator.input_dim != prepared.spec.neuron_dim:
            raise ArtifactError(f"{dirs['diffusion']}: generator makes {generator.input_dim}-dim neurons, "
                                f"model {prepared.spec.name} needs {prepared.spec.neuron_dim}")
        edited = cls(prepared, lm, tokenizer, encoder, router, generator,
                     removed=[r.id for r in read_removed(run)], **options)
        edited.folder, edited.version = run, number
        return edited

    # ------------------------------------------------------------------ routing
    @torch.no_grad()
    def route(self, queries: Sequence[str]) -> Routing:
        """Embed raw queries, decide familiarity, and generate neurons for the familiar ones only."""
        t0 = time.perf_counter()
        emb = self.encoder.embed(list(queries))
        t1 = time.perf_counter()
        if self.use_router:
            entropy = self.router.entropy(emb).cpu()
            familiar = entropy < self.router.threshold
        else:
            entropy = torch.full((len(queries),), float("nan"))
            familiar = torch.ones(len(queries), dtype=torch.bool)
        removed = self._nearest_is_removed(emb, familiar)
        familiar = familiar & ~removed
        t2 = time.perf_counter()
        weights = torch.zeros(len(queries), self.spec.neuron_dim)
        idx = familiar.nonzero().flatten()
        if len(idx):
            weights[idx] = self.generate_neurons(emb[idx])
        t3 = time.perf_counter()
        return Routing(emb, entropy, familiar, weights, removed,
                       {"encoder": t1 - t0, "router": t2 - t1, "sampler": t3 - t2})

    def _nearest_is_removed(self, embeddings: torch.Tensor, familiar: torch.Tensor) -> torch.Tensor:
        """Bool [B]: a familiar row whose most similar edit prompt, among all edits, is a removed edit."""
        out = torch.zeros_like(familiar)
        idx = familiar.nonzero().flatten()
        if not self.removed_ids or not len(idx):
            return out
        nearest = (embeddings[idx] @ self.edit_embeddings().T).argmax(dim=1).cpu()
        out[idx] = self._removed_mask[nearest]
        return out

    def edit_embeddings(self) -> torch.Tensor:
        """The encoder's embeddings of every edit prompt (removed ones included), computed once."""
        if self._edit_embeddings is None:
            self._edit_embeddings = self.encoder.embed([e.prompt for e in self.prepared.edits])
        return self._edit_embeddings

    @torch.no_grad()
    def generate_neurons(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The neurons the generator makes for these query embeddings, value-scaled, on the CPU."""
        weights = self.generator.sample(embeddings, steps=self.steps, sampler=self.sampler, seed=self.seed,
                                        batch_size=self.sample_batch_size, noise_scale=self.noise_scale).cpu()
        return scale_value(weights, self.spec, self.value_scale)

    def lm_prompts(self, queries: Sequence[str], kind: str | Sequence[str] = "question") -> list[str]:
        """The strings the LM sees; ``kind`` is one template for every query or one per query."""
        kinds = [kind] * len(queries) if isinstance(kind, str) else list(kind)
        if len(kinds) != len(queries):
            raise ValueError(f"{len(queries)} queries but {len(kinds)} prompt kinds")
        return [self.spec.format_prompt(q, k) for q, k in zip(queries, kinds)]

    @staticmethod
    def _lm_weights(routing: Routing) -> torch.Tensor | None:
        # No familiar row: run the plain LM (no hook arithmetic at all).
        return routing.weights if bool(routing.familiar.any()) else None

    # ------------------------------------------------------------------ answering
    @torch.no_grad()
    def generate(self, queries: Sequence[str], kind: str | Sequence[str] = "question",
                 max_new_tokens: int | Sequence[int] = 20, routing: Routing | None = None) -> list[str]:
        """Greedy answers (decoded, stripped) with each query's neuron attached for the whole generation."""
        toks = self.generate_ids(queries, kind, max_new_tokens, routing)
        return [self.tokenizer.decode(t, skip_special_tokens=True).strip() for t in toks]

    @torch.no_grad()
    def generate_ids(self, queries: Sequence[str], kind: str | Sequence[str] = "question",
                     max_new_tokens: int | Sequence[int] = 20, routing: Routing | None = None) -> list[list[int]]:
        """``generate``'s new token ids, cut at (and without) EOS; ``kind`` and ``max_new_tokens`` are
        shared or given per query, so one batch may mix templates and lengths (the server does)."""
        routing = routing or self.route(queries)
        limits = max_new_tokens if isinstance(max_new_tokens, int) else list(max_new_tokens)
        return greedy_generate(self.lm, self.tokenizer, self.neuron, self.lm_prompts(queries, kind),
                               self._lm_weights(routing), max_new_tokens=limits)

    @torch.no_grad()
    def score(self, queries: Sequence[str], targets: Sequence[str], kind: str = "question",
              routing: Routing | None = None) -> dict:
        """Teacher-forced token accuracy and greedy exact match of ``targets``."""
        routing = routing or self.route(queries)
        prompts = self.lm_prompts(queries, kind)
        w = self._lm_weights(routing)
        tf = teacher_forced(self.lm, self.tokenizer, self.neuron, prompts, targets, w)
        return {"tf": tf["token_acc"], "ag": greedy_match(self.lm, self.tokenizer, self.neuron, prompts, targets, w)}

    # ------------------------------------------------------------------ provenance
    def nearest_edits(self, embeddings: torch.Tensor) -> list[dict | None]:
        """For each embedding: the most similar edit prompt that is not removed (index, id, prompt, target,
        cosine similarity); None when every edit is removed."""
        if bool(self._removed_mask.all()):
            return [None] * len(embeddings)
        sims = embeddings @ self.edit_embeddings().T
        sims[:, self._removed_mask.to(sims.device)] = float("-inf")
        best = sims.max(dim=1)
        out = []
        for score, i in zip(best.values.tolist(), best.indices.tolist()):
            e = self.prepared.edits[i]
            out.append({"index": i, "id": e.id, "prompt": e.prompt, "target_new": e.target_new, "similarity": round(score, 4)})
        return out
