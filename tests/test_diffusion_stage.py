"""The diffusion stage end to end on synthetic artifacts: outputs, resume, refusals, 2-process DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _diffusion_fixtures import make_collect, make_run, stage_args
from safetensors.torch import load_file, save_file

from megedit.artifacts import ArtifactError, read_manifest, write_manifest
from megedit.cli import stage_main
from megedit.diffusion.artifact import load_generator
from megedit.paths import REPO_ROOT

FAST = ["--trainer.max_epochs", "4", "--trainer.check_val_every_n_epoch", "2", "--model.report_steps", "5",
        "--model.torch_threads", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("diffusion-run"), n_edits=6)


def test_stage_writes_generator_report_manifest_and_resumes(run, tmp_path):
    out = tmp_path / "diffusion"
    stage_main("diffusion", stage_args(run, out, *FAST))
    manifest = read_manifest(out, "diffusion")
    assert set(manifest["inputs"]["upstream"]) == {"prepare", "encoder", "collect"}
    assert manifest["lineage"] == read_manifest(run["prepare"], "prepare")["lineage"]
    report = json.loads((out / "report.json").read_text())
    summary = report["generated_vs_collected"]
    assert summary["n"] == 6 and len(report["per_edit"]) == 6
    assert summary["l2_mean"] > 0 and summary["l2_std"] >= 0
    cfg = json.loads((out / "generator.json").read_text())
    assert cfg["input_dim"] == 16 and cfg["cond_dim"] == 16 and cfg["schedule"]["prediction_type"] == "v_prediction"
    assert len(cfg["normalisation"]["shift"]) == 16
    # the stage's sampling temperature (0 by default) is the saved generator's default and the report's
    assert cfg["schedule"]["default_noise_scale"] == 0.0 and report["sampler"]["noise_scale"] == 0.0
    # the saved weights are the EMA of the best checkpoint
    best = torch.load(report["best_checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
    saved = load_file(str(out / "generator.safetensors"))
    for key, value in saved.items():
        torch.testing.assert_close(value, best["ema." + key].float())
    gen = load_generator(out)
    cond = torch.randn(3, 16)
    sample = gen.sample(cond, steps=5, seed=0)
    assert sample.shape == (3, 16) and torch.isfinite(sample).all()
    torch.testing.assert_close(sample, gen.sample(cond, steps=5, seed=0))
    assert report["global_step"] == 8  # 4 epochs x ceil(6 / 4) steps

    # a later run with a larger budget resumes from checkpoints/last.ckpt instead of starting over
    stage_main("diffusion", stage_args(run, out, "--trainer.max_epochs", "6", *FAST[2:]))
    assert json.loads((out / "report.json").read_text())["global_step"] == 12
    # ... but a run with another config starts over, and keeps the other run's checkpoints aside
    stage_main("diffusion", stage_args(run, out, *FAST, "--model.lr", "1e-3"))
    assert json.loads((out / "report.json").read_text())["global_step"] == 8
    stale = list(out.glob("checkpoints.stale-*"))
    assert len(stale) == 1 and (stale[0] / "last.ckpt").is_file()


def test_killed_run_resumes_from_its_periodic_resume_point(run, tmp_path):
    from _interrupt import SimulatedKill

    out = tmp_path / "diffusion"
    args = stage_args(run, out, "--trainer.max_epochs", "8", *FAST[2:], "--model.checkpoint_every_n_epochs", "5")
    with pytest.raises(SimulatedKill):
        stage_main("diffusion", [*args, "--trainer.callbacks+=_interrupt.KillAtEpochEnd",
                                 "--trainer.callbacks.epoch", "6"])
    last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 4 and last["global_step"] == 10  # the 5th epoch's state; epochs 5-6 were lost
    stage_main("diffusion", args)
    assert json.loads((out / "report.json").read_text())["global_step"] == 16
    assert not list(out.glob("checkpoints.stale-*"))


def test_zero_weight_augmentation_adds_pseudo_irrelevant_pairs(run, tmp_path):
    from megedit.diffusion.diffusion_datamodule import DiffusionDataModule

    dm = DiffusionDataModule(str(run["prepare"]), str(run["encoder"]), str(run["collect"]), zero_weight_aug=True,
                             n_zero=3)
    dm.setup()
    assert dm.train_weights.shape == (9, 16) and dm.n_zero == 3
    assert torch.count_nonzero(dm.train_weights[6:]) == 0 and torch.count_nonzero(dm.train_weights[:6]) > 0
    assert dm.normalisation_weights.shape == (6, 16)  # zero vectors never skew the statistics
    # conditions of the edits are the encoder's embeddings of the raw prompts
    from megedit.components.text_encoder import TextEncoder

    enc = TextEncoder.from_source(str(run["encoder"] / "encoder"))
    torch.testing.assert_close(dm.edit_cond, enc.embed([e.prompt for e in dm.prepared.edits]))


def _datamodule(run, **over):
    from megedit.diffusion.diffusion_datamodule import DiffusionDataModule

    dirs = {"prepare_dir": str(run["prepare"]), "encoder_dir": str(run["encoder"]),
            "collect_dir": str(run["collect"]), **over}
    return DiffusionDataModule(**dirs)


def test_refuses_mismatched_inputs(run, tmp_path):
    lineage = read_manifest(run["prepare"], "prepare")["lineage"]
    # neurons for another number of edits
    wrong_n = make_collect(tmp_path / "c1", run["prepare"], lineage, n=5)
    with pytest.raises(ArtifactError, match="5 neurons for 6 edits"):
        _datamodule(run, collect_dir=str(wrong_n)).setup()
    # neurons of another width than the model's neuron_dim
    wrong_d = make_collect(tmp_path / "c2", run["prepare"], lineage, n=6, dim=10)
    with pytest.raises(ArtifactError, match="needs 16"):
        _datamodule(run, collect_dir=str(wrong_d)).setup()
    # another run's lineage
    other = make_collect(tmp_path / "c3", run["prepare"], {**lineage, "seed": 1}, n=6)
    with pytest.raises(ArtifactError, match="different runs"):
        _datamodule(run, collect_dir=str(other)).setup()
    # an encoder dir given as the collect dir
    with pytest.raises(ArtifactError, match="expected a 'collect' artifact"):
        _datamodule(run, collect_dir=str(run["encoder"])).setup()
    # NaN weights
    bad = tmp_path / "c4"
    bad.mkdir()
    w = torch.zeros(6, 16)
    w[2, 3] = float("nan")
    save_file({"weights": w, "success": torch.ones(6, dtype=torch.uint8)}, str(bad / "neurons.safetensors"))
    write_manifest(bad, "collect", lineage, config={}, outputs=["neurons.safetensors"],
                   upstream={"prepare": run["prepare"]})
    with pytest.raises(ArtifactError, match="non-finite"):
        _datamodule(run, collect_dir=str(bad)).setup()
    # only_successful with no successful neuron
    none_ok = tmp_path / "c5"
    none_ok.mkdir()
    save_file({"weights": torch.randn(6, 16), "success": torch.zeros(6, dtype=torch.uint8)},
              str(none_ok / "neurons.safetensors"))
    write_manifest(none_ok, "collect", lineage, config={}, outputs=["neurons.safetensors"],
                   upstream={"prepare": run["prepare"]})
    with pytest.raises(ArtifactError, match="no successfully collected"):
        _datamodule(run, collect_dir=str(none_ok), only_successful=True).setup()


@pytest.mark.ddp
def test_two_process_ddp_on_gloo(run, tmp_path):
    """A few steps of the tiny preset under DDP (2 CPU processes, gloo)."""
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT / "src")}
    cmd = [sys.executable, str(REPO_ROOT / "stages" / "diffusion.py"),
           *stage_args(run, out, *FAST, "--trainer.strategy", "ddp", "--trainer.devices", "2")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    # 6 pairs split over 2 ranks, batch 4: 1 step per epoch, 4 epochs
    assert report["global_step"] == 4
    assert report["generated_vs_collected"]["n"] == 6
    read_manifest(out, "diffusion")
    assert load_generator(out).sample(torch.randn(2, 16), steps=3, seed=0).shape == (2, 16)


def test_shifted_conditions_move_only_the_edits_and_stay_on_the_sphere():
    from megedit.diffusion.diffusion_datamodule import ShiftedConditions

    torch.manual_seed(0)
    cond = torch.nn.functional.normalize(torch.randn(6, 5), dim=-1)
    weights = torch.arange(6.0)[:, None].expand(6, 3)
    shifts = 0.3 * torch.randn(4, 5)
    always = ShiftedConditions(cond, weights, shifts, n_shiftable=4, prob=1.0, scale=1.0)
    for i in range(6):
        c, w = always[i]
        assert torch.equal(w, weights[i])  # the target neuron never moves
        assert torch.allclose(c.norm(), torch.tensor(1.0), atol=1e-5)
        moved = not torch.allclose(c, cond[i])
        assert moved == (i < 4), i  # rows past n_shiftable (zero-weight pairs) stay put
        if moved:  # by one of the given displacements, re-normalised
            assert any(torch.allclose(c, torch.nn.functional.normalize(cond[i] + s, dim=-1), atol=1e-5)
                       for s in shifts)
    never = ShiftedConditions(cond, weights, shifts, n_shiftable=6, prob=0.0, scale=1.0)
    assert all(torch.equal(never[i][0], cond[i]) for i in range(6))


def test_relation_views_condition_an_edit_on_its_subject_in_lent_rephrasings_never_an_evaluation_text(tmp_path):
    from megedit.collect.views import LeakGuard, evaluation_texts
    from megedit.diffusion.diffusion_datamodule import ShiftedConditions

    run = make_run(tmp_path, n_edits=4, n_pseudo=3)
    dm = _datamodule(run, relation_views=8, paraphrase_shifts=0, pseudo_generality=False)
    dm.setup()
    edits = dm.prepared.edits
    guard = LeakGuard(evaluation_texts(edits))
    assert len(dm.view_rows) == 4 and dm.view_cond.shape[0] == sum(len(r) for r in dm.view_rows)
    for rec, texts in zip(edits, dm.view_texts):
        # one rephrasing per lending pseudo edit survives; the one that is this edit's paraphrase behind
        # a context ("It rained all day. <subject>'s mayor is") is dropped by the guard
        assert texts == [f"Elections were held in May. The office of mayor of {rec.subject} is held by"]
        assert not any(guard.leaks(t) for t in texts)
    assert dm.view_coverage == {"per_record": 8, "view_prob": 0.5, "records": 4, "records_with_views": 4,
                                "views": 4}
    # the training set draws the view's embedding (or the prompt's), never moves the target
    data = dm.train_dataloader().dataset
    assert isinstance(data, ShiftedConditions)
    data.view_prob = 1.0
    for i in range(4):
        c, w = data[i]
        torch.testing.assert_close(c, dm.view_cond[dm.view_rows[i][0]])
        assert torch.equal(w, dm.train_weights[i])
    data.view_prob = 0.0
    assert all(torch.equal(data[i][0], dm.train_cond[i]) for i in range(4))
