"""Metric bookkeeping for the evaluate stage: torchmetrics means (DDP-synced) and the Score."""

from __future__ import annotations

import math

import torch
from torchmetrics import MeanMetric

GROUPS = ("reliability", "generality", "locality")
MODES = ("tf", "ag")
SHORT = {"reliability": "rel", "generality": "gen", "locality": "loc"}


def metric_names() -> list[str]:
    return [f"{SHORT[g]}_{m}" for g in GROUPS for m in MODES]


def make_metrics(variants) -> torch.nn.ModuleDict:
    """One MeanMetric per (variant, metric), plus the routing rate per (variant, group)."""
    names = {}
    for v in variants:
        for name in metric_names():
            names[f"{v}__{name}"] = MeanMetric()
        for g in GROUPS:
            names[f"{v}__familiar_{SHORT[g]}"] = MeanMetric()
    return torch.nn.ModuleDict(names)


def harmonic_mean(values) -> float:
    """The paper's Score: the harmonic mean of the six metrics (0 if any is 0)."""
    values = list(values)
    if any(v <= 0 for v in values):
        return 0.0
    return len(values) / sum(1.0 / v for v in values)


def summarise(metrics: torch.nn.ModuleDict, variants) -> dict:
    """``{variant: {rel_tf, ..., loc_ag, score, routing: {...}}}`` in percent."""
    out = {}
    for v in variants:
        row = {}
        for name in metric_names():
            val = metrics[f"{v}__{name}"].compute().item()
            row[name] = round(100.0 * val, 2) if not math.isnan(val) else None
        six = [row[n] for n in metric_names()]
        row["score"] = round(harmonic_mean(six), 2) if None not in six else None
        row["routing_familiar"] = {}
        for g in GROUPS:
            val = metrics[f"{v}__familiar_{SHORT[g]}"].compute().item()
            row["routing_familiar"][SHORT[g]] = round(100.0 * val, 2) if not math.isnan(val) else None
        out[v] = row
    return out


def locality_breakdown(rows: list[dict], results: dict) -> dict:
    """Locality per kind of prompt (see ``megedit.data.locality_kinds``), from per-example rows.

    ``results`` is :func:`summarise`'s output (Reliability and Generality come from it).
    ``{variant: {"by_kind": {kind: {n, loc_tf, loc_ag, familiar}}, "excluding_restatements": {...}}}``
    in percent. A ``restates_edit`` prompt asks the edited fact again (ZsRE's KnowEdit prompts), so an
    edit that generalises *must* change its answer; ``excluding_restatements`` gives Locality and the
    Score without them, beside the paper's Score that counts them.
    """
    out = {}
    for v, row in results.items():
        loc = [r for r in rows if r["variant"] == v and r["group"] == "locality"]
        by_kind = {}
        for kind in sorted({r["locality_kind"] for r in loc}):
            part = [r for r in loc if r["locality_kind"] == kind]
            by_kind[kind] = _locality_rates(part)
        entry = {"by_kind": by_kind}
        if "restates_edit" in by_kind:
            kept = _locality_rates([r for r in loc if r["locality_kind"] != "restates_edit"])
            six = [row[n] for n in metric_names() if not n.startswith("loc")] + [kept["loc_tf"], kept["loc_ag"]]
            kept["score"] = round(harmonic_mean(six), 2) if None not in six else None
            entry["excluding_restatements"] = kept
        out[v] = entry
    return out


def _locality_rates(rows: list[dict]) -> dict:
    n = len(rows)

    def pct(values) -> float | None:
        return round(100.0 * sum(values) / n, 2) if n else None

    return {"n": n, "loc_tf": pct([r["tf"] for r in rows]), "loc_ag": pct([float(r["ag"]) for r in rows]),
            "familiar": pct([float(r["familiar"]) for r in rows])}



def multi_hop_summary(rows: list[dict], variants) -> dict:
    """MQuAKE's measures per variant, from per-example rows, in percent (empty when no row is multi-hop):
    ``multi_hop_question`` (each question right), ``multi_hop_instance`` (any of an instance's questions
    right, MQuAKE's multi-hop accuracy), ``edit_wise`` (each atomic rewrite's prompt right, AG) and
    ``instance_wise`` (every atom of an instance right), as in the paper's Table 18; plus the multi-hop
    questions' TF and routed-familiar rate."""
    if not any(r["group"] == "multi_hop" for r in rows):
        return {}
    out = {}
    for v in variants:
        hops = [r for r in rows if r["variant"] == v and r["group"] == "multi_hop"]
        atoms = [r for r in rows if r["variant"] == v and r["group"] == "reliability"]
        out[v] = {"n_questions": len(hops), "n_instances": len({r["edit"] for r in hops}),
                  "multi_hop_question": _pct([float(r["ag"]) for r in hops]),
                  "multi_hop_instance": _pct(_per_edit(hops, any)),
                  "multi_hop_tf": _pct([r["tf"] for r in hops]),
                  "multi_hop_familiar": _pct([float(r["familiar"]) for r in hops]),
                  "edit_wise": _pct([float(r["ag"]) for r in atoms]),
                  "instance_wise": _pct(_per_edit(atoms, all))}
    return out


def _per_edit(rows: list[dict], combine) -> list[float]:
    by_edit: dict[int, list[bool]] = {}
    for r in rows:
        by_edit.setdefault(r["edit"], []).append(bool(r["ag"]))
    return [float(combine(hits)) for hits in by_edit.values()]


def _pct(values: list[float]) -> float | None:
    return round(100.0 * sum(values) / len(values), 2) if values else None
