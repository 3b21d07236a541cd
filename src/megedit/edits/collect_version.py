"""The collect artifact of a run version that adds edits: the new edits' neurons, collected with the
parent's recipe, beside the parent's neurons of the edits it keeps.

The recipe is the parent collect manifest's: the engine's options (``CollectOptions``), the context prefixes
it recorded, the number of relation views (lent by the version's pseudo edits, never an evaluation text of
any edit of the version) and whether greedy decoding verifies each neuron. The neurons go through
``megedit.collect.engine.collect``, the refill-queue optimiser the stage runs, and ``greedy_verified`` and
``per_edit_record`` of the stage. The pseudo-edit neurons (the transfer diagnostic's, which the generator
also learns) are the parent's, less those of pseudo edits the version dropped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from megedit.artifacts import (ArtifactError, atomic_path, atomic_write_json, atomic_write_jsonl, mark_stage_start,
                               read_jsonl, sha256_json, write_manifest)
from megedit.collect.artifact import FILES, PSEUDO_FILE, load_collected, load_pseudo_neurons, save_pseudo_neurons
from megedit.collect.collect_module import greedy_verified, per_edit_record
from megedit.collect.engine import CollectOptions, collect
from megedit.collect.views import LeakGuard, collect_item, evaluation_texts, relation_views
from megedit.components.neuron import DynamicNeuron
from megedit.prepare.artifact import Prepared


def collect_new(lm, tokenizer, prepared: Prepared, first_new: int, parent_manifest: dict) -> tuple[torch.Tensor, list[dict]]:
    """Neurons ``[n_new, D]`` and ``per_edit.jsonl`` rows for the edits ``first_new..`` of ``prepared``."""
    cfg = parent_manifest["config"]["model"]
    options = CollectOptions(**cfg["options"])
    spec, edits = prepared.spec, prepared.edits
    new = edits[first_new:]
    prefixes = parent_manifest.get("prefixes", [])
    views = [[] for _ in new]
    if cfg.get("relation_views"):
        views = relation_views(new, prepared.pseudo_edits, cfg["relation_views"], LeakGuard(evaluation_texts(edits)))
    items = [collect_item(first_new + k, e, spec.format_prompt, prefixes, v) for k, (e, v) in enumerate(zip(new, views))]
    neuron = DynamicNeuron(lm, spec)
    results = collect(lm, tokenizer, spec, items, options, neuron=neuron)
    weights = torch.stack([r.weights for r in results]).float()
    success = torch.tensor([r.success for r in results])
    if cfg.get("verify", True):
        device = next(lm.parameters()).device
        success &= greedy_verified(lm, tokenizer, neuron, spec, new, weights.to(device)).cpu()
    records = [per_edit_record(r.key, edits[r.key].id, r, bool(ok), 0, v)
               for r, ok, v in zip(results, success.tolist(), views)]
    return weights, records


def write_collect_version(out: Path, parent_collect: Path, prepared: Prepared, new_weights: torch.Tensor,
                          new_records: list[dict], seconds: float, version: int) -> None:
    """The version's collect artifact: the parent's neurons of kept edits, then the new ones (manifest last)."""
    mark_stage_start()
    out.mkdir(parents=True, exist_ok=True)
    weights, success, manifest = load_collected(parent_collect)
    parent_rows = read_jsonl(parent_collect / FILES["per_edit"])
    row_of = {r["id"]: i for i, r in enumerate(parent_rows)}
    first_new = len(prepared.edits) - len(new_records)
    kept = [row_of.get(e.id) for e in prepared.edits[:first_new]]
    if None in kept:
        missing = [e.id for e, i in zip(prepared.edits, kept) if i is None]
        raise ArtifactError(f"{parent_collect}: no neuron for edits {missing[:5]} of the parent version")
    index = torch.tensor(kept, dtype=torch.long)
    all_weights = torch.cat([weights[index], new_weights])
    all_success = torch.cat([success[index], torch.tensor([r["success"] for r in new_records])]).to(torch.uint8)
    rows = [{**parent_rows[i], "index": k} for k, i in enumerate(kept)] + new_records
    with atomic_path(out / FILES["neurons"]) as tmp:
        save_file({"weights": all_weights.contiguous(), "success": all_success}, str(tmp))
    atomic_write_jsonl(out / FILES["per_edit"], rows)
    outputs = list(FILES.values()) + _carry_pseudo_neurons(parent_collect, out, prepared)
    parent_report = json.loads((parent_collect / FILES["report"]).read_text())
    n_new = len(new_records)
    report = {"version": version, "n_edits": len(rows), "success_rate": round(float(all_success.float().mean()), 4),
              "n_failed": int(len(rows) - int(all_success.sum())), "drop_failed": manifest["config"]["model"].get("drop_failed", True),
              "new_edits": {"n": n_new, "success_rate": round(sum(r["success"] for r in new_records) / n_new, 4),
                            "steps_mean": round(sum(r["steps"] for r in new_records) / n_new, 2),
                            "collect_seconds": round(seconds, 1)},
              "parent_collect": str(parent_collect), "parent_report": parent_report}
    atomic_write_json(out / FILES["report"], report)
    write_manifest(out, "collect", prepared.lineage, config=manifest["config"], outputs=outputs,
                   upstream={"prepare": prepared.dir},
                   extra={"n_edits": len(rows), "neuron_dim": int(all_weights.shape[1]),
                          "model_spec": manifest["model_spec"], "prefixes": manifest.get("prefixes", []),
                          "fingerprint": sha256_json({"parent": manifest.get("fingerprint"), "version": version,
                                                      "new": [r["id"] for r in new_records]})[:16]})


def _carry_pseudo_neurons(parent_collect: Path, out: Path, prepared: Prepared) -> list[str]:
    """Copy the parent's pseudo-edit neurons of the pseudo edits this version kept; the files written."""
    got = load_pseudo_neurons(parent_collect)
    if got is None:
        return []
    ids, weights, success = got
    present = {r.id for r in prepared.pseudo_edits}
    keep = [k for k, i in enumerate(ids) if i in present]
    if not keep:
        return []
    save_pseudo_neurons(out, [ids[k] for k in keep], weights[keep], success[keep])
    return [PSEUDO_FILE]
