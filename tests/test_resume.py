"""Resuming a stage only from a checkpoint of the same config and inputs."""

from __future__ import annotations

import json

from megedit.artifacts import MANIFEST
from megedit.resume import CHECKPOINT_DIR, LAST_CKPT, RUN_FILE, resumable_checkpoint, run_fingerprint


def _upstream(tmp_path, text: str):
    up = tmp_path / "prepare"
    up.mkdir(exist_ok=True)
    (up / MANIFEST).write_text(text)
    return up


def test_fingerprint_covers_config_and_upstream_manifests_not_speed_settings(tmp_path):
    up = _upstream(tmp_path, '{"stage": "prepare", "v": 1}')
    data = {"prepare_dir": str(up), "batch_size": 8, "num_workers": 0, "missing_dir": str(tmp_path / "none")}
    base = run_fingerprint({"lr": 1e-3}, data)
    assert set(base["upstream_manifests"]) == {"prepare_dir"}
    assert run_fingerprint({"lr": 1e-3}, {**data, "num_workers": 4}) == base
    assert run_fingerprint({"lr": 1e-3, "torch_threads": 2}, data) == base
    assert run_fingerprint({"lr": 2e-3}, data) != base
    assert run_fingerprint({"lr": 1e-3}, {**data, "batch_size": 16}) != base
    (up / MANIFEST).write_text('{"stage": "prepare", "v": 2}')
    assert run_fingerprint({"lr": 1e-3}, data)["upstream_manifests"] != base["upstream_manifests"]


def test_fingerprint_covers_trainer_settings_that_change_the_optimisation_only(tmp_path):
    data = {"prepare_dir": str(_upstream(tmp_path, "{}"))}
    base = run_fingerprint({"lr": 1e-3}, data, {"precision": "32-true", "gradient_clip_val": 1.0})
    # Unknown or budget settings are ignored: a larger max_epochs resumes.
    assert run_fingerprint({"lr": 1e-3}, data, {"precision": "32-true", "gradient_clip_val": 1.0,
                                                "max_epochs": 99}) == base
    assert run_fingerprint({"lr": 1e-3}, data, {"precision": "bf16-mixed", "gradient_clip_val": 1.0}) != base
    assert run_fingerprint({"lr": 1e-3}, data, {"precision": "32-true", "gradient_clip_val": 0.5}) != base
    assert run_fingerprint({"lr": 1e-3}, data, {"precision": "32-true", "gradient_clip_val": 1.0,
                                                "accumulate_grad_batches": 4}) != base


def test_resumes_only_the_same_run_and_moves_other_checkpoints_aside(tmp_path, capsys):
    up = _upstream(tmp_path, '{"stage": "prepare"}')
    out = tmp_path / "stage"
    fp = run_fingerprint({"lr": 1e-3}, {"prepare_dir": str(up)})
    assert resumable_checkpoint(out, fp) is None  # fresh: records the fingerprint
    ckpt_dir = out / CHECKPOINT_DIR
    assert json.loads((ckpt_dir / RUN_FILE).read_text()) == fp
    assert resumable_checkpoint(out, fp) is None  # killed before the first checkpoint: still fresh
    (ckpt_dir / LAST_CKPT).write_bytes(b"state")
    assert resumable_checkpoint(out, fp) == str(ckpt_dir / LAST_CKPT)

    other = run_fingerprint({"lr": 5e-3}, {"prepare_dir": str(up)})
    assert resumable_checkpoint(out, other) is None
    stale = [p for p in out.iterdir() if p.name.startswith(f"{CHECKPOINT_DIR}.stale-")]
    assert len(stale) == 1 and (stale[0] / LAST_CKPT).read_bytes() == b"state"  # nothing lost
    assert "the model/data/trainer config changed" in capsys.readouterr().out
    assert json.loads((ckpt_dir / RUN_FILE).read_text()) == other and not (ckpt_dir / LAST_CKPT).exists()


def test_checkpoints_without_a_fingerprint_are_not_resumed(tmp_path, capsys):
    out = tmp_path / "stage"
    (out / CHECKPOINT_DIR).mkdir(parents=True)
    (out / CHECKPOINT_DIR / LAST_CKPT).write_bytes(b"old")
    assert resumable_checkpoint(out, run_fingerprint({}, {})) is None
    assert f"no readable {RUN_FILE}" in capsys.readouterr().out


def test_folders_compare_resolved_and_two_stale_runs_in_a_second_do_not_collide(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    up = _upstream(tmp_path, '{"stage": "prepare"}')
    assert run_fingerprint({}, {"prepare_dir": "prepare"}) == run_fingerprint({}, {"prepare_dir": str(up)})
    out = tmp_path / "stage"
    for lr in (1, 2, 3):
        assert resumable_checkpoint(out, run_fingerprint({"lr": lr}, {})) is None
        (out / CHECKPOINT_DIR / LAST_CKPT).write_bytes(str(lr).encode())
    stale = sorted(p for p in out.iterdir() if p.name.startswith(f"{CHECKPOINT_DIR}.stale-"))
    assert sorted((p / LAST_CKPT).read_bytes() for p in stale) == [b"1", b"2"]


def test_only_the_first_process_moves_checkpoints(tmp_path, monkeypatch):
    out = tmp_path / "stage"
    (out / CHECKPOINT_DIR).mkdir(parents=True)
    (out / CHECKPOINT_DIR / LAST_CKPT).write_bytes(b"other run")
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert resumable_checkpoint(out, run_fingerprint({}, {})) is None
    assert (out / CHECKPOINT_DIR / LAST_CKPT).read_bytes() == b"other run"  # left for rank 0 to move


def test_a_stage_may_fingerprint_its_budget_and_the_others_keep_their_fingerprints(tmp_path):
    data = {"prepare_dir": str(_upstream(tmp_path, "{}"))}
    settings = {"precision": "32-true", "max_steps": 80, "max_epochs": 1}
    common = run_fingerprint({"lr": 1e-3}, data, settings)
    assert run_fingerprint({"lr": 1e-3}, data, settings, trainer_keys=()) == common  # unchanged for other stages
    # The encoder's learning rate decays to 0 at its budget's last step: another budget is another run.
    enc = run_fingerprint({"lr": 1e-3}, data, settings, trainer_keys=("max_epochs", "max_steps"))
    assert enc != common
    assert run_fingerprint({"lr": 1e-3}, data, {**settings, "max_steps": 160}, ("max_epochs", "max_steps")) != enc
    # How often the resume point is written changes no result.
    assert run_fingerprint({"lr": 1e-3, "checkpoint_every_n_steps": 5}, data, settings, ("max_epochs", "max_steps")) \
        == run_fingerprint({"lr": 1e-3, "checkpoint_every_n_steps": 50}, data, settings, ("max_epochs", "max_steps"))
