"""Score arithmetic, DDP-mergeable metric state, the results table, and the FT baseline's MLP swap."""

from __future__ import annotations

import pytest
import torch

from megedit.evaluate.metrics import harmonic_mean, make_metrics, metric_names, summarise
from megedit.evaluate.report import results_table


def test_harmonic_mean_matches_the_paper_score():
    # Paper, ZsRE / Phi-2 / 1024: Rel 99.61/99.49, Gen 80.37/87.24, Loc 88.67/95.75 -> Score 91.30
    assert harmonic_mean([99.61, 99.49, 80.37, 87.24, 88.67, 95.75]) == pytest.approx(91.30, abs=0.01)
    assert harmonic_mean([50.0, 0.0, 90.0]) == 0.0


def test_metrics_merge_like_ddp_ranks():
    a, b = make_metrics(["meg"]), make_metrics(["meg"])
    for m, vals in ((a, [1.0, 0.0]), (b, [1.0, 1.0])):
        for v in vals:
            for name in metric_names():
                m[f"meg__{name}"].update(torch.tensor(v))
            for g in ("rel", "gen", "loc"):
                m[f"meg__familiar_{g}"].update(torch.tensor(v))
    for name in a:  # what sync_dist does across ranks: merge the running sums and counts
        a[name].merge_state(b[name])
    out = summarise(a, ["meg"])["meg"]
    assert out["rel_tf"] == pytest.approx(75.0) and out["score"] == pytest.approx(75.0)
    assert out["routing_familiar"]["loc"] == pytest.approx(75.0)


def test_results_table_has_every_metric_and_the_protocol():
    row = {n: 50.0 for n in metric_names()} | {"score": 50.0, "routing_familiar": {"rel": 100.0, "gen": 90.0, "loc": 3.0}}
    summary = {"lineage": {"model": "m", "dataset": "d"},
               "metric_meta": {"n_edits": 4, "ag_protocol": "official", "ag": "x", "tf": "y", "locality_reference": "z",
                               "score": "hm", "sampler": "ddim", "steps": 50, "router_threshold": 0.3, "items": {}},
               "results": {"meg": row, "ft": row}}
    text = results_table(summary)
    assert "| MeG | 50.00 |" in text and "| FT |" in text and "`official`" in text


def test_ft_baseline_changes_only_the_edit_layer_and_restores_it(tiny_llama):
    from megedit.baselines.ft import finetune_mlp, swapped_mlp

    model, spec = tiny_llama

    class Tok:  # the smallest tokenizer target_batch needs: ids from characters
        pad_token_id, eos_token_id = 0, 1

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [3 + (ord(c) % 100) for c in text]}

    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = finetune_mlp(model, Tok(), spec, ["ab", "cd"], ["x", "y"], epochs=3, lr=1e-2, batch_size=2, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert res["losses"][-1] < res["losses"][0]
    with swapped_mlp(model, spec, res["state"]):
        changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed and all(k.startswith(f"model.layers.{spec.edit_layer}.mlp.") for k in changed)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
