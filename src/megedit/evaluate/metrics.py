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
