"""Resume a killed training stage from its last checkpoint, but only a checkpoint of the same run.

A stage's Lightning checkpoints live in ``<out_dir>/checkpoints``, and ``run.json`` beside them
records a fingerprint of the stage's config and of its upstream artifacts' manifests. A re-run with
another config or other inputs (``make`` re-running a stale stage, a changed flag) must not quietly
continue the old optimisation: its checkpoints are moved aside, never deleted, and the stage starts
fresh. Of the trainer settings, only those that change the optimisation are fingerprinted (precision,
gradient clipping and accumulation), so a larger ``--trainer.max_epochs`` resumes; a stage whose schedule
depends on its budget names those settings too (``fingerprinted_trainer_settings`` of its module: the
encoder's learning rate decays to 0 at the last step).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from lightning.pytorch.callbacks import Callback

from megedit.artifacts import MANIFEST, atomic_write_json, sha256_file, sha256_json

CHECKPOINT_DIR = "checkpoints"
LAST_NAME = "last"
LAST_CKPT = f"{LAST_NAME}.ckpt"
RUN_FILE = "run.json"
# Settings that change speed or memory, never the result.
NOT_FINGERPRINTED = frozenset({"num_workers", "torch_threads", "embed_batch_size", "checkpoint_every_n_steps"})
# Trainer settings that change what the optimiser does (the rest: budget, devices, logging, ...).
TRAINER_FINGERPRINTED = ("precision", "gradient_clip_val", "gradient_clip_algorithm", "accumulate_grad_batches")


def run_fingerprint(model_hparams: dict, data_hparams: dict, trainer_settings: dict | None = None,
                    trainer_keys: tuple[str, ...] = ()) -> dict:
    """What a checkpoint must share with the current run to be resumed: the stage's model and data
    config, the trainer settings in ``TRAINER_FINGERPRINTED`` and ``trainer_keys``, and the manifests of
    the upstream artifacts the data config points at (``*_dir``)."""
    def strip(hp: dict) -> dict:
        # Folders compare resolved: ./runs/x and /abs/runs/x are the same run.
        return {k: (str(Path(v).resolve()) if k.endswith("_dir") and isinstance(v, str) else v)
                for k, v in dict(hp).items() if k not in NOT_FINGERPRINTED}

    upstream = {}
    for key, value in sorted(dict(data_hparams).items()):
        if key.endswith("_dir") and value and (Path(value) / MANIFEST).is_file():
            upstream[key] = sha256_file(Path(value) / MANIFEST)
    trainer = {k: (trainer_settings or {}).get(k) for k in (*TRAINER_FINGERPRINTED, *trainer_keys)}
    return {"config_sha256": sha256_json({"model": strip(model_hparams), "data": strip(data_hparams),
                                          "trainer": trainer}),
            "upstream_manifests": upstream}


def _is_global_zero() -> bool:
    # Before the process group exists: Lightning's launcher, torchrun and SLURM each set one of these on
    # every process but the first; only that one moves or writes files, the others only read.
    return all(os.environ.get(k, "0") == "0" for k in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"))


def _difference(recorded: dict | None, current: dict) -> str:
    if not isinstance(recorded, dict):
        return f"no readable {RUN_FILE}"
    changed = []
    if recorded.get("config_sha256") != current["config_sha256"]:
        changed.append("the model/data/trainer config")
    old, new = recorded.get("upstream_manifests", {}), current["upstream_manifests"]
    changed += [f"input {k}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(changed) or "nothing recorded"


def last_checkpoint(out_dir: str | Path) -> Path:
    """Where a training stage keeps its resume point: ``<out_dir>/checkpoints/last.ckpt``."""
    return Path(out_dir) / CHECKPOINT_DIR / LAST_CKPT


def remove_checkpoints(out_dir: str | Path) -> None:
    """Drop ``<out_dir>/checkpoints``: they only serve a resume, and the stage's artifact is complete now."""
    import shutil

    shutil.rmtree(Path(out_dir) / CHECKPOINT_DIR, ignore_errors=True)


def resumable_checkpoint(out_dir: str | Path, fingerprint: dict) -> str | None:
    """``<out_dir>/checkpoints/last.ckpt`` if it belongs to this run, else None (a fresh start).

    Checkpoints of another run are renamed to ``checkpoints.stale-<time>``; the current run's
    fingerprint is then recorded so that its own checkpoints can be resumed after a kill.
    """
    ckpt_dir = Path(out_dir) / CHECKPOINT_DIR
    run_file, last = ckpt_dir / RUN_FILE, ckpt_dir / LAST_CKPT
    try:
        recorded = json.loads(run_file.read_text()) if run_file.is_file() else None
    except (OSError, ValueError):
        recorded = None
    if last.is_file() and recorded == fingerprint:
        print(f"resuming from {last} (same config and inputs)")
        return str(last)
    if not _is_global_zero():
        return None
    if recorded != fingerprint and ckpt_dir.is_dir() and any(p.name != RUN_FILE for p in ckpt_dir.iterdir()):
        base = ckpt_dir.with_name(f"{CHECKPOINT_DIR}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
        stale, n = base, 1
        while stale.exists():
            stale, n = base.with_name(f"{base.name}-{n}"), n + 1
        ckpt_dir.rename(stale)
        print(f"{ckpt_dir} holds checkpoints of another run ({_difference(recorded, fingerprint)} changed): "
              f"moved to {stale}; starting fresh")
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_file, fingerprint)
    return None


def resume_point_callback(out_dir: str | Path, every_n_epochs: int, **kwargs):
    """A ModelCheckpoint that keeps one file, ``<out_dir>/checkpoints/last.ckpt``, overwritten every
    ``every_n_epochs`` epochs (no monitor, top-1); with ``every_n_epochs <= 0`` it saves nothing."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    return ModelCheckpoint(dirpath=str(Path(out_dir) / CHECKPOINT_DIR), filename=LAST_NAME, monitor=None,
                           save_top_k=1 if every_n_epochs > 0 else 0, every_n_epochs=max(every_n_epochs, 1),
                           enable_version_counter=False, **kwargs)


class StepResumePoint(Callback):
    """Refreshes ``<out_dir>/checkpoints/last.ckpt`` every ``every_n_steps`` optimiser steps (0: never).

    Only in the middle of an epoch: a stage that replays its data order and RNG streams from the checkpoint
    (the encoder) resumes such a point exactly, while one taken after an epoch's last batch would resume
    into the next epoch's draws before the RNG states are back; the next step that is not an epoch's last
    (nor the run's last) is saved instead. Written to a temporary file and renamed, so a kill while saving
    leaves the previous resume point whole.
    """

    def __init__(self, out_dir: str | Path, every_n_steps: int):
        self.path = Path(out_dir) / CHECKPOINT_DIR / LAST_CKPT
        self.every_n_steps, self.saved_step = every_n_steps, 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.saved_step = trainer.global_step  # a resumed run counts from its resume point

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        if (self.every_n_steps <= 0 or step - self.saved_step < self.every_n_steps
                or batch_idx + 1 >= trainer.num_training_batches or 0 < trainer.max_steps <= step):
            return
        tmp = self.path.with_name(f".{LAST_CKPT}.tmp")
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(tmp, weights_only=False)  # every rank takes part (a barrier); rank 0 writes
        if trainer.is_global_zero:
            os.replace(tmp, self.path)
        self.saved_step = step
