"""Score arithmetic, DDP-mergeable metric state, the results table, and the FT baseline's MLP swap."""

from __future__ import annotations

import pytest
import torch

from megedit.evaluate.metrics import harmonic_mean, locality_breakdown, make_metrics, metric_names, summarise
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


def _loc_row(kind: str, tf: float, ag: bool, familiar: bool) -> dict:
    return {"variant": "meg", "group": "locality", "locality_kind": kind, "tf": tf, "ag": ag, "familiar": familiar}


def test_locality_breakdown_per_kind_and_score_without_restatements():
    rows = [_loc_row("other", 1.0, True, False), _loc_row("other", 0.5, False, False),
            _loc_row("same_subject", 1.0, True, True), _loc_row("restates_edit", 0.0, False, True),
            {"variant": "meg", "group": "reliability", "locality_kind": None, "tf": 1.0, "ag": True, "familiar": True}]
    results = {"meg": {"rel_tf": 80.0, "rel_ag": 80.0, "gen_tf": 40.0, "gen_ag": 40.0, "loc_tf": 62.5, "loc_ag": 50.0}}
    out = locality_breakdown(rows, results)["meg"]
    assert out["by_kind"]["other"] == {"n": 2, "loc_tf": 75.0, "loc_ag": 50.0, "familiar": 0.0}
    assert out["by_kind"]["same_subject"] == {"n": 1, "loc_tf": 100.0, "loc_ag": 100.0, "familiar": 100.0}
    assert out["by_kind"]["restates_edit"]["n"] == 1
    kept = out["excluding_restatements"]
    # Three prompts left: TF (1 + 0.5 + 1) / 3, AG 2 of 3; the Score swaps only the two Locality numbers.
    assert kept["loc_tf"] == pytest.approx(83.33) and kept["loc_ag"] == pytest.approx(66.67)
    assert kept["score"] == pytest.approx(harmonic_mean([80, 80, 40, 40, 250 / 3, 200 / 3]), abs=0.01)
    # Without restatements among the prompts there is nothing to exclude.
    assert "excluding_restatements" not in locality_breakdown(rows[:3], results)["meg"]


def test_results_table_splits_locality_by_kind_only_when_there_are_kinds():
    row = {n: 50.0 for n in metric_names()} | {"score": 50.0, "routing_familiar": {"rel": 100.0, "gen": 90.0, "loc": 3.0}}
    meta = {"n_edits": 4, "ag_protocol": "official", "ag": "x", "tf": "y", "locality_reference": "z",
            "score": "hm", "sampler": "ddim", "steps": 50, "router_threshold": 0.3, "items": {}}
    rates = {"n": 2, "loc_tf": 75.0, "loc_ag": 50.0, "familiar": 0.0}
    plain = row | {"locality": {"by_kind": {"other": rates}}}
    text = results_table({"lineage": {"model": "m", "dataset": "d"}, "metric_meta": meta, "results": {"meg": plain}})
    assert "by kind" not in text
    split = row | {"locality": {"by_kind": {"other": rates, "restates_edit": rates | {"n": 1}},
                                "excluding_restatements": rates | {"score": 42.0}}}
    text = results_table({"lineage": {"model": "m", "dataset": "d"}, "metric_meta": meta, "results": {"meg": split}})
    assert "restates the edited fact (n=1)" in text and "| MeG | 50.00 / 75.00 / 0.00 |" in text and "**42.00**" in text


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


def test_ft_stops_at_its_reliability_target_and_names_its_weights(tiny_llama):
    from megedit.baselines.ft import finetune_mlp, named_mlp_weights, swapped_mlp
    from megedit.baselines.memit import swapped_weights

    model, spec = tiny_llama

    class Tok:
        pad_token_id, eos_token_id = 0, 1

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [3 + (ord(c) % 100) for c in text]}

    budget = finetune_mlp(model, Tok(), spec, ["ab", "cd"], ["x", "y"], epochs=3, lr=1e-2, batch_size=2,
                          target_reliability=None, progress=False)
    assert budget["epochs"] == 3 and budget["reliability"] == [] and not budget["reached"]
    # A target of 0 is met after the first epoch, whatever was learnt; 1.01 never is.
    met = finetune_mlp(model, Tok(), spec, ["ab", "cd"], ["x", "y"], epochs=5, lr=1e-2, batch_size=2,
                       target_reliability=0.0, progress=False)
    assert met["epochs"] == 1 and met["reached"] and len(met["reliability"]) == 1
    never = finetune_mlp(model, Tok(), spec, ["ab", "cd"], ["x", "y"], epochs=4, lr=1e-2, batch_size=2,
                         target_reliability=1.01, progress=False)
    assert never["epochs"] == 4 and not never["reached"] and all(0 <= r <= 1 for r in never["reliability"])
    named = named_mlp_weights(model, spec, never["state"])
    assert named and all(k.startswith(f"model.layers.{spec.edit_layer}.mlp.") for k in named)
    with swapped_mlp(model, spec, never["state"]):
        want = {k: v.clone() for k, v in model.state_dict().items()}
    with swapped_weights(model, named):
        assert all(torch.equal(want[k], v) for k, v in model.state_dict().items())


def test_teacher_forced_exact_match_is_greedy_exact_match(tiny_llama):
    """The evaluate stage scores AG (target_length) from its teacher-forced pass: greedy decoding of the
    target's length reproduces the target iff every target token is the argmax after the target's own
    prefix. Checked against real generation, with neurons attached, on targets that are the greedy answer
    itself, that differ from it at one token, and that are random."""
    from megedit.components.neuron import DynamicNeuron
    from megedit.scoring import greedy_tokens, teacher_forced_ids

    model, spec = tiny_llama
    model.generation_config.pad_token_id = 0

    class Tok:
        pad_token_id, eos_token_id = 0, 1

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": [3 + (ord(c) % 100) for c in text]}

    prompts = [f"q{i} {'ab' * (i % 3)} x" for i in range(12)]
    neuron = DynamicNeuron(model, spec)
    weights = torch.randn(len(prompts), spec.neuron_dim) * 0.5
    greedy = greedy_tokens(model, Tok(), neuron, prompts, weights, 4, 4)
    g = torch.Generator().manual_seed(0)
    targets = []
    for i, out in enumerate(greedy):
        if i % 3 == 0:
            targets.append(out)  # the answer itself
        elif i % 3 == 1:
            targets.append(out[:2] + [(out[2] + 7) % 128 + 2] + out[3:])  # wrong third token
        else:
            targets.append(torch.randint(2, 128, (3,), generator=g).tolist())
    forced = teacher_forced_ids(model, Tok(), neuron, prompts, targets, weights, batch_size=5)
    generated = greedy_tokens(model, Tok(), neuron, prompts, weights, [len(t) for t in targets], 4)
    assert forced["exact"].tolist() == [gen == t for gen, t in zip(generated, targets)]
    assert forced["exact"][::3].all() and not forced["exact"][1::3].any()
    for gen, t, prefix in zip(generated, targets, forced["greedy"]):
        assert gen[:len(prefix)] == prefix  # greedy's own tokens up to its first wrong one


def test_saved_peer_weights_are_reused_only_with_the_same_settings(tmp_path):
    from types import SimpleNamespace

    from megedit.evaluate.artifact import peer_file, save_peer_weights
    from megedit.evaluate.evaluate_module import EvaluateModule

    module = EvaluateModule(out_dir=str(tmp_path), variants=["meg", "ft"])
    module.edited = SimpleNamespace(prepared=SimpleNamespace(lineage={"model": "m"}))
    w = {"model.layers.1.mlp.down_proj.weight": torch.randn(3, 2)}
    save_peer_weights(peer_file(tmp_path / "peers", "ft"), "ft", w, {"model": "m"}, 4,
                      {"epochs": 2, "seconds": 7.5}, module._peer_options("ft"))
    reused = module._saved_peers(["ft"], 4)
    assert torch.equal(reused["ft"].weights["model.layers.1.mlp.down_proj.weight"], w["model.layers.1.mlp.down_proj.weight"])
    assert reused["ft"].seconds == 7.5 and reused["ft"].account["epochs"] == 2
    assert module._saved_peers(["ft"], 5) == {}  # another edit count
    module.hparams.ft_lr = module.hparams.ft_lr * 2
    assert module._saved_peers(["ft"], 4) == {}  # another setting: edited again


def test_results_written_and_read_back(tmp_path):
    from megedit.evaluate.artifact import OUTPUTS, read_results, report_files, results_file, write_results

    row = {m: 50.0 for m in metric_names()} | {"score": 50.0, "routing_familiar": {"rel": 100.0, "gen": 90.0, "loc": 3.0}}
    summary = {"lineage": {"model": "m", "dataset": "d"},
               "metric_meta": {"n_edits": 2, "ag_protocol": "official", "ag": "x", "tf": "y", "locality_reference": "z",
                               "score": "hm", "sampler": "ddim", "steps": 50, "router_threshold": 0.3, "items": {}},
               "results": {"meg": row}}
    write_results(tmp_path, summary, [{"key": 0, "variant": "meg"}])
    assert all((tmp_path / name).is_file() for name in OUTPUTS)
    assert read_results(tmp_path) == summary == read_results(results_file(tmp_path))
    assert [p.name for p in report_files(tmp_path)] == ["results.json", "results.md", "results.png"]
    with pytest.raises(FileNotFoundError, match="no results.json"):
        read_results(tmp_path / "elsewhere")


def test_method_seconds_sums_meg_stages_only_when_each_is_known():
    from types import SimpleNamespace

    from megedit.evaluate.evaluate_module import method_seconds

    peers = {"ft": SimpleNamespace(seconds=7.0)}
    out = method_seconds(["meg", "ft"], {"meg": 1.04, "ft": 2.0}, peers, {"encoder": 10.0, "diffusion": 5.02})
    assert out == {"meg": {"edit": 15.0, "evaluate": 1.0}, "ft": {"edit": 7.0, "evaluate": 2.0},
                   "meg_stages": {"encoder": 10.0, "diffusion": 5.02}}
    assert method_seconds(["meg"], {"meg": 0.0}, {}, {"encoder": None})["meg"]["edit"] is None


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_ft_on_cached_lower_layers_scores_as_the_full_model(fixture, request):
    """FT trains on the layer split: its loss and reliability equal the full model's teacher forcing."""
    from megedit.baselines import ft
    from megedit.layer_split import LayerSplit
    from megedit.loading import edit_mlp
    from megedit.scoring import target_batch, teacher_forced
    from test_collect_neuron import _ToyTokenizer

    model, spec = request.getfixturevalue(fixture)
    tok = _ToyTokenizer()
    prompts = ["5 9 3", "7 2 8 4 6 10", "11 12", "3 3 3 3", "9"]
    targets = ["40 41", "50", "60 61 62", "70", "80 81"]
    split = LayerSplit(model, spec)
    edits = ft._lower_cache(split, tok, prompts, targets, batch_size=2, device=torch.device("cpu"))
    b = target_batch(tok, prompts, targets)
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"]).logits
    full = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(), ignore_index=-100)
    batch = ft._batch(edits, torch.device("cpu"))
    got = torch.nn.functional.cross_entropy(ft._target_logits(split, batch), batch.labels)
    assert torch.allclose(got, full, atol=1e-5)
    # the MLP's gradient through the upper half equals the full model's
    params = list(edit_mlp(model, spec).parameters())
    for p in params:
        p.requires_grad_(True)
    try:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                       position_ids=b["position_ids"]).logits
        full = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(),
                                                 ignore_index=-100)
        got = torch.nn.functional.cross_entropy(ft._target_logits(split, batch), batch.labels)
        for want_grad, got_grad in zip(torch.autograd.grad(full, params), torch.autograd.grad(got, params)):
            assert torch.allclose(got_grad, want_grad, atol=1e-5)
    finally:
        for p in params:
            p.requires_grad_(False)
    # plant the model's own next token as two one-token targets, so reliability is neither 0 nor 1
    pred = logits[:, :-1].argmax(-1)
    easy = {i: str(int(pred[i][b["target_mask"][i, 1:]][0])) for i in (1, 3)}
    targets = [easy.get(i, t) for i, t in enumerate(targets)]
    edits = ft._lower_cache(split, tok, prompts, targets, batch_size=2, device=torch.device("cpu"))
    want = teacher_forced(model, tok, None, prompts, targets)["exact"].float().mean().item()
    assert ft._reliability(split, edits, batch_size=2, device=torch.device("cpu")) == pytest.approx(want)
    assert want >= 0.4
