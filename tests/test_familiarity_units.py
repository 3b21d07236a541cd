"""Familiarity units: the net separates seen from unseen points, AUROC/threshold helpers, router loading."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from megedit.artifacts import ArtifactError, atomic_write_json, write_manifest
from megedit.components.familiarity_net import FamiliarityNet, FamiliarityRouter, entropy_from_logits
from megedit.familiarity.familiarity_module import random_labels, router_loss
from megedit.familiarity.artifact import load_router
from megedit.familiarity.router import auroc, choose_threshold


def _train(net, x, y, max_epochs=200):
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(max_epochs):
        for idx in torch.randperm(len(x)).split(64):
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            logits = net(x)
        if (logits.argmax(-1) == y).all() and entropy_from_logits(logits).mean() < 0.01:
            return
    raise AssertionError("the familiarity net did not memorise 256 random labels")


def test_familiarity_net_separates_seen_and_neighbours_from_unseen(one_thread):
    torch.manual_seed(0)
    n, d = 256, 64
    seen = F.normalize(torch.randn(n, d), dim=-1)
    neighbours = F.normalize(seen + 0.03 * torch.randn(n, d), dim=-1)  # "paraphrases"
    unseen = F.normalize(torch.randn(1000, d), dim=-1)
    net = FamiliarityNet(d, num_classes=10, depth=5, hidden_mult=4)
    _train(net, seen, random_labels(n, 10, 0))
    router = FamiliarityRouter(net, threshold=0.1)
    e_seen, e_near, e_unseen = router.entropy(seen), router.entropy(neighbours), router.entropy(unseen)
    assert e_seen.max() < 0.1
    assert e_unseen.median() > 10 * e_near.median()
    assert auroc(-e_near, -e_unseen) > 0.95
    assert router.is_familiar(seen).all()
    assert router.is_familiar(unseen).float().mean() < 0.2
    assert ((e_unseen >= 0) & (e_unseen <= math.log(10) + 1e-5)).all()


def _fit_synthetic_router(seen, labels, negatives=None, shifts=None, steps=300):
    """The router on synthetic points: ``router_loss`` with a fresh draw of negatives / shifts per step."""
    torch.manual_seed(1)
    net = FamiliarityNet(seen.shape[1], num_classes=10, depth=2, hidden_mult=4)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(steps):
        neg = negatives[torch.randint(len(negatives), (len(seen),))] if negatives is not None else None
        shift = shifts[torch.randint(len(shifts), (len(seen),))] if shifts is not None else None
        loss, parts = router_loss(net, seen, labels, neg, shifts=shift)
        assert ("negative_kl" in parts) == (neg is not None) and ("shift_ce" in parts) == (shift is not None)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (net(seen).argmax(-1) == labels).all()
    return FamiliarityRouter(net, threshold=0.1)


def test_training_negatives_sharpen_the_familiar_region(one_thread):
    """Hard negatives (near a memorised point, farther than its paraphrases) end up above the
    paraphrases' entropy far more often when the router also learns a uniform output on
    other draws of such negatives."""
    torch.manual_seed(0)
    n, d = 128, 32
    seen = F.normalize(torch.randn(n, d), dim=-1)
    near = lambda scale: F.normalize(seen + scale * torch.randn(n, d), dim=-1)  # noqa: E731
    paraphrases, hard_eval = near(0.1), near(0.6)
    hard_train = torch.cat([near(0.6) for _ in range(4)])
    labels = random_labels(n, 10, 0)
    aurocs = {}
    for use_negatives in (False, True):
        router = _fit_synthetic_router(seen, labels, negatives=hard_train if use_negatives else None)
        aurocs[use_negatives] = auroc(-router.entropy(paraphrases), -router.entropy(hard_eval))
    assert aurocs[True] > 0.9
    assert aurocs[True] > aurocs[False] + 0.05, aurocs


def test_paraphrase_shifts_widen_the_familiar_basin_along_paraphrase_directions(one_thread):
    """Paraphrases move a prompt along a few directions; displacements of *other* pairs along them teach the
    router to stay familiar there, while negatives as far away in other directions stay unfamiliar."""
    torch.manual_seed(0)
    n, d, r = 128, 32, 3
    basis = torch.linalg.qr(torch.randn(d, r)).Q.T  # the paraphrase subspace [r, d]
    seen = F.normalize(torch.randn(n, d), dim=-1)
    along = lambda m: 0.5 * F.normalize(torch.randn(m, r), dim=-1) @ basis  # noqa: E731
    def off(m):  # directions orthogonal to the paraphrase subspace
        x = torch.randn(m, d)
        return 0.5 * F.normalize(x - (x @ basis.T) @ basis, dim=-1)

    paraphrases, hard_eval = F.normalize(seen + along(n), dim=-1), F.normalize(seen + off(n), dim=-1)
    shift_pool = along(512)  # displacements of other pairs, not of the scored paraphrases
    hard_train = F.normalize(seen.repeat(4, 1) + off(4 * n), dim=-1)
    labels = random_labels(n, 10, 0)
    aurocs = {}
    for use_shifts in (False, True):
        router = _fit_synthetic_router(seen, labels, negatives=hard_train, shifts=shift_pool if use_shifts else None)
        aurocs[use_shifts] = auroc(-router.entropy(paraphrases), -router.entropy(hard_eval))
    assert aurocs[True] > 0.9 and aurocs[True] > aurocs[False] + 0.1, aurocs


def test_router_loss_refuses_shifts_of_another_shape():
    net = FamiliarityNet(8, num_classes=4, depth=1)
    with pytest.raises(ValueError, match="must match the memorised batch"):
        router_loss(net, torch.randn(3, 8), torch.tensor([0, 1, 2]), shifts=torch.randn(2, 8))


def test_router_loss_kl_is_zero_for_uniform_output():
    net = FamiliarityNet(8, num_classes=4, depth=1)
    with torch.no_grad():
        net.head.weight.zero_()
        net.head.bias.zero_()
    _, parts = router_loss(net, torch.randn(3, 8), torch.tensor([0, 1, 2]), torch.randn(5, 8))
    assert abs(parts["negative_kl"].item()) < 1e-6


def test_entropy_from_logits_bounds():
    assert entropy_from_logits(torch.zeros(1, 10)).item() == pytest.approx(math.log(10), abs=1e-6)
    assert entropy_from_logits(torch.tensor([[100.0, 0, 0]])).item() < 1e-6


def test_net_rejects_wrong_embedding_size():
    with pytest.raises(ValueError, match="expects 16-dim"):
        FamiliarityNet(16)(torch.zeros(2, 8))


def test_random_labels_are_balanced_and_seeded():
    y = random_labels(1003, 10, 0)
    counts = torch.bincount(y, minlength=10)
    assert counts.min() >= 100 and counts.max() <= 101
    assert torch.equal(y, random_labels(1003, 10, 0)) and not torch.equal(y, random_labels(1003, 10, 1))


def test_auroc_matches_pairwise_count_with_ties():
    pos, neg = torch.tensor([3.0, 2.0, 2.0]), torch.tensor([2.0, 1.0])
    # pairs: (3>2),(3>1),(2=2 half),(2>1),(2=2 half),(2>1) -> 5/6
    assert auroc(pos, neg) == pytest.approx(5 / 6)
    assert auroc(torch.tensor([1.0]), torch.tensor([0.0])) == 1.0
    assert auroc(torch.tensor([]), neg) is None


def test_choose_threshold_rules():
    familiar = torch.tensor([0.01, 0.02, 0.05, 0.3])
    unfamiliar = torch.tensor([0.2, 0.6, 0.9, 1.2, 1.5])
    best = choose_threshold(familiar, unfamiliar, "balanced")
    # Best J: below 0.2 catches 3/4 familiar, 0 unfamiliar (J .75); below 0.45 catches 4/4 and 1/5 (J .8).
    assert 0.3 < best["threshold"] < 0.6 and best["familiar_rate"] == 1.0
    assert best["unfamiliar_routed_familiar_rate"] == pytest.approx(0.2)
    strict = choose_threshold(familiar, unfamiliar, "max_fpr", target_fpr=0.0)
    assert 0.05 < strict["threshold"] < 0.2 and strict["unfamiliar_routed_familiar_rate"] == 0.0
    with pytest.raises(ValueError, match="unknown calibration rule"):
        choose_threshold(familiar, unfamiliar, "nope")


def test_capped_rule_holds_the_budget_for_the_worst_kind_of_negative():
    familiar = torch.tensor([0.01, 0.02, 0.05, 0.3, 0.5])
    easy = torch.tensor([1.5, 1.6, 1.7, 1.8, 1.9, 2.0, 2.1, 2.2])  # unrelated prompts: far away
    hard = torch.tensor([0.1, 0.8, 0.9, 1.0])                     # same-relation prompts: close
    unfamiliar, kind = torch.cat([easy, hard]), torch.tensor([0] * 8 + [1] * 4)
    # Pooled, the hard kind is diluted: 1 of 12 negatives below 0.55 (8%), so balanced goes to 0.55.
    pooled = choose_threshold(familiar, unfamiliar, "balanced")
    assert 0.5 < pooled["threshold"] < 0.8 and pooled["familiar_rate"] == 1.0
    # Per kind, the hard kind's FPR is 25% there; J = 1 - .25 still wins, but a 10% budget forbids it.
    balanced = choose_threshold(familiar, unfamiliar, "balanced", unfamiliar_kind=kind, kind_names=["easy", "hard"],
                                min_kind_size=1)
    assert balanced["unfamiliar_routed_familiar_rate_by_kind"] == {"easy": 0.0, "hard": 0.25}
    capped = choose_threshold(familiar, unfamiliar, "capped", target_fpr=0.1, unfamiliar_kind=kind,
                              kind_names=["easy", "hard"], min_kind_size=1)
    assert 0.05 < capped["threshold"] < 0.1 and capped["unfamiliar_routed_familiar_rate"] == 0.0
    assert capped["familiar_rate"] == pytest.approx(0.6) and capped["n_unfamiliar_by_kind"] == {"easy": 8, "hard": 4}
    # When the budget does not bind, capped is balanced (max_fpr would spend the budget instead).
    loose = choose_threshold(familiar, unfamiliar, "capped", target_fpr=0.5, unfamiliar_kind=kind, min_kind_size=1)
    assert loose["threshold"] == balanced["threshold"]
    spent = choose_threshold(familiar, unfamiliar, "max_fpr", target_fpr=0.5, unfamiliar_kind=kind, min_kind_size=1)
    assert spent["threshold"] > loose["threshold"]
    # A kind too small to measure the budget only counts in the pooled rate (1 of 12 below 0.55).
    small = choose_threshold(familiar, unfamiliar, "capped", target_fpr=0.1, unfamiliar_kind=kind,
                             kind_names=["easy", "hard"], min_kind_size=5)
    assert small["kinds_budgeted"] == ["easy"] and small["threshold"] == pooled["threshold"]
    # A kind left out of the budget is not counted at all: with only the easy kind counted, every familiar
    # point gets in at no cost (the hard kind's rate is only reported).
    unbudgeted = choose_threshold(familiar, unfamiliar, "capped", target_fpr=0.1, unfamiliar_kind=kind,
                                  kind_names=["easy", "hard"], min_kind_size=1, budget_kinds=["easy"])
    assert unbudgeted["kinds_budgeted"] == ["easy"] and unbudgeted["unfamiliar_routed_familiar_rate"] == 0.0
    assert unbudgeted["familiar_rate"] == 1.0 and unbudgeted["unfamiliar_routed_familiar_rate_by_kind"]["hard"] > 0
    with pytest.raises(ValueError, match="shape"):
        choose_threshold(familiar, unfamiliar, unfamiliar_kind=kind[:3])
    with pytest.raises(ValueError, match="left out of the budget"):
        choose_threshold(familiar, unfamiliar, unfamiliar_kind=kind, min_kind_size=1, budget_kinds=[])


def _fake_encoder_dir(path, tag):
    path.mkdir(parents=True)
    atomic_write_json(path / "report.json", {"tag": tag})
    write_manifest(path, "encoder", {"run": "x"}, {"tag": tag}, ["report.json"])
    return path


def test_load_router_refuses_router_of_another_encoder_run(tmp_path):
    from safetensors.torch import save_file

    enc_a = _fake_encoder_dir(tmp_path / "enc_a", "a")
    enc_b = _fake_encoder_dir(tmp_path / "enc_b", "b")
    fam = tmp_path / "fam"
    fam.mkdir()
    net = FamiliarityNet(8, num_classes=4, depth=2, hidden_mult=2)
    save_file(net.state_dict(), str(fam / "router.safetensors"))
    (fam / "router.json").write_text(json.dumps({"architecture": net.config(), "K": 4, "threshold": 0.2}))
    write_manifest(fam, "familiarity", {"run": "x"}, {}, ["router.safetensors", "router.json"],
                   upstream={"encoder": enc_a})
    router = load_router(fam, encoder_dir=enc_a)
    assert router.threshold == 0.2 and router.entropy(torch.randn(3, 8)).shape == (3,)
    assert not any(p.requires_grad for p in router.parameters())
    with pytest.raises(ArtifactError, match="built from the 'encoder' artifact"):
        load_router(fam, encoder_dir=enc_b)
    # A tampered weights file is caught by the manifest hash.
    save_file(FamiliarityNet(8, num_classes=4, depth=2, hidden_mult=2).state_dict(), str(fam / "router.safetensors"))
    with pytest.raises(ArtifactError, match="sha256"):
        load_router(fam)


def test_training_negatives_grow_with_the_number_of_edits():
    from types import SimpleNamespace

    from megedit.familiarity.familiarity_datamodule import FamiliarityDataModule

    def count(n_edits, **kw):
        dm = FamiliarityDataModule(prepare_dir="p", encoder_dir="e", **kw)
        dm.prepared = SimpleNamespace(edits=[None] * n_edits)
        return dm.n_train_negatives

    assert count(256) == 4096 and count(1024) == 4096  # the floor
    assert count(4096) == 16384 and count(4096, negatives_per_edit=2.5) == 10240
    assert count(4096, train_negatives=0) == 0  # off means off (the paper's positives-only router)


def _entropies_artifact(folder, threshold, *, calibrate=True, kinds_tensor=True):
    """A familiarity folder holding only what ``megedit threshold`` reads (router.json, entropies, manifest)."""
    from safetensors.torch import save_file

    from megedit.familiarity.familiarity_datamodule import NEGATIVE_KINDS

    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    ent = {"main.edit_prompts": torch.rand(50, generator=g) * 0.01,
           "main.edit_paraphrases": torch.rand(50, generator=g) * 0.5,
           "main.locality": 0.3 + torch.rand(200, generator=g) * 2}
    if calibrate:
        ent |= {"calibration.calib_positives": torch.rand(120, generator=g) * 0.5,
                "calibration.calib_negatives": 0.2 + torch.rand(400, generator=g) * 2}
        if kinds_tensor:
            ent["calibration.negative_kind"] = torch.arange(400) % 2
    save_file(ent, str(folder / "entropies.safetensors"), metadata={"negative_kinds": ",".join(NEGATIVE_KINDS)})
    arch = {"in_dim": 8, "num_classes": 10, "depth": 1, "hidden_mult": 1, "width": 8}
    (folder / "router.json").write_text(json.dumps({"architecture": arch, "threshold": 0.25 if threshold == "auto"
                                                    else threshold, "threshold_source": "x"}))
    model = {"threshold": threshold, "calibration_rule": "capped", "target_fpr": 0.04,
             "budget_kinds": ["pseudo_irrelevant", "pseudo_locality"]}
    write_manifest(folder, "familiarity", {"run": "x"}, {"model": model}, ["router.json", "entropies.safetensors"])
    return ent


def test_threshold_command_reports_a_fixed_threshold_and_picks_only_when_asked(tmp_path, capsys):
    from megedit.familiarity.threshold import main

    ent = _entropies_artifact(tmp_path / "fixed", 0.1)
    assert main([str(tmp_path / "fixed"), "--json", str(tmp_path / "fixed.json")]) == 0
    fixed = json.loads((tmp_path / "fixed.json").read_text())
    assert fixed["threshold"] == 0.1 and "pick" not in fixed
    assert fixed["edits"]["edit_paraphrases_familiar"] == float((ent["main.edit_paraphrases"] < 0.1).float().mean())
    assert fixed["edits"]["locality_unfamiliar"] == float((ent["main.locality"] >= 0.1).float().mean())
    # Asked for a rule: it picks on the pseudo data exactly as choose_threshold does, and holds the budget.
    assert main([str(tmp_path / "fixed"), "--rule", "max_fpr", "--target-fpr", "0.02",
                 "--json", str(tmp_path / "picked.json")]) == 0
    picked = json.loads((tmp_path / "picked.json").read_text())
    want = choose_threshold(ent["calibration.calib_positives"], ent["calibration.calib_negatives"], "max_fpr", 0.02,
                            unfamiliar_kind=ent["calibration.negative_kind"],
                            kind_names=["pseudo_irrelevant", "pseudo_locality", "pseudo_same_subject"],
                            budget_kinds=["pseudo_irrelevant", "pseudo_locality"])
    assert picked["threshold"] == want["threshold"] and picked["pick"]["unfamiliar_routed_familiar_rate"] <= 0.02
    assert all(v >= 0.98 for v in picked["pseudo"]["negatives_unfamiliar_by_kind"].values())
    with pytest.raises(SystemExit, match="give one or the other"):
        main([str(tmp_path / "fixed"), "--threshold", "0.2", "--rule", "balanced"])


def test_threshold_command_refuses_what_it_cannot_pick_on(tmp_path):
    from megedit.familiarity.threshold import main

    _entropies_artifact(tmp_path / "nocal", 0.1, calibrate=False)
    assert main([str(tmp_path / "nocal")]) == 0  # the trained threshold can still be inspected
    with pytest.raises(SystemExit, match="trained without calibration data"):
        main([str(tmp_path / "nocal"), "--rule", "balanced"])
    _entropies_artifact(tmp_path / "nokind", "auto", kinds_tensor=False)
    with pytest.raises(ArtifactError, match="negative_kind"):
        main([str(tmp_path / "nokind")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        main([str(tmp_path / "empty")])


def test_threshold_report_lines_say_what_was_picked_and_warn_on_a_useless_threshold():
    from megedit.familiarity.threshold import report_lines

    result = {"threshold": 0.0, "threshold_source": "given (--threshold)", "trained_threshold": 0.25,
              "pseudo": {"paraphrases_familiar": 0.9, "negatives_unfamiliar_by_kind": {"pseudo_locality": 0.97}},
              "pick": {"kinds_budgeted": [], "unfamiliar_routed_familiar_rate": 0.03},
              "edits": {"edit_prompts_familiar": 1.0, "edit_paraphrases_familiar": None, "locality_unfamiliar": 0.95}}
    lines = report_lines("run/familiarity", result)
    assert lines[0] == "run/familiarity: threshold 0 (given (--threshold)); trained with 0.25"
    assert "warning" in lines[1] and lines[2].endswith("worst budgeted (pooled) routed familiar 0.030")
    assert lines[3] == "  edits (diagnostic): edit prompts familiar 1.000, locality unfamiliar 0.950"
    no_pseudo = report_lines("f", {**result, "threshold": 0.1, "pseudo": None})
    assert len(no_pseudo) == 3 and no_pseudo[-1].endswith("--model.router_threshold 0.1")


# ---------------------------------------------------------------- the artifact's files and the report's functions
def test_router_artifact_round_trip(tmp_path):
    """What the stage writes (``write_router_artifact``) is what the loaders read back, file for file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from megedit.familiarity.artifact import (CALIBRATION_WEIGHTS, ENTROPIES, load_entropies, load_router_states,
                                              read_report, read_router_config, write_router_artifact)
    from megedit.familiarity.familiarity_datamodule import NEGATIVE_KINDS
    from megedit.familiarity.report import entropies_file

    main, calib = FamiliarityNet(8, 4, 2, 2), FamiliarityNet(8, 4, 2, 2)
    ent = {"edit_prompts": torch.rand(3), "edit_paraphrases": torch.rand(4), "locality": torch.rand(5)}
    cal = {"calib_prompts": torch.rand(3), "calib_positives": torch.rand(4), "calib_negatives": torch.rand(6)}
    kind = torch.tensor([0, 1, 2, 0, 1, 2])
    cfg = {"architecture": main.config(), "K": 4, "threshold": 0.3}
    figs = plt.figure(), plt.figure()
    out = write_router_artifact(tmp_path, main, calib, entropies_file(ent, cal, kind), list(NEGATIVE_KINDS), cfg,
                                {"threshold": 0.3}, *figs)
    assert out[:2] == ["router.safetensors", CALIBRATION_WEIGHTS] and out[-1] == ENTROPIES
    assert all((tmp_path / name).is_file() for name in out)
    write_manifest(tmp_path, "familiarity", {"run": "x"}, {}, out)
    assert read_router_config(tmp_path) == cfg and read_report(tmp_path) == {"threshold": 0.3}
    got_cfg, main_state, calib_state = load_router_states(tmp_path)
    assert got_cfg == cfg
    assert all(torch.equal(calib_state[k], v) for k, v in calib.state_dict().items())
    assert all(torch.equal(main_state[k], v) for k, v in main.state_dict().items())
    tensors, kinds, _ = load_entropies(tmp_path)
    assert kinds == list(NEGATIVE_KINDS) and torch.equal(tensors["calibration.negative_kind"], kind)
    assert torch.equal(tensors["main.locality"], ent["locality"]) and len(tensors) == 7
    # Without a calibration router there is no calibration file, and the states say so.
    plain = tmp_path / "plain"
    out = write_router_artifact(plain, main, None, entropies_file(ent, None, None), list(NEGATIVE_KINDS), cfg, {},
                                *figs)
    write_manifest(plain, "familiarity", {"run": "x"}, {}, out)
    assert CALIBRATION_WEIGHTS not in out and load_router_states(plain)[2] is None


def test_report_functions():
    from megedit.familiarity.report import chosen_threshold, edit_routing, entropy_summary, shift_summary

    assert entropy_summary(torch.empty(0)) == {"n": 0}
    s = entropy_summary(torch.arange(101, dtype=torch.float))
    assert s["n"] == 101 and s["median"] == 50 and s["p05"] == 5 and s["mean"] == 50
    assert chosen_threshold("auto", {"threshold": 0.7}, "capped") == (0.7, "auto (capped on pseudo calibration data)")
    assert chosen_threshold(0.2, None, "capped") == (0.2, "fixed (config)")
    ent = {"edit_prompts": torch.tensor([0.1, 0.9]), "edit_paraphrases": torch.tensor([0.1, 0.2, 0.9, 0.9]),
           "locality": torch.tensor([0.1, 0.9, 0.9, 0.1])}
    r = edit_routing(ent, 0.5, ["other", "other", "same_subject", "restates_edit"])
    assert list(r) == ["rates", "locality_unfamiliar_by_kind", "n_locality_by_kind", "auroc", "entropy"]
    assert r["rates"] == {"edit_prompts_familiar": 0.5, "edit_paraphrases_familiar": 0.5, "locality_unfamiliar": 0.5,
                          "locality_unfamiliar_excluding_restatements": pytest.approx(2 / 3)}
    assert r["locality_unfamiliar_by_kind"] == {"other": 0.5, "same_subject": 1.0, "restates_edit": 0.0}
    assert r["n_locality_by_kind"] == {"other": 2, "same_subject": 1, "restates_edit": 1}
    assert shift_summary(None, 1.6, 1.0) == {"pairs": 0, "scale": 1.6, "weight": 1.0, "used": False}
    shifts = shift_summary(torch.tensor([[3.0, 4.0], [0.0, 1.0], [0.0, 2.0]]), 1.0, 0.0)
    assert shifts["pairs"] == 3 and not shifts["used"] and shifts["median_displacement_norm"] == 2.0


# ---------------------------------------------------------------- the calibration set's selection
def _pseudo(i, subject="s", locality=()):
    from types import SimpleNamespace

    return SimpleNamespace(id=f"p{i}", subject=subject, prompt=f"pseudo {i}", paraphrases=[f"para {i}"],
                           locality=[SimpleNamespace(prompt=t) for t in locality])


def test_selection_helpers():
    import random
    from types import SimpleNamespace

    from megedit.familiarity.familiarity_datamodule import (heldout_pseudo_groups, memorised_pseudo_prompts,
                                                            negative_kinds, neighbours_first,
                                                            split_off_train_negatives)

    assert neighbours_first(["a", "b", "c", "d"], {"c", "a"}) == ["a", "c", "b", "d"]
    edits = [_pseudo(0, "Paris", ["Paris is big", "Rome is old"]), _pseudo(1)]
    assert negative_kinds(["x", "Paris is big", "Rome is old"], {"x"}, edits).tolist() == [0, 2, 1]
    prep = SimpleNamespace(pseudo_edits=[_pseudo(i) for i in range(3)], pseudo_pairs=[
        {"anchor": "other 1", "positive": "o1", "group": "g1"}, {"anchor": "other 2", "positive": "o2", "group": "g2"},
        {"anchor": "other 3", "positive": "o3", "group": "g3"}],
        pseudo_irrelevant=[{"prompt": "other 2"}])
    with pytest.raises(ArtifactError, match="no held-out pseudo group"):
        heldout_pseudo_groups(prep, set(), where="enc")
    groups = heldout_pseudo_groups(prep, {"p0", "p1", "g1"}, where="enc")
    assert [g for g, _ in groups] == ["p0", "p1", "g1"]  # under 100: padded with the corpus's held-out groups
    # N = 4 memorised points from 3 groups: padded with a pseudo original that is neither memorised nor irrelevant.
    prompts, positives = memorised_pseudo_prompts(list(groups), prep, 4, 2, random.Random(0))
    assert len(prompts) == 4 and prompts[3] == "other 3" and len(positives) == 2
    assert set(positives) <= {"para 0", "para 1", "o1"}
    irrelevant, locality, train = split_off_train_negatives(["i1", "i2", "i3", "i4"], ["n1", "l1", "l2", "l3"],
                                                            {"n1"}, prep, {"pseudo 0"}, 10, random.Random(0))
    assert irrelevant == ["i1", "i2"] and locality == ["n1", "l1"]
    assert train[:2] == ["i3", "l2"]  # interleaved: every kind in proportion under a cap
    assert set(train) == {"i3", "i4", "l2", "l3", "pseudo 1", "pseudo 2"}  # never a scored or taken text


def test_calibration_texts_are_disjoint_and_seeded():
    from types import SimpleNamespace

    from megedit.familiarity.familiarity_datamodule import calibration_texts

    pseudo = [_pseudo(i, f"s{i}", [f"loc {i}", f"s{i} again"]) for i in range(40)]
    prep = SimpleNamespace(edits=[None] * 5, pseudo_edits=pseudo, pseudo_pairs=[],
                           pseudo_irrelevant=[{"prompt": f"irr {i}"} for i in range(20)])
    locality = sorted({p.prompt for r in pseudo for p in r.locality})
    heldout = {f"p{i}" for i in range(10)}
    a = calibration_texts(prep, heldout, set(), locality, set(), 8, 100, 100, seed=3)
    b = calibration_texts(prep, heldout, set(), locality, set(), 8, 100, 100, seed=3)
    assert a.prompts == b.prompts and a.negatives == b.negatives and a.train_negatives == b.train_negatives
    assert len(a.prompts) == 5 and set(a.prompts) <= {f"pseudo {i}" for i in range(10)}
    assert len(a.train_negatives) == 8 and a.counts["train_negatives"] == 8
    scored = set(a.prompts) | set(a.positives) | set(a.negatives)
    assert not scored & set(a.train_negatives)
    assert len(a.negative_kind) == len(a.negatives) == a.counts["negatives"]


def test_pseudo_locality_kinds_and_encoder_trained_prompts():
    from megedit.familiarity.familiarity_datamodule import encoder_trained_prompts, pseudo_locality_kind

    pseudo = [_pseudo(0, "Paris", ["Paris is in", "Rome is in"]), _pseudo(1, "Oslo", ["Oslo lies in"])]
    assert pseudo_locality_kind("Paris", "Paris is in") == "pseudo_same_subject"
    assert pseudo_locality_kind("Paris", "Rome is in") == "pseudo_locality"
    # Only the hard-negative groups' own-subject prompts: the encoder may have trained on those alone.
    assert encoder_trained_prompts(pseudo, {"p0"}) == {"Paris is in"}


def test_familiarity_scale_bench_trains_through_the_stage_module(one_thread):
    """bench/familiarity_scale.py trains its routers with the stage's module and recipe, not a loop of its own."""
    import sys

    from megedit.paths import REPO_ROOT

    sys.path.insert(0, str(REPO_ROOT / "bench"))
    try:
        import familiarity_scale
    finally:
        sys.path.remove(str(REPO_ROOT / "bench"))
    recipe = familiarity_scale.stage_recipe()
    assert recipe["num_classes"] == 10 and recipe["plateau_patience"] > 0  # the stage's defaults
    emb = F.normalize(torch.randn(24, 16, generator=torch.Generator().manual_seed(0)), dim=-1)
    neg = F.normalize(torch.randn(32, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    small = recipe | {"depth": 2, "max_epochs": 400, "min_epochs": 1, "lr": 1e-2}  # a few seconds
    net, epochs, converged = familiarity_scale.train_router(emb, neg, small, plateau=True)
    assert converged and epochs < 400 and not net.training
    labels = random_labels(24, 10, recipe["seed"])  # the stage's labels, so the module's own
    assert torch.equal(net(emb).argmax(-1), labels)


# ---------------------------------------------------------------- the nearest-neighbour router (model.router nearest)
def _unit(n, dim=64, seed=0):
    return F.normalize(torch.randn(n, dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _near(points, scale=0.15, seed=1):
    """A "paraphrase" of each point: the point moved a little, renormalised."""
    return F.normalize(points + scale * _unit(len(points), points.shape[1], seed), dim=-1)


def test_nearest_router_scores_a_memorised_embedding_0_and_an_orthogonal_one_1():
    from megedit.components.nearest_router import NearestRouter

    memory = torch.eye(4, 8) * 3  # normalised on the way in
    router = NearestRouter(memory, threshold=0.2)
    score = router.entropy(torch.cat([torch.eye(8)[:2] * 5, torch.eye(8)[6:], -torch.eye(8)[:1]]))
    assert score.tolist() == pytest.approx([0.0, 0.0, 1.0, 1.0, 1.0], abs=1e-6)  # -e0 is still 1 from e1..e3
    assert router.is_familiar(torch.eye(8)[:5]).tolist() == [True, True, True, True, False]
    assert router.kind == "nearest" and router.config() == {"n": 4, "dim": 8}
    assert router.entropy(torch.empty(0, 8)).shape == (0,)
    with pytest.raises(ValueError, match="8-dim"):
        router.entropy(torch.ones(2, 5))
    with pytest.raises(ValueError, match="non-empty"):
        NearestRouter(torch.empty(0, 8), 0.1)


def test_nearest_calibration_picks_a_threshold_between_separable_paraphrases_and_negatives():
    """Calibration as the stage does it: the memory is the pseudo edits, positives their paraphrases, negatives
    unrelated prompts; the threshold falls between the two score ranges and routes both sides right."""
    from megedit.components.nearest_router import NearestRouter
    from megedit.familiarity.familiarity_datamodule import NEGATIVE_KINDS
    from megedit.familiarity.report import calibrate

    pseudo = _unit(32)
    router = NearestRouter(pseudo, math.inf)
    cal = {"calib_prompts": router.entropy(pseudo), "calib_positives": router.entropy(_near(pseudo)),
           "calib_negatives": router.entropy(_unit(200, seed=7))}
    assert cal["calib_positives"].max() < cal["calib_negatives"].min()  # separable
    kind = torch.arange(200) % 2
    got = calibrate(cal, "capped", 0.04, kind, list(NEGATIVE_KINDS), ["pseudo_irrelevant", "pseudo_locality"], {})
    assert cal["calib_positives"].max() < got["threshold"] < cal["calib_negatives"].min()
    assert got["familiar_rate"] == 1.0 and got["unfamiliar_routed_familiar_rate"] == 0.0 and got["auroc"] == 1.0


class _FakeRouterData:
    """What the familiarity datamodule hands over, for 8 edits of 64-dim embeddings; without ``trainable`` asking
    for a training batch fails."""

    def __init__(self, encoder_dir, trainable=False):
        import lightning as L

        from megedit.familiarity.familiarity_datamodule import RouterInputs

        edits, pseudo = _unit(8, seed=3), _unit(8, seed=4)
        emb = {"edit_prompts": edits, "edit_paraphrases": _near(edits), "locality": _unit(24, seed=5),
               "calib_prompts": pseudo, "calib_positives": _near(pseudo, seed=6),
               "calib_negatives": _unit(40, seed=8), "train_negatives": _unit(16, seed=9),
               "fences": torch.empty(0, 64), "shifts": torch.empty(0, 64)}
        inputs = RouterInputs(emb=emb, calibrate=True, negative_kind=torch.arange(40) % 2, calibration_counts={},
                              locality_kinds=["other"] * 24, fences={"per_edit": 1, "templates": 0, "main": 0},
                              n_edits=8, lineage={"run": "x"},
                              encoder={"encoder_dir": str(encoder_dir), "encoder_manifest_sha256": "0"},
                              data_config={}, upstream={"encoder": encoder_dir})

        requested = self.requested = []

        class Data(L.LightningDataModule):
            def request(self, net_groups=True):
                requested.append(net_groups)

            def handover(self):
                return inputs

            def train_dataloader(self):
                from megedit.familiarity.familiarity_datamodule import router_loader

                assert trainable, "the nearest router trains nothing: no training batch may be asked for"
                return router_loader(8, 8, 4)

        self.datamodule, self.emb = Data(), emb


def test_nearest_router_stage_memorises_without_training_and_load_router_round_trips_the_kind(tmp_path, capsys):
    import lightning as L

    from megedit.components.nearest_router import NearestRouter
    from megedit.familiarity.artifact import load_entropies, read_report, read_router_config
    from megedit.familiarity.familiarity_module import FamiliarityModule
    from megedit.familiarity.threshold import main as threshold_main

    enc = _fake_encoder_dir(tmp_path / "enc", "a")
    data, out = _FakeRouterData(enc), tmp_path / "fam"
    module = FamiliarityModule(out_dir=str(out), router="nearest")
    L.Trainer(accelerator="cpu", max_epochs=3, logger=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, datamodule=data.datamodule)
    cfg, report = read_router_config(out), read_report(out)
    assert cfg["kind"] == report["router"] == "nearest" and cfg["memory"] == {"n": 8, "dim": 64}
    assert "architecture" not in cfg and cfg["entropy_units"] == "1 - cosine" and report["max_entropy"] == 2.0
    assert report["fit"]["epochs"] == 0 and not report["fences"]["used"]
    assert data.requested == [False]  # so the real datamodule embeds no negatives, fences or shifts
    assert report["rates"]["edit_prompts_familiar"] == 1.0 and report["calibration"]["auroc"] == 1.0
    assert all((out / name).is_file() for name in ("router.safetensors", "calibration_router.safetensors",
                                                   "entropies.safetensors", "entropy_hist.png", "routing_curve.png"))
    router = load_router(out, encoder_dir=enc)
    assert isinstance(router, NearestRouter) and router.threshold == report["threshold"] == cfg["threshold"]
    assert torch.allclose(router.memory, data.emb["edit_prompts"], atol=1e-6)
    assert router.is_familiar(data.emb["edit_prompts"]).all() and not router.is_familiar(data.emb["locality"]).any()
    ent, _, _ = load_entropies(out)
    assert torch.allclose(ent["main.edit_paraphrases"], router.entropy(data.emb["edit_paraphrases"]))
    # `megedit threshold` re-picks the stage's own threshold from the saved scores and plots them.
    assert threshold_main([str(out), "--json", str(tmp_path / "t.json"), "--curve", str(tmp_path / "c.png")]) == 0
    again = json.loads((tmp_path / "t.json").read_text())
    assert again["router"] == "nearest" and again["threshold"] == report["threshold"]
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_nearest_router_options_are_checked():
    from megedit.familiarity.familiarity_module import FamiliarityModule

    assert FamiliarityModule(router="nearest", threshold=1.5).hparams.router == "nearest"  # within (0, 2]
    with pytest.raises(ValueError, match=r"outside \(0, 2.000\] 1 - cosine"):
        FamiliarityModule(router="nearest", threshold=2.5)
    with pytest.raises(ValueError, match="model.router"):
        FamiliarityModule(router="knn")
    with pytest.raises(ValueError, match="trains nothing"):
        FamiliarityModule(router="nearest", init_from="parent/familiarity")


def test_the_entropy_router_writes_its_kind_through_the_same_stage_path(tmp_path, one_thread):
    import lightning as L

    from megedit.familiarity.artifact import read_report, read_router_config
    from megedit.familiarity.familiarity_module import FamiliarityModule

    data, out = _FakeRouterData(_fake_encoder_dir(tmp_path / "enc", "a"), trainable=True), tmp_path / "fam"
    module = FamiliarityModule(out_dir=str(out), depth=1, hidden_mult=1, min_epochs=1, checkpoint_every_n_epochs=0)
    L.Trainer(accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module, datamodule=data.datamodule)
    cfg, report = read_router_config(out), read_report(out)
    assert cfg["kind"] == report["router"] == "entropy" and cfg["K"] == 10 and cfg["entropy_units"] == "nats"
    assert report["fit"]["epochs"] == 2 and report["max_entropy"] == pytest.approx(math.log(10))
    router = load_router(out)
    assert isinstance(router, FamiliarityRouter) and router.kind == "entropy" and router.threshold == cfg["threshold"]
