"""Integration: the encoder and familiarity stages on the packaged MiniLM over the real 8-edit prepare run."""

from __future__ import annotations

import json

import pytest
import torch

from megedit.artifacts import ArtifactError, read_manifest
from megedit.cli import stage_main

pytestmark = pytest.mark.slow

ENCODER_SMALL = ["--data.max_train_groups", "96", "--data.batch_size", "16", "--data.min_val_per_source", "24",
                 "--data.max_val_per_source", "24", "--trainer.max_epochs", "1", "--trainer.logger", "false",
                 "--trainer.enable_progress_bar", "false"]
FAMILIARITY_SMALL = ["--trainer.max_epochs", "150", "--model.min_epochs", "5", "--model.hidden_mult", "2",
                     "--trainer.enable_progress_bar", "false"]


@pytest.fixture(scope="module")
def encoder_dirs(prepared_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("enc")
    tuned, frozen = root / "encoder", root / "encoder_frozen"
    stage_main("encoder", ["--data.prepare_dir", str(prepared_dir), "--model.out_dir", str(tuned), *ENCODER_SMALL])
    stage_main("encoder", ["--data.prepare_dir", str(prepared_dir), "--model.out_dir", str(frozen),
                           "--model.objective", "frozen", *ENCODER_SMALL])
    return tuned, frozen


def test_encoder_stage_outputs(prepared_dir, encoder_dirs):
    from transformers import AutoModel

    from megedit.components.text_encoder import TextEncoder
    from megedit.prepare.artifact import load_prepared

    tuned, frozen = encoder_dirs
    manifest = read_manifest(tuned, stage="encoder")
    prep = load_prepared(prepared_dir)
    assert manifest["lineage"] == prep.lineage and "prepare" in manifest["inputs"]["upstream"]
    report = json.loads((tuned / "report.json").read_text())
    assert report["steps"] == 96 // 16 and report["objective"] == "infonce"
    for which in ("tuned", "frozen"):
        for part in ("heldout_pseudo_pairs", "edit_paraphrases"):
            m = report[which][part]
            assert 0.0 <= m["recall@1"] <= m["recall@5"] <= 1.0 and 0 < m["mrr"] <= 1.0
    assert report["tuned"]["edit_paraphrases"]["n_keys"] == len(prep.edits)
    # A standard HF folder, and the TextEncoder round trip.
    AutoModel.from_pretrained(tuned / "encoder")
    enc = TextEncoder.from_source(str(tuned / "encoder"))
    emb = enc.embed([e.prompt for e in prep.edits], batch_size=4)
    assert emb.shape == (len(prep.edits), enc.dim)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(len(prep.edits)), atol=1e-5)
    # Training changed the weights; the frozen ablation did not train (and reports tuned == frozen).
    base = TextEncoder.from_source(prep.spec.encoder)
    assert not torch.allclose(emb, base.embed([e.prompt for e in prep.edits], batch_size=4), atol=1e-4)
    frozen_report = json.loads((frozen / "report.json").read_text())
    assert frozen_report["steps"] == 0
    assert frozen_report["tuned"]["edit_paraphrases"] == frozen_report["frozen"]["edit_paraphrases"]
    # The held-out groups are disjoint from what the encoder trained on, and none is an edit's text.
    heldout = set(json.loads((tuned / "heldout_groups.json").read_text())["groups"])
    assert heldout and not heldout & {e.id for e in prep.edits}


def test_familiarity_stage_routes_and_refuses_other_encoder(prepared_dir, encoder_dirs, tmp_path):
    from megedit.familiarity.artifact import load_router
    from megedit.prepare.artifact import load_prepared

    tuned, frozen = encoder_dirs
    out = tmp_path / "familiarity"
    stage_main("familiarity", ["--data.prepare_dir", str(prepared_dir), "--data.encoder_dir", str(tuned),
                               "--model.out_dir", str(out), "--trainer.logger.init_args.save_dir", str(tmp_path / "tb"),
                               *FAMILIARITY_SMALL])
    manifest = read_manifest(out, stage="familiarity")
    assert set(manifest["inputs"]["upstream"]) == {"prepare", "encoder"}
    for name in ("router.safetensors", "router.json", "routing_report.json", "entropy_hist.png", "routing_curve.png",
                 "entropies.safetensors"):
        assert (out / name).is_file() and name in manifest["outputs"]
    for png in ("entropy_hist.png", "routing_curve.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*")), "histogram/rates not logged to TensorBoard"
    report = json.loads((out / "routing_report.json").read_text())
    cfg = json.loads((out / "router.json").read_text())
    assert cfg["K"] == 10 and cfg["threshold"] == report["threshold"] and cfg["threshold_source"].startswith("auto")
    assert report["fit"]["converged"]
    assert report["calibration"]["counts"]["memorised"] == 8
    assert report["paraphrase_shifts"] == {"pairs": 0, "scale": 1.6, "weight": 1.0, "used": False}  # off by default
    # With data.paraphrase_shifts, the displacements come from the encoder's training groups only, and no
    # pair holds a scored text.
    from megedit.data.locality_kinds import normalise
    from megedit.encoder.encoder_datamodule import group_pairs
    from megedit.familiarity.familiarity_datamodule import FamiliarityDataModule

    dm = FamiliarityDataModule(str(prepared_dir), str(tuned), paraphrase_shifts=50)
    dm._check_inputs()
    texts = dm._texts()
    originals, paraphrases = dm._shift_pairs(texts)
    assert len(originals) == len(paraphrases) == 50
    scored = {normalise(t) for k in ("edit_prompts", "edit_paraphrases", "locality", "calib_positives",
                                     "calib_negatives") for t in texts[k]}
    assert not {normalise(t) for t in originals + paraphrases} & scored
    heldout = set(json.loads((tuned / "heldout_groups.json").read_text())["groups"])
    trained_pairs = {(g["anchor"], p) for gid, g in group_pairs(load_prepared(prepared_dir).pseudo_pairs).items()
                     if gid not in heldout for p in g["positives"]}
    assert set(zip(originals, paraphrases)) <= trained_pairs
    # The saved entropies re-pick the same threshold without retraining, and give the reported rates.
    from safetensors.torch import load_file

    from megedit.familiarity.familiarity_datamodule import NEGATIVE_KINDS
    from megedit.familiarity.router import choose_threshold

    ent = load_file(str(out / "entropies.safetensors"))
    hp = manifest["config"]["model"]
    again = choose_threshold(ent["calibration.calib_positives"], ent["calibration.calib_negatives"],
                             hp["calibration_rule"], hp["target_fpr"], unfamiliar_kind=ent["calibration.negative_kind"],
                             kind_names=list(NEGATIVE_KINDS), budget_kinds=list(hp["budget_kinds"]))
    assert again["threshold"] == pytest.approx(report["threshold"])
    assert float((ent["main.locality"] >= report["threshold"]).float().mean()) == pytest.approx(
        report["rates"]["locality_unfamiliar"])
    # `megedit threshold` reproduces the stage's own pick and rates from the saved entropies, and a
    # tighter budget never raises the threshold; nothing in the artifact changes.
    from megedit.cli import main as megedit_main

    before = {name: (out / name).read_bytes() for name in manifest["outputs"]}
    assert megedit_main(["threshold", str(out), "--json", str(tmp_path / "same.json"),
                         "--curve", str(tmp_path / "curve.png")]) == 0
    same = json.loads((tmp_path / "same.json").read_text())
    assert same["threshold"] == report["threshold"]  # the same computation on the same tensors
    for k in ("edit_prompts_familiar", "edit_paraphrases_familiar", "locality_unfamiliar"):
        assert same["edits"][k] == pytest.approx(report["rates"][k])
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert megedit_main(["threshold", str(out), "--rule", "max_fpr", "--target-fpr", "0",
                         "--json", str(tmp_path / "tight.json")]) == 0
    tight = json.loads((tmp_path / "tight.json").read_text())
    assert tight["threshold"] <= same["threshold"] and tight["pick"]["unfamiliar_routed_familiar_rate"] == 0.0
    assert all(tight["pseudo"]["negatives_unfamiliar_by_kind"][k] == 1.0 for k in tight["pick"]["kinds_budgeted"])
    assert same["pseudo"]["paraphrases_familiar"] == pytest.approx(report["calibration"]["familiar_rate"])
    assert {name: (out / name).read_bytes() for name in manifest["outputs"]} == before
    with pytest.raises(SystemExit, match="are not kinds of this run"):
        megedit_main(["threshold", str(out), "--budget-kinds", "no_such_kind"])
    # The router memorised the edit prompts: all of them route familiar with the auto threshold.
    prep = load_prepared(prepared_dir)
    router = load_router(out, encoder_dir=tuned)
    from megedit.components.text_encoder import TextEncoder

    enc = TextEncoder.from_source(str(tuned / "encoder"))
    prompts = enc.embed([e.prompt for e in prep.edits], batch_size=8)
    assert router.is_familiar(prompts).all()
    assert report["rates"]["edit_prompts_familiar"] == 1.0
    assert router.entropy(prompts).max() < router.threshold
    # Irrelevant prompts have a higher mean entropy than the memorised ones.
    irrelevant = enc.embed([r["prompt"] for r in prep.pseudo_irrelevant], batch_size=32)
    assert router.entropy(irrelevant).mean() > 5 * router.entropy(prompts).mean()
    # A router built on one encoder run is refused with another's.
    with pytest.raises(ArtifactError, match="built from the 'encoder' artifact"):
        load_router(out, encoder_dir=frozen)


def test_familiarity_refuses_encoder_of_another_prepare_run(prepared_dir, encoder_dirs, tmp_path):
    import shutil

    other = tmp_path / "prepare_copy"
    shutil.copytree(prepared_dir, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["created"] = "another run"  # same lineage, different manifest: a different prepare artifact
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="built from the 'prepare' artifact"):
        stage_main("familiarity", ["--data.prepare_dir", str(other), "--data.encoder_dir", str(encoder_dirs[0]),
                                   "--model.out_dir", str(tmp_path / "f"), "--trainer.logger", "false"])


def test_familiarity_stage_trains_with_paraphrase_shifts(prepared_dir, encoder_dirs, tmp_path):
    """The large-n recipe's path through the stage: shift rows drawn, moved to the device, shared with the
    calibration router, and the router still memorises every edit."""
    out = tmp_path / "familiarity"
    stage_main("familiarity", ["--data.prepare_dir", str(prepared_dir), "--data.encoder_dir", str(encoder_dirs[0]),
                               "--model.out_dir", str(out), "--trainer.logger", "false", *FAMILIARITY_SMALL,
                               "--data.paraphrase_shifts", "50", "--model.target_fpr", "0.03"])
    report = json.loads((out / "routing_report.json").read_text())
    shifts = report["paraphrase_shifts"]
    assert shifts["used"] and shifts["pairs"] == 50 and shifts["median_displacement_norm"] > 0
    assert report["fit"]["converged"] and report["rates"]["edit_prompts_familiar"] == 1.0
    assert read_manifest(out, stage="familiarity")["config"]["data"]["paraphrase_shifts"] == 50


def test_killed_familiarity_run_resumes_from_its_last_checkpoint(prepared_dir, encoder_dirs, tmp_path):
    from _interrupt import SimulatedKill

    out = tmp_path / "familiarity"
    args = ["--data.prepare_dir", str(prepared_dir), "--data.encoder_dir", str(encoder_dirs[0]),
            "--model.out_dir", str(out), "--trainer.logger", "false", *FAMILIARITY_SMALL,
            "--trainer.max_epochs", "6", "--model.min_epochs", "1", "--model.converge_entropy", "1e-12",
            "--model.checkpoint_every_n_epochs", "1"]
    with pytest.raises(SimulatedKill):
        stage_main("familiarity", [*args, "--trainer.callbacks+=_interrupt.KillAtEpochEnd",
                                   "--trainer.callbacks.epoch", "3"])
    last = out / "checkpoints" / "last.ckpt"
    assert last.is_file() and not (out / "manifest.json").exists()
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 2  # epochs 0-2 saved, 3 was lost
    stage_main("familiarity", args)
    report = json.loads((out / "routing_report.json").read_text())
    assert report["fit"]["resumed_from"] == str(last) and report["fit"]["epochs"] == 6
    assert not (out / "checkpoints").exists()  # only a resume needs them
    read_manifest(out, stage="familiarity")


@pytest.mark.ddp
def test_both_stages_under_ddp_gloo(prepared_dir, tmp_path):
    """Two CPU processes on gloo: gathered InfoNCE negatives, sharded embedding, identical convergence decisions."""
    import subprocess
    import sys

    from megedit.paths import REPO_ROOT

    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"]
    enc, fam = tmp_path / "encoder", tmp_path / "familiarity"
    for script, args in (("encoder", ["--data.prepare_dir", str(prepared_dir), "--model.out_dir", str(enc),
                                      *ENCODER_SMALL, *ddp]),
                         ("familiarity", ["--data.prepare_dir", str(prepared_dir), "--data.encoder_dir", str(enc),
                                          "--model.out_dir", str(fam), "--trainer.logger", "false", *FAMILIARITY_SMALL,
                                          *ddp])):
        # A subprocess: Lightning's DDP launcher re-executes the script for rank 1.
        proc = subprocess.run([sys.executable, str(REPO_ROOT / "stages" / f"{script}.py"), *args], cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((enc / "report.json").read_text())
    assert report["world_size"] == 2 and report["steps"] == 96 // (16 * 2)
    routing = json.loads((fam / "routing_report.json").read_text())
    assert routing["rates"]["edit_prompts_familiar"] == 1.0 and routing["fit"]["converged"]
    read_manifest(fam, stage="familiarity")
