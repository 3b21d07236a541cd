"""Evaluates MeG (with and without the familiarity router) and its peers (FT, MEMIT, AlphaEdit) on one run,
with the same items and metrics, and writes results.json / results.md / results.png / per_example.jsonl."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import lightning as L
import torch

from megedit.artifacts import ArtifactError, finished_manifest, write_manifest
from megedit.baselines.memit import swapped_weights
from megedit.defaults import DEFAULT_STEPS
from megedit.distributed import gather_objects
from megedit.edited_model import EditedLM
from megedit.evaluate.items import AG_PROTOCOLS, greedy_scores, reference_tokens, teacher_forced_scores
from megedit.evaluate.metrics import SHORT, locality_breakdown, make_metrics, multi_hop_summary, summarise
from megedit.evaluate.artifact import (OUTPUTS, load_peer_weights, peer_account, peer_file, peers_dir,
                                      save_peer_weights, write_results)
from megedit.evaluate.evaluate_datamodule import EvaluationInputs
from megedit.evaluate.peers import PEERS, PeerEdit, check_variants, edit_all, memit_settings
from megedit.evaluate.report import results_table
from megedit.graph import upstream_dirs
from megedit.handover import ReceivesInputs
from megedit.layer_split import LayerSplit
from megedit.query_cache import CachedQueries

VARIANTS = ("meg", "meg_no_router", "meg_retrieval", "base", *PEERS)
MEG_STAGES = ("encoder", "familiarity", "collect", "diffusion")  # what MeG's edit costs (prepare is shared)

def meg_stage_seconds(run_dir: Path) -> dict:
    """The wall seconds of each of MeG's stages that has finished in ``run_dir`` (from their manifests)."""
    manifests = {name: finished_manifest(Path(run_dir) / name) for name in MEG_STAGES}
    return {name: m.get("resources", {}).get("wall_seconds") for name, m in manifests.items() if m is not None}


def method_seconds(variants: list[str], eval_seconds: dict, peers: dict, stages: dict) -> dict:
    """Per variant: the wall seconds its edit took (MeG: its stages' sum, None when one is unknown; a peer: its
    edit in this stage) and those of scoring it here (this process's share under DDP)."""
    meg_edit = round(sum(stages.values()), 1) if stages and None not in stages.values() else None
    out = {v: {"edit": peers[v].seconds if v in peers else 0.0 if v == "base" else meg_edit,
               "evaluate": round(eval_seconds[v], 1)} for v in variants}
    out["meg_stages"] = stages
    return out


class EvaluateModule(ReceivesInputs, L.LightningModule):
    def __init__(self, out_dir: str = "runs/smollm2-counterfact-1024/evaluate",
                 variants: list[str] = ["meg", "meg_retrieval", "ft", "memit", "alphaedit"], steps: int = DEFAULT_STEPS,
                 sampler: str = "ddim", seed: int = 0, ag_protocol: str = "target_length", ft_epochs: int = 30,
                 ft_lr: float = 2e-3, ft_batch_size: int = 32, ft_target_reliability: float | None = 0.95,
                 peer_max_edits: int | None = 1024, peer_stats_texts: int | None = None,
                 router_threshold: float | None = None, noise_scale: float | None = None,
                 value_scale: float | None = None):
        """
        Args:
            out_dir: where results go.
            variants: any of ``meg`` (full method), ``meg_no_router`` (familiarity net bypassed: every query gets a
                generated neuron; paper Table 5 "w/o FN"), ``meg_retrieval`` (same routing, but a familiar query gets
                the *collected* neuron of its nearest edit by encoder cosine instead of a generated one: what a
                perfect generator would reach, so the gap to ``meg`` is the generator's share of the loss), ``base``
                (the unedited LM: no neuron, no router; the reference row, e.g. MQuAKE's multi-hop accuracy on the
                new answers before editing) and
                the peers, which write all edits into the LM's weights: ``ft`` (fine-tune the edit layer's MLP),
                ``memit`` and ``alphaedit`` (``megedit.baselines``, settings from the model's ``memit:`` section).
            steps, sampler: generator sampling (DDIM 10 steps by default, as good as 50 here; ``ancestral`` as the official code).
            seed: sampling seed.
            ag_protocol: ``target_length`` (default) or ``official`` (see AG_PROTOCOLS; recorded in metric_meta).
            ft_epochs, ft_lr, ft_batch_size, ft_target_reliability: FT baseline (Adam on the edit layer's MLP
                only): it trains until the edits' reliability reaches the target (None: never stops early) or
                for ft_epochs epochs, and results.json says which.
            peer_max_edits: the peers run only where the run has at most this many edits (None: always);
                larger runs skip them with a message (MEMIT's solve and FT grow with N; the paper compares at
                N <= 10k on a GPU).
            peer_stats_texts: Wikipedia texts for MEMIT / AlphaEdit's E[kk^T] (None: the model's mom2_n_texts).
            router_threshold: override the familiarity artifact's entropy threshold (threshold sweeps, Table 16).
            noise_scale: override the generator's sampling temperature (initial-noise scale; None: as saved).
            value_scale: override the factor on generated neurons' value vectors (None: as the generator saved it).
        """
        super().__init__()
        self.save_hyperparameters()
        self.variants = check_variants(variants, VARIANTS)
        if ag_protocol not in AG_PROTOCOLS:
            raise ValueError(f"ag_protocol must be one of {list(AG_PROTOCOLS)}, got {ag_protocol!r}")
        self.metrics = make_metrics(self.variants)
        self.edited: EditedLM | None = None
        self.inputs: EvaluationInputs | None = None  # received from the datamodule (ReceivesInputs)
        self._rows: list[dict] = []
        self._timing = {"route": 0.0, "lm": 0.0}
        self._split: LayerSplit | None = None  # the LM around its edit layer, shared by every batch's CachedQueries
        self._eval_seconds = {v: 0.0 for v in self.variants}
        self.peers: dict[str, PeerEdit] = {}
        self.skipped: dict[str, str] = {}

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        if self.edited is not None:
            return
        data = self.inputs
        self.edited = EditedLM.load(data.run_dir, steps=self.hparams.steps, sampler=self.hparams.sampler,
                                    seed=self.hparams.seed, use_router=True, noise_scale=self.hparams.noise_scale,
                                    value_scale=self.hparams.value_scale)
        if self.hparams.router_threshold is not None:
            self.edited.router.threshold = float(self.hparams.router_threshold)
        self._skip_peers(len(data.edit_indices))
        self.collected = None
        if "meg_retrieval" in self.variants:
            from megedit.collect.artifact import load_collected

            collect_dir = data.run_dir / "collect"
            self.collected = load_collected(collect_dir)[0]
            if self.collected.shape[0] != len(self.edited.prepared.edits):
                raise ValueError(f"{collect_dir}: {self.collected.shape[0]} neurons for "
                                 f"{len(self.edited.prepared.edits)} edits")

    def _skip_peers(self, n_edits: int) -> None:
        limit = self.hparams.peer_max_edits
        if limit is None or n_edits <= limit:
            return
        why = ("peers off (peer_max_edits 0, as `make all` runs evaluate; `make peers` scores them)" if limit == 0
               else f"{n_edits} edits > peer_max_edits {limit}")
        for v in [v for v in self.variants if v in PEERS]:
            self.skipped[v] = why
            print(f"evaluate: {v} skipped ({why}; --model.peer_max_edits null runs it)")
            self.variants.remove(v)

    def on_test_start(self) -> None:
        self._started = time.time()
        e = self.edited
        edits = [e.prepared.edits[i] for i in self.inputs.edit_indices]
        methods = [v for v in self.variants if v in PEERS]
        self.peers = self._saved_peers(methods, len(edits))
        missing = [m for m in methods if m not in self.peers]
        overrides = {"n_texts": self.hparams.peer_stats_texts} if self.hparams.peer_stats_texts else None
        edited = edit_all(
            missing, e.lm, e.tokenizer, e.spec, edits, ft_epochs=self.hparams.ft_epochs,
            ft_lr=self.hparams.ft_lr, ft_batch_size=self.hparams.ft_batch_size,
            ft_target_reliability=self.hparams.ft_target_reliability, seed=self.hparams.seed,
            weights_sha256=e.prepared.lineage.get("model_weights_sha256"), stats_overrides=overrides,
            progress=self.global_rank == 0)
        if self.global_rank == 0:  # kept for a rerun after a kill and for the general stage
            for method, peer in edited.items():
                save_peer_weights(peer_file(self._peer_dir(), method), method, peer.weights, e.prepared.lineage,
                                  len(edits), peer.account | {"seconds": peer.seconds}, self._peer_options(method))
        self.peers |= edited

    def _peer_dir(self) -> Path:
        return peers_dir(self.hparams.out_dir)

    def _peer_options(self, method: str) -> dict:
        """The settings a peer's weights depend on: a saved file made with others is edited again."""
        hp = self.hparams
        if method == "ft":
            return {k: hp[k] for k in ("ft_epochs", "ft_lr", "ft_batch_size", "ft_target_reliability", "seed")}
        return {"memit": memit_settings(self.edited.spec).to_dict(), "peer_stats_texts": hp.peer_stats_texts}

    def _saved_peers(self, methods: list[str], n_edits: int) -> dict[str, PeerEdit]:
        """The peers whose weights an earlier run of this stage saved with the same run, edits and settings."""
        out = {}
        for method in methods:
            path = peer_file(self._peer_dir(), method)
            if not path.is_file():
                continue
            try:
                weights = load_peer_weights(path, method, self.edited.prepared.lineage, n_edits,
                                            self._peer_options(method))
            except ArtifactError as err:
                print(f"evaluate: {method} edited again ({err})")
                continue
            account = peer_account(path)
            print(f"evaluate: {method} weights reused from {path}")
            out[method] = PeerEdit(weights, account | {"reused_from": str(path)}, float(account.get("seconds", 0.0)))
        return out

    # ------------------------------------------------------------------ scoring
    def _targets(self, items) -> list[list[int]]:
        return reference_tokens(self.edited.tokenizer, items)

    def _tf(self, prompts, targets, weights, cached: CachedQueries | None = None) -> dict:
        """Teacher forcing on one batch; ``cached`` (the batch's layers below the edit layer, shared by every
        variant that keeps the LM's own weights) gives the same numbers at a fraction of the cost."""
        e = self.edited
        if cached is not None:
            return cached.score(e.neuron, weights, greedy=True)
        return teacher_forced_scores(e.lm, e.tokenizer, e.neuron, prompts, targets, weights)

    def _ag(self, prompts, items, targets, weights, tf: dict) -> tuple[torch.Tensor, list[list[int]]]:
        e = self.edited
        return greedy_scores(e.lm, e.tokenizer, e.neuron, prompts, items, tf, weights, self.hparams.ag_protocol)

    def test_step(self, items: list[dict], batch_idx: int) -> None:
        e = self.edited
        queries = [it["query"] for it in items]
        prompts = [e.spec.format_prompt(it["query"], it["kind"]) for it in items]
        targets = self._targets(items)
        t0 = time.time()
        routing = e.route(queries)
        self._timing["route"] += time.time() - t0
        runs = {}
        if "meg" in self.variants:
            runs["meg"] = (routing.weights if routing.familiar.any() else None, routing.familiar)
        if "meg_no_router" in self.variants:
            # Reuse the neurons already generated for familiar rows; generate the rest.
            weights = routing.weights.clone()
            rest = (~routing.familiar).nonzero().flatten()
            if len(rest):
                weights[rest] = e.generate_neurons(routing.embeddings[rest])
            runs["meg_no_router"] = (weights, torch.ones(len(items), dtype=torch.bool))
        if "meg_retrieval" in self.variants:
            weights = torch.zeros_like(routing.weights)
            fam = routing.familiar.nonzero().flatten()
            if len(fam):
                nearest = torch.tensor([n["index"] for n in e.nearest_edits(routing.embeddings[fam])])
                weights[fam] = self.collected[nearest].to(weights.dtype)
            runs["meg_retrieval"] = (weights if len(fam) else None, routing.familiar)
        for v in [*self.peers, *(["base"] if "base" in self.variants else [])]:  # no neuron, no router
            runs[v] = (None, torch.zeros(len(items), dtype=torch.bool))
        t1 = time.time()
        own = [v for v in runs if v not in self.peers]  # variants on the LM's own weights share its lower layers
        if len(own) > 1 and self._split is None:
            self._split = LayerSplit(e.lm, e.spec)
        cached = (CachedQueries(e.lm, e.tokenizer, e.spec, prompts, batch_size=len(prompts), target_tokens=targets,
                                split=self._split) if len(own) > 1 else None)
        for variant, (weights, familiar) in runs.items():
            t_variant = time.time()
            ctx = swapped_weights(e.lm, self.peers[variant].weights) if variant in self.peers else contextlib.nullcontext()
            with ctx:
                forced = self._tf(prompts, targets, weights, None if variant in self.peers else cached)
                tf = forced["token_acc"]
                ag, gen = self._ag(prompts, items, targets, weights, forced)
            self._eval_seconds[variant] += time.time() - t_variant
            for i, it in enumerate(items):
                g = SHORT.get(it["group"])  # multi-hop items are summarised from the rows (multi_hop_summary)
                if g is not None:
                    self.metrics[f"{variant}__{g}_tf"].update(tf[i])
                    self.metrics[f"{variant}__{g}_ag"].update(ag[i])
                    self.metrics[f"{variant}__familiar_{g}"].update(familiar[i].float())
                self._rows.append({"key": it["key"], "variant": variant, "edit": it["edit"], "group": it["group"],
                                   "pos": it["pos"], "query": it["query"], "kind": it["kind"], "target": it["target"],
                                   "locality_kind": it.get("locality_kind"), "familiar": bool(familiar[i]),
                                   "entropy": None if variant in (*PEERS, "base") else round(float(routing.entropy[i]), 4),
                                   "tf": round(float(tf[i]), 4), "ag": bool(ag[i]),
                                   "answer": e.tokenizer.decode(gen[i], skip_special_tokens=True)})
        self._timing["lm"] += time.time() - t1

    # ------------------------------------------------------------------ outputs
    def on_test_epoch_end(self) -> None:
        results = summarise(self.metrics, self.variants)
        for variant, row in results.items():
            for name, value in row.items():
                if isinstance(value, (int, float)):
                    self.log(f"{variant}/{name}", value, rank_zero_only=True, sync_dist=False)
        rows = [r for part in gather_objects(self._rows) for r in part]
        if self.global_rank == 0:
            self._write(results, rows)

    def _write(self, results: dict, rows: list[dict]) -> None:
        data, e = self.inputs, self.edited
        rows = sorted({(r["variant"], r["key"]): r for r in rows}.values(), key=lambda r: (r["variant"], r["key"]))
        for variant, extra in locality_breakdown(rows, results).items():
            results[variant]["locality"] = extra
        for variant, extra in multi_hop_summary(rows, results).items():
            results[variant]["multi_hop"] = extra
        summary = {"lineage": e.prepared.lineage, "metric_meta": self._metric_meta(), "results": results,
                   "timings_seconds": {k: round(v, 1) for k, v in self._timing.items()} |
                   {"total": round(time.time() - self._started, 1)}}
        summary["method_seconds"] = method_seconds(self.variants, self._eval_seconds, self.peers,
                                                   meg_stage_seconds(data.run_dir))
        if self.peers:
            summary["peers"] = {v: p.account for v, p in self.peers.items()}
        if self.skipped:
            summary["skipped"] = self.skipped
        write_results(self.hparams.out_dir, summary, rows)
        # the collected neurons are read only by the retrieval variant
        upstream = {n: d for n, d in upstream_dirs("evaluate", {"run_dir": data.run_dir}).items()
                    if n != "collect" or "meg_retrieval" in self.variants}
        write_manifest(self.hparams.out_dir, "evaluate", e.prepared.lineage,
                       config={"model": dict(self.hparams), "data": data.data_config}, outputs=OUTPUTS,
                       upstream=upstream)
        print(results_table(summary))

    def _metric_meta(self) -> dict:
        """What the numbers in results.json mean and what they were measured on."""
        data, e, hp = self.inputs, self.edited, self.hparams
        return {
            "protocol": "megedit/1",
            "tf": "token-level accuracy of argmax under teacher forcing on the target tokens (locality: on the "
                  "pre-edit greedy answer's tokens)",
            "ag_protocol": hp.ag_protocol, "ag": AG_PROTOCOLS[hp.ag_protocol],
            "locality_reference": "pre-edit greedy answers recorded by the prepare stage (not ground truth)",
            "score": "harmonic mean of the six metrics",
            "sampler": hp.sampler, "steps": hp.steps, "seed": hp.seed,
            "noise_scale": e.generator.noise_scale if e.noise_scale is None else e.noise_scale,
            "value_scale": e.value_scale,
            "router": e.router.kind, "router_threshold": float(e.router.threshold), "n_edits": len(data.edit_indices),
            "run_version": {"folder": str(data.run_dir), "version": data.version, "removed_edits": len(e.removed_ids)},
            "items": {g: sum(1 for it in data.items if it["group"] == g)
                      for g in ("reliability", "generality", "locality", "multi_hop")},
            "multi_hop": "MQuAKE: a multi-hop question is right when its greedy answer (up to 20 tokens, decoded, "
                         "lower-cased) starts with the new answer or an alias; an instance when any of its "
                         "questions is; edit-wise: each atomic prompt (AG); instance-wise: every atom of an instance",
        }

    def configure_optimizers(self):
        return None
