"""A killed encoder run resumes from its last resume point and ends where an uninterrupted run ends."""

from __future__ import annotations

import json

import pytest
import torch

from megedit.artifacts import read_manifest
from megedit.cli import stage_main

pytestmark = pytest.mark.slow

# 96 training groups in batches of 16: 6 steps per epoch, 12 in all.
SMALL = ["--data.max_train_groups", "96", "--data.batch_size", "16", "--data.min_val_per_source", "24",
         "--data.max_val_per_source", "24", "--trainer.max_epochs", "2", "--trainer.logger", "false",
         "--trainer.enable_progress_bar", "false"]


def _weights(out) -> dict[str, torch.Tensor]:
    from megedit.encoder.artifact import load_encoder

    return load_encoder(out).backbone.state_dict()


def test_killed_encoder_run_resumes_and_matches_an_uninterrupted_run(prepared_dir, tmp_path):
    from _interrupt import SimulatedKill

    full, out = tmp_path / "full", tmp_path / "resumed"
    # Uninterrupted and without resume points: what a fresh run computes.
    stage_main("encoder", ["--data.prepare_dir", str(prepared_dir), "--model.out_dir", str(full), *SMALL,
                           "--model.checkpoint_every_n_steps", "0"])
    assert json.loads((full / "report.json").read_text())["steps"] == 12

    # Resume points at steps 2 and 4 (6 ends epoch 0), the run is killed after step 5.
    args = ["--data.prepare_dir", str(prepared_dir), "--model.out_dir", str(out), *SMALL,
            "--model.checkpoint_every_n_steps", "2"]
    with pytest.raises(SimulatedKill):
        stage_main("encoder", [*args, "--trainer.callbacks+=_interrupt.KillAtStep", "--trainer.callbacks.step", "5"])
    last = out / "checkpoints" / "last.ckpt"
    assert not (out / "manifest.json").exists()
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4 and ckpt["epoch"] == 0  # step 5 was lost

    # The same command again: the last two batches of epoch 0 (its order replayed), validation, epoch 1.
    stage_main("encoder", args)
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 12 and report["epochs"] == 2 and report["resumed_from"] == str(last)
    assert not (out / "checkpoints").exists()  # only a resume needs them
    read_manifest(out, stage="encoder")
    assert not list(out.glob("checkpoints.stale-*"))
    # Same batches, same dropout masks, same learning rates: the same weights, bit for bit.
    resumed, expected = _weights(out), _weights(full)
    assert resumed.keys() == expected.keys()
    assert all(torch.equal(resumed[k], expected[k]) for k in expected)
    assert json.loads((out / "heldout_groups.json").read_text()) == json.loads((full / "heldout_groups.json").read_text())
