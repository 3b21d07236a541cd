"""Collect stage: optimise one dynamic neuron per edit of the prepare artifact and write them as [N, D].

Each rank runs a refill-queue optimiser (``megedit.collect.engine``) over its shards; a shard is
verified with real greedy decoding and written atomically as soon as all its edits are done.
After every rank is done, rank 0 merges the shards, measures the paraphrase-transfer
diagnostic on pseudo-edits (never on the evaluation paraphrases) and writes the manifest last.
"""

from __future__ import annotations

import dataclasses
import resource
import time
from pathlib import Path

import lightning as L
import torch

from megedit.artifacts import MANIFEST, ArtifactError, sha256_file, sha256_json, write_manifest
from megedit.collect.artifact import (SHARD_DIR, read_shard, remove_pseudo_neurons, remove_shards, save_pseudo_neurons,
                                     write_neurons, write_report, write_shard, written_outputs)
from megedit.collect.collect_datamodule import CollectInputs
from megedit.collect.engine import CollectItem, CollectOptions, CollectResult, NeuronCollector, generate_prefixes
from megedit.collect.transfer import measure_transfer, sample_pseudo
from megedit.collect.views import LeakGuard, atom_queries, collect_item, evaluation_texts, relation_views
from megedit.components.neuron import DynamicNeuron
from megedit.distributed import barrier, gather_objects
from megedit.handover import ReceivesInputs
from megedit.loading import load_lm, state_dict_sha256
from megedit.scoring import greedy_match

# Stage options (beside the engine's) that change the collected weights; the rest only change speed or reports.
_RESULT_OPTIONS = ("n_prefixes", "prefix_tokens", "prefix_seed", "relation_views", "verify")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def greedy_verified(lm, tokenizer, neuron: DynamicNeuron, spec, edits, weights: torch.Tensor) -> torch.Tensor:
    """Bool [n]: real batched greedy decoding with each edit's neuron attached emits its target, on each of
    its atoms (the engine's teacher-forced test says the same for a causal LM; this checks it)."""
    owner, prompts, targets = atom_queries(edits)  # an edit with several atoms must get every one right
    hits = greedy_match(lm, tokenizer, neuron, [spec.format_prompt(p, e.prompt_kind) for p, e in
                                                zip(prompts, (edits[k] for k in owner))],
                        targets, weights[owner], batch_size=64)
    return torch.zeros(len(edits), dtype=torch.long).index_add(0, torch.tensor(owner), (~hits).long()) == 0


def per_edit_record(index: int, edit_id: str, result: CollectResult, success: bool, rank: int,
                    relation_views: list[str]) -> dict:
    """One row of ``per_edit.jsonl``."""
    return {"index": index, "id": edit_id, "success": success, "tf_success": result.success, "steps": result.steps,
            "loss": round(result.loss, 5), "min_margin": round(result.min_margin, 4),
            "reached_margin": result.reached_margin, "rank": rank, "relation_views": relation_views}


class CollectModule(ReceivesInputs, L.LightningModule):
    def __init__(self, out_dir: str = "runs/collect", options: CollectOptions = CollectOptions(),
                 n_prefixes: int = 0, prefix_tokens: int = 10, prefix_seed: int = 0, relation_views: int = 0,
                 verify: bool = True, drop_failed: bool = True,
                 transfer_n: int = 256, transfer_compare: bool = True, transfer_seed: int = 0,
                 keep_shards: bool = False, check_weights: bool = True):
        """
        Args:
            out_dir: where the artifact goes (``neurons.safetensors``, ``per_edit.jsonl``, ``report.json``,
                ``manifest.json``; ``shards/`` while running).
            options: the per-edit optimisation (``megedit.collect.engine.CollectOptions``: lr, optimizer,
                max_steps, capacity, key_init, stop_margin, stop_on, stop_rule, encode_batch; each field's
                meaning and range is documented there). The stop margin is the lever of paraphrase transfer:
                a neuron trained well past its first success fires on paraphrases too (docs/collection.md).
            n_prefixes: random LM-generated context prefixes trained alongside the plain prompt (0 = prompt only).
            prefix_tokens: tokens per generated prefix.
            prefix_seed: seed of the prefix sampling.
            relation_views: up to this many rephrasings per edit trained alongside the prompt, lent by pseudo
                edits (never edited) with the same relation template: their paraphrases with this edit's
                subject put in (``megedit.collect.views``). A view equal to an evaluation text of any edit (up
                to case, whitespace and a context prefix) is dropped.
            verify: re-check every edit with real batched greedy decoding (``generate``); success needs both.
            drop_failed: the paper keeps only edits whose collection succeeded; recorded in the manifest and
                honoured by ``megedit.collect.artifact.training_rows`` (failed rows stay in the [N, D] file).
            transfer_n: pseudo-edits (never the evaluation paraphrases) used for the paraphrase-transfer
                diagnostic; 0 skips it.
            transfer_compare: also measure the plain prompt-only neuron on the same pseudo-edits.
            transfer_seed: which pseudo-edits the diagnostic samples.
            keep_shards: keep ``shards/`` after the merge.
            check_weights: refuse an LM whose weights hash differs from the prepare run's lineage.
        """
        super().__init__()
        self.save_hyperparameters(ignore=["options"])
        self.hparams["options"] = dataclasses.asdict(options)  # plain data for the manifest and the resume check
        self.options = options
        if n_prefixes < 0 or transfer_n < 0 or relation_views < 0:
            raise ValueError("model.n_prefixes, model.relation_views and model.transfer_n must be >= 0")
        self.lm = None
        self.inputs: CollectInputs | None = None  # received from the datamodule (ReceivesInputs)
        self._created = time.time()

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        if self.lm is not None:
            return
        # The per-edit optimisation needs gradients inside predict: the loop runs under no_grad (which the
        # engine lifts) instead of inference mode (which nothing inside can lift), whatever the trainer flag says.
        self.trainer.predict_loop.inference_mode = False
        data = self.inputs
        self.prepared = data.prepared
        self.spec = self.prepared.spec
        self.lm, self.tokenizer = load_lm(self.spec)
        self.lm.to(self.device)
        if self.hparams.check_weights:
            digest = state_dict_sha256(self.lm)
            want = self.prepared.lineage.get("model_weights_sha256")
            if want and digest != want:
                raise ArtifactError(f"the LM loaded for {self.spec.name} has weights {digest[:12]}..., but "
                                    f"{self.prepared.dir} was prepared with {want[:12]}...; re-run prepare")
        self.neuron = DynamicNeuron(self.lm, self.spec)
        self.prefixes = generate_prefixes(self.lm, self.tokenizer, self.hparams.n_prefixes,
                                          self.hparams.prefix_tokens, self.hparams.prefix_seed)
        # Every rank must train under the same prefixes (sampling is seeded, but check rather than trust).
        if len({tuple(p) for p in gather_objects(self.prefixes)}) != 1:
            raise RuntimeError("ranks sampled different context prefixes; cannot shard consistently")
        self.extra_views = [[] for _ in self.prepared.edits]
        if self.hparams.relation_views:  # the guard indexes every evaluation text: only build it when used
            self.extra_views = relation_views(self.prepared.edits, self.prepared.pseudo_edits,
                                              self.hparams.relation_views,
                                              LeakGuard(evaluation_texts(self.prepared.edits)))
        self.fingerprint = sha256_json({
            "options": {**self.options.result_fields(), **{k: self.hparams[k] for k in _RESULT_OPTIONS}},
            "prefixes": self.prefixes, "relation_views": self.extra_views, "shard_size": data.data_config["shard_size"],
            "n_edits": data.n_edits,
            "prepare_manifest": sha256_file(Path(self.prepared.dir) / MANIFEST),
        })[:16]
        self.out_dir = Path(self.hparams.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.shard_sizes = {s["shard"]: s["end"] - s["start"] for s in data.shards}
        self._buffers: dict[int, dict[int, tuple[CollectResult, dict]]] = {}
        self.engine = NeuronCollector(self.lm, self.tokenizer, self.spec, self.options, neuron=self.neuron,
                                      on_result=self._on_result)
        self.stats = {"shards_collected": 0, "shards_resumed": 0, "edits_collected": 0, "collect_seconds": 0.0,
                      "verify_seconds": 0.0, "optimizer_steps": 0, "verify_disagreements": 0}
        self._started = time.time()

    def configure_optimizers(self):
        return None  # the per-edit Adam lives in the engine (one state per row)

    def item(self, i: int) -> CollectItem:
        return collect_item(i, self.prepared.edits[i], self.spec.format_prompt, self.prefixes, self.extra_views[i])

    # ------------------------------------------------------------------ work
    def predict_step(self, batch: dict, batch_idx: int):
        shard = int(batch["shard"])
        if shard < 0:
            return None  # padding so every rank gets an item
        if read_shard(self.out_dir, shard, self.fingerprint) is not None:
            self.stats["shards_resumed"] += 1
            return None
        start, end = int(batch["start"]), int(batch["end"])
        items = [self.item(i) for i in range(start, end)]
        t0 = time.time()
        self._buffers[shard] = {}
        self.engine.add(items, extra={"shard": shard})
        # Keep stepping while there is more queued work than rows, so the next shard refills the batch.
        while self.engine.pending > self.options.capacity:
            self.engine.step()
        self.stats["collect_seconds"] += time.time() - t0
        return None

    def _on_result(self, result: CollectResult, extra: dict) -> None:
        shard = extra["shard"]
        self._buffers[shard][result.key] = (result, extra)
        if len(self._buffers[shard]) == self.shard_sizes[shard]:
            self._finish_shard(shard)

    def _finish_shard(self, shard: int) -> None:
        results = [r for r, _ in sorted(self._buffers.pop(shard).values(), key=lambda x: x[0].key)]
        weights = torch.stack([r.weights for r in results]).float()
        tf_ok = torch.tensor([r.success for r in results])
        if self.hparams.verify:
            t0 = time.time()
            gm = greedy_verified(self.lm, self.tokenizer, self.neuron, self.spec,
                                 [self.prepared.edits[r.key] for r in results], weights.to(self.device))
            self.stats["verify_seconds"] += time.time() - t0
            self.stats["verify_disagreements"] += int((gm != tf_ok).sum())
            success = tf_ok & gm
        else:
            success = tf_ok
        records = [per_edit_record(r.key, self.prepared.edits[r.key].id, r, bool(s), self.global_rank,
                                   self.extra_views[r.key]) for r, s in zip(results, success.tolist())]
        write_shard(self.out_dir, shard, {"weights": weights, "success": success.to(torch.uint8),
                                          "index": torch.tensor([r.key for r in results])},
                    records, self.fingerprint)
        self.stats["shards_collected"] += 1
        self.stats["edits_collected"] += len(results)

    def on_predict_epoch_end(self) -> None:
        t0 = time.time()
        self.engine.run()  # the tail: no more shards to refill from
        self.stats["collect_seconds"] += time.time() - t0
        self.stats["optimizer_steps"] = self.engine.total_steps
        self.stats["peak_rss_mib"] = round(peak_rss_mib(), 1)
        self.stats["peak_cache_mib"] = round(self.engine.peak_cache_bytes / 2**20, 2)
        if self._buffers:
            raise RuntimeError(f"collect: shards {sorted(self._buffers)} never completed")
        per_rank = gather_objects(dict(self.stats, rank=self.global_rank))
        barrier()
        if self.global_rank == 0:
            self._merge(per_rank)
        barrier()

    # ------------------------------------------------------------------ merge + report
    def _merge(self, per_rank: list[dict]) -> None:
        data = self.inputs
        weights, success, records = self._read_shards()
        write_neurons(self.out_dir, weights, success, records)
        report = self._report(per_rank, weights, success, records)
        remove_pseudo_neurons(self.out_dir)  # a stale one from an earlier config
        if self.hparams.transfer_n:
            t0 = time.time()
            report["transfer"] = self.transfer_diagnostic()
            report["transfer"]["seconds"] = round(time.time() - t0, 1)
        write_report(self.out_dir, report)
        write_manifest(self.out_dir, "collect", self.prepared.lineage,
                       config={"data": data.data_config, "model": dict(self.hparams)},
                       outputs=written_outputs(self.out_dir), upstream=data.upstream,
                       extra={"n_edits": len(records), "neuron_dim": self.spec.neuron_dim,
                              "model_spec": self.spec.to_dict(), "prefixes": self.prefixes,
                              "fingerprint": self.fingerprint})
        if not self.hparams.keep_shards:
            remove_shards(self.out_dir)
        self._print_summary(report)

    def _read_shards(self) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
        """Every finished shard put together: ``(weights [N, D], success [N] uint8, per-edit records)``,
        checked to hold each edit of this prepare run exactly where it belongs."""
        n = self.inputs.n_edits
        weights = torch.zeros(n, self.spec.neuron_dim)
        success = torch.zeros(n, dtype=torch.uint8)
        seen = torch.zeros(n, dtype=torch.bool)
        records: list[dict | None] = [None] * n
        for s in self.inputs.shards:
            got = read_shard(self.out_dir, s["shard"], self.fingerprint)
            if got is None:
                raise ArtifactError(f"collect: shard {s['shard']} (edits {s['start']}..{s['end'] - 1}) is missing "
                                    f"from {self.out_dir / SHARD_DIR} after every rank finished")
            tensors, recs = got
            idx = tensors["index"].long()
            weights[idx] = tensors["weights"]
            success[idx] = tensors["success"]
            seen[idx] = True
            for r in recs:
                records[r["index"]] = r
        if not bool(seen.all()):
            raise ArtifactError(f"collect: {int((~seen).sum())} edits have no neuron after the merge")
        for i, rec in enumerate(records):
            if rec["id"] != self.prepared.edits[i].id:
                raise ArtifactError(f"collect: shard row {i} holds edit {rec['id']}, expected "
                                    f"{self.prepared.edits[i].id}; the shards belong to another prepare run")
        return weights, success, records

    def _report(self, per_rank: list[dict], weights: torch.Tensor, success: torch.Tensor, records: list[dict]) -> dict:
        """Success, cost and memory of the whole run (every rank), before the transfer diagnostic."""
        n = len(records)
        wall = time.time() - self._created  # model loading included
        collect_seconds = max(r["collect_seconds"] for r in per_rank)  # includes the greedy verification
        n_new = sum(r["edits_collected"] for r in per_rank)
        steps = [r["steps"] for r in records]
        return {
            "n_edits": n, "success_rate": round(float(success.float().mean()), 4),
            "n_failed": int(n - int(success.sum())),
            "drop_failed": self.hparams.drop_failed,
            "teacher_forced_success_rate": round(sum(r["tf_success"] for r in records) / n, 4),
            "reached_margin_rate": round(sum(r.get("reached_margin", True) for r in records) / n, 4),
            "steps_mean": round(sum(steps) / n, 2), "steps_max": max(steps),
            "edits_collected_this_run": n_new,
            "edits_per_second": round(n_new / collect_seconds, 3) if n_new and collect_seconds > 0 else None,
            "collect_wall_seconds": round(collect_seconds, 1),
            "verify_seconds": round(max(r["verify_seconds"] for r in per_rank), 1),
            "stage_wall_seconds": round(wall, 1),
            "world_size": len(per_rank),
            "peak_rss_mib_per_rank": [r["peak_rss_mib"] for r in per_rank],
            "peak_cache_mib_per_rank": [r["peak_cache_mib"] for r in per_rank],
            "per_rank": per_rank,
            "prefixes": self.prefixes,
            "relation_views": {"per_edit": self.hparams.relation_views,
                               "edits_with_any": sum(bool(v) for v in self.extra_views),
                               "total": sum(len(v) for v in self.extra_views)},
            "weights_norm_mean": round(float(weights.norm(dim=1).mean()), 4),
        }

    def _print_summary(self, report: dict) -> None:
        n = report["n_edits"]
        tr = report.get("transfer", {})
        print(f"collect: {n} edits, success {report['success_rate']:.2%} ({report['n_failed']} failed), "
              f"{report['edits_per_second']} edits/s, mean {report['steps_mean']} steps; paraphrase transfer "
              f"{tr.get('configured', {}).get('paraphrase_exact', 'n/a')} (prompt-only "
              f"{tr.get('prompt_only', {}).get('paraphrase_exact', 'n/a')}) -> {self.out_dir}")

    def transfer_diagnostic(self) -> dict:
        """Neurons for sampled pseudo-edits: how often do they carry over to those records' paraphrases?"""
        try:
            sample = sample_pseudo(self.prepared.pseudo_edits, self.hparams.transfer_n, self.hparams.transfer_seed)
        except ValueError as exc:
            return {"error": str(exc)}
        # The sample's relation views are lent by the other pseudo edits and never equal a sampled paraphrase.
        sampled = {r.id for r in sample}
        guard = LeakGuard(evaluation_texts(self.prepared.edits) + evaluation_texts(sample))
        extra = relation_views(sample, [r for r in self.prepared.pseudo_edits if r.id not in sampled],
                               self.hparams.relation_views, guard)
        results: list[CollectResult] = []
        out = {"n_pseudo_edits": len(sample),
               "configured": measure_transfer(self.lm, self.tokenizer, self.spec, self.neuron, sample, self.options,
                                              self.prefixes, extra_views=extra, keep=results)}
        save_pseudo_neurons(self.out_dir, [r.id for r in sample], torch.stack([r.weights for r in results]),
                            torch.tensor([r.success for r in results]))
        opts = self.options
        if self.hparams.transfer_compare and (self.prefixes or opts.stop_margin or any(extra) or
                                              opts.key_init != "last" or opts.stop_rule != "pass"):
            out["prompt_only"] = measure_transfer(self.lm, self.tokenizer, self.spec, self.neuron, sample,
                                                  self.options, [], stop_margin=0.0, key_init="last", stop_rule="pass")
        return out
