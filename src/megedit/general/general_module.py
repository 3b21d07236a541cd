"""General-ability stage: the base LM and each edited variant of a run on BBH, GSM8K, MMLU, RTE and SST-2
(the paper's Table 3), on the same items, written as results.json / results.md / results.png /
per_item.jsonl.

Variants: ``base`` (the unedited LM), ``meg`` (the run's ``EditedLM``: every query goes through its router;
a familiar one gets its generated neuron for the whole answer, an unfamiliar one is answered by the
unedited LM, so its answer *is* the base's, which is reused rather than recomputed) and the peers ``ft``,
``memit``, ``alphaedit`` (their edited weights swapped in; ``megedit.general.peer_weights``).
"""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L

from megedit.artifacts import MANIFEST, sha256_file, sha256_json, write_manifest
from megedit.baselines.memit import swapped_weights
from megedit.defaults import DEFAULT_STEPS
from megedit.edited_model import EditedLM
from megedit.evaluate.artifact import EVALUATE_FOLDERS, peers_dir
from megedit.evaluate.peers import PEERS, check_variants
from megedit.general.answering import answer_items, fit_prompt
from megedit.general.artifact import ITEMS_FOLDER, OUTPUTS, PEERS_FOLDER, read_table, write_results
from megedit.general.general_datamodule import GeneralInputs
from megedit.general.item_cache import ItemCache
from megedit.general.items import Item
from megedit.general.peer_weights import peer_weights
from megedit.general.summary import PROTOCOLS, summarise
from megedit.handover import ReceivesInputs

VARIANTS = ("base", "meg", *PEERS)  # scored in this order: meg reuses base's answers to unrouted queries
ROUTE_ON = ("item", "prompt")
PROTOCOL = "megedit-general/1"  # bump when a prompt or a scoring rule changes: cached rows are then not reused


class GeneralModule(ReceivesInputs, L.LightningModule):
    def __init__(self, out_dir: str = "runs/smollm2-counterfact-1024/general", variants: list[str] = ["base", "meg"],
                 gsm8k_max_new_tokens: int = 256, bbh_max_new_tokens: int = 64, max_prompt_tokens: int | None = 2048,
                 route_on: str = "item", steps: int = DEFAULT_STEPS, sampler: str = "ddim", seed: int = 0,
                 router_threshold: float | None = None, noise_scale: float | None = None,
                 value_scale: float | None = None, peer_weights_dir: str | None = None):
        """
        Args:
            out_dir: where results go (``items/`` keeps every scored item, so a rerun scores only what is new).
            variants: any of ``base``, ``meg``, ``ft``, ``memit``, ``alphaedit``.
            gsm8k_max_new_tokens: greedy budget of a GSM8K answer (zero-shot chain of thought).
            bbh_max_new_tokens: greedy budget of a BBH answer (64 fits the longest answer-only target; give a
                few hundred with ``--data.bbh_prompting cot``).
            max_prompt_tokens: drop exemplars (last first) until a few-shot prompt fits (None: never).
            route_on: what MeG's router embeds: ``item`` (the item's own text: question, sentence or pair) or
                ``prompt`` (the whole few-shot prompt, which the encoder truncates to its first tokens).
            steps, sampler, seed, router_threshold, noise_scale, value_scale: MeG's sampling and routing, as in
                the evaluate stage (None: as the run saved them).
            peer_weights_dir: a folder with the peers' ``<method>.safetensors``, searched before
                ``<run>/evaluate-peers/peers/`` (``make peers``), ``<run>/evaluate/peers/`` and this stage's ``peers/``
                cache; missing ones are computed.
        """
        super().__init__()
        self.save_hyperparameters()
        check_variants(variants, VARIANTS)
        if route_on not in ROUTE_ON:
            raise ValueError(f"route_on must be one of {ROUTE_ON}, got {route_on!r}")
        self.variants = [v for v in VARIANTS if v in variants]
        self.cache = ItemCache(Path(out_dir) / ITEMS_FOLDER)
        self.inputs: GeneralInputs | None = None  # received from the datamodule (ReceivesInputs)
        self.edited: EditedLM | None = None
        self.peers: dict[str, tuple[dict, Path]] = {}
        self.costs = {v: {"items": 0, "wall_seconds": 0.0, "cpu_seconds": 0.0} for v in self.variants}

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        if self.edited is not None:
            return
        hp, run = self.hparams, self.inputs.run_dir
        self.edited = EditedLM.load(run, steps=hp.steps, sampler=hp.sampler, seed=hp.seed, use_router=True,
                                    noise_scale=hp.noise_scale, value_scale=hp.value_scale)
        if hp.router_threshold is not None:
            self.edited.router.threshold = float(hp.router_threshold)
        methods = [v for v in self.variants if v in PEERS]
        if methods:
            out = Path(hp.out_dir)
            search = [Path(p) for p in (hp.peer_weights_dir, *(peers_dir(run / f) for f in EVALUATE_FOLDERS),
                                        out / PEERS_FOLDER) if p]
            self.peers = peer_weights(methods, self.edited, run, search, out / PEERS_FOLDER)
        self.fingerprints = {(v, b): self._fingerprint(v, b, run)
                             for v in {"base", *self.variants} for b in self.inputs.benchmarks}

    def max_new_tokens(self, benchmark: str) -> int:
        return {"gsm8k": self.hparams.gsm8k_max_new_tokens, "bbh": self.hparams.bbh_max_new_tokens}.get(benchmark, 0)

    def _fingerprint(self, variant: str, benchmark: str, run: Path) -> str:
        """What decides a (variant, benchmark) row's result; a cached row counts only under the same one."""
        e, hp = self.edited, self.hparams
        parts = {"protocol": PROTOCOL, "benchmark": benchmark, "lineage": e.prepared.lineage,
                 "max_prompt_tokens": hp.max_prompt_tokens, "max_new_tokens": self.max_new_tokens(benchmark),
                 "bbh_prompting": self.inputs.bbh_prompting if benchmark == "bbh" else None, "variant": variant}
        if variant == "meg":
            parts["meg"] = {"steps": hp.steps, "sampler": hp.sampler, "seed": hp.seed, "route_on": hp.route_on,
                            "threshold": float(e.router.threshold), "noise_scale": e.noise_scale,
                            "value_scale": e.value_scale,
                            "artifacts": {n: sha256_file(run / n / MANIFEST)
                                          for n in ("encoder", "familiarity", "diffusion")}}
        if variant in PEERS:
            parts["weights"] = sha256_file(self.peers[variant][1])
        return sha256_json(parts)[:16]

    # ------------------------------------------------------------------ scoring
    def test_step(self, batch: list[Item], batch_idx: int) -> None:
        fitted = [fit_prompt(self.edited.tokenizer, it, self.hparams.max_prompt_tokens) for it in batch]
        for variant in self.variants:
            todo = [i for i, it in enumerate(batch) if self._cached(variant, it) is None]
            if not todo:
                continue
            wall, cpu = time.time(), time.process_time()
            rows = self._score(variant, [batch[i] for i in todo], [fitted[i] for i in todo])
            self.cache.add(variant, rows)
            cost = self.costs[variant]
            cost["items"] += len(todo)
            cost["wall_seconds"] += time.time() - wall
            cost["cpu_seconds"] += time.process_time() - cpu

    def _cached(self, variant: str, item: Item) -> dict | None:
        return self.cache.get(variant, self.fingerprints[(variant, item.benchmark)], item.key)

    def _score(self, variant: str, items: list[Item], fitted: list[tuple[str, int]]) -> list[dict]:
        if variant == "base":
            return self._rows("base", items, fitted, None)
        if variant == "meg":
            return self._meg_rows(items, fitted)
        with swapped_weights(self.edited.lm, self.peers[variant][0]):  # the peer's edit lives in the weights
            return self._rows(variant, items, fitted, None)

    def _rows(self, variant: str, items: list[Item], fitted: list[tuple[str, int]], weights) -> list[dict]:
        e = self.edited
        answers = answer_items(e.lm, e.tokenizer, e.neuron, items, [p for p, _ in fitted], weights,
                               self.max_new_tokens(items[0].benchmark), self.inputs.lm_batch_size)
        return [{"key": it.key, "benchmark": it.benchmark, "id": it.id, "group": it.group, "variant": variant,
                 "fingerprint": self.fingerprints[(variant, it.benchmark)], "n_shots": n, "gold": it.gold, **a,
                 "routed": None}
                for it, (_, n), a in zip(items, fitted, answers)]

    def _meg_rows(self, items: list[Item], fitted: list[tuple[str, int]]) -> list[dict]:
        """Route every query; answer the familiar ones with their neurons; the others are the base's answers."""
        queries = [it.query if self.hparams.route_on == "item" else p for it, (p, _) in zip(items, fitted)]
        routing = self.edited.route(queries)
        familiar = routing.familiar.nonzero().flatten().tolist()
        own = dict(zip(familiar, self._rows("meg", [items[i] for i in familiar], [fitted[i] for i in familiar],
                                            routing.weights[familiar]))) if familiar else {}
        rest = [i for i in range(len(items)) if i not in own]
        for i, row in zip(rest, self._base_rows([items[i] for i in rest], [fitted[i] for i in rest])):
            own[i] = row | {"variant": "meg", "fingerprint": self.fingerprints[("meg", items[i].benchmark)]}
        return [own[i] | {"routed": i in familiar, "entropy": round(float(routing.entropy[i]), 4)}
                for i in range(len(items))]

    def _base_rows(self, items: list[Item], fitted: list[tuple[str, int]]) -> list[dict]:
        """The base LM's rows for ``items``: cached where scored before, else scored now (and cached)."""
        missing = [i for i, it in enumerate(items) if self._cached("base", it) is None]
        if missing:
            self.cache.add("base", self._rows("base", [items[i] for i in missing], [fitted[i] for i in missing], None))
        return [self._cached("base", it) for it in items]

    # ------------------------------------------------------------------ outputs
    def on_test_epoch_end(self) -> None:
        rows = {v: [self._cached(v, it) for items in self.inputs.items.values() for it in items]
                for v in self.variants}
        missing = {v: sum(r is None for r in rs) for v, rs in rows.items() if None in rs}
        if missing:
            raise RuntimeError(f"general: items left unscored {missing} (a bug: every batch scores every variant)")
        self._write(rows)

    def _settings(self) -> dict:
        """How the items were drawn, prompted and answered (and MeG routed): the report's ``settings``."""
        data, hp = self.inputs, self.hparams
        settings = {**data.subset, "items": {b: len(items) for b, items in data.items.items()}, "of": data.totals,
                    "bbh_prompting": data.bbh_prompting, "max_prompt_tokens": hp.max_prompt_tokens,
                    "max_new_tokens": {b: self.max_new_tokens(b) for b in ("gsm8k", "bbh")},
                    "protocols": {b: PROTOCOLS[b] for b in data.benchmarks}, "protocol_version": PROTOCOL}
        if "meg" in self.variants:
            settings["meg"] = {"route_on": hp.route_on, "router_threshold": float(self.edited.router.threshold),
                               "steps": hp.steps, "sampler": hp.sampler, "seed": hp.seed}
        return settings

    def _write(self, rows: dict[str, list[dict]]) -> None:
        data, e, hp = self.inputs, self.edited, self.hparams
        summary = {"lineage": e.prepared.lineage, "n_edits": len(e.prepared.edits), "settings": self._settings(),
                   "results": summarise(rows, data.benchmarks),
                   "peers": {m: str(path) for m, (_, path) in self.peers.items()},
                   "costs_this_process": {v: {k: round(x, 1) for k, x in c.items()} for v, c in self.costs.items()}}
        write_results(hp.out_dir, summary, [r for v in self.variants for r in rows[v]])
        inputs = data.input_files | {f"peer_weights/{m}": path for m, (_, path) in self.peers.items()}
        write_manifest(hp.out_dir, "general", e.prepared.lineage, config={"model": dict(hp), "data": data.data_config},
                       outputs=OUTPUTS, input_files=inputs, upstream=data.upstream)
        print(read_table(hp.out_dir))

    def configure_optimizers(self):
        return None
