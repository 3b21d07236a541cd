"""Fine-tuning a version's router and generator through their own stages.

Each stage runs as it always does (``megedit.cli.stage_main``: LightningCLI, the stage's defaults, its
manifest), with the configuration its parent artifact recorded in its manifest, so the version is trained by
the recipe that trained its parent; on top of that come only the version's folders and the fine-tuning flags:

* familiarity: ``model.init_from`` = the parent router (its calibration router too, when saved), labels of
  points it already calls familiar kept, ``model.min_epochs`` 1: it trains until both routers have memorised
  every point again, as the stage's convergence rule says, and the threshold is re-picked by the stage's
  calibration on the version's pseudo data; a ``nearest`` router (``model.router``, carried over with the rest
  of the parent's config) has nothing to fine-tune: the stage memorises the version's edit prompts afresh and
  recalibrates (``warm_router``);
* diffusion: ``model.init_from`` = the parent generator's last checkpoint, a budget of optimiser steps in
  which every new edit is drawn ``draws_per_new_edit`` times and the new edits take ``new_share`` of every
  batch (``data.favour_from``), a peak learning rate of ``lr_scale`` x the parent's, the parent's value scale
  (one candidate: no re-pick), no validation, and a final report on the new edits only.
"""

from __future__ import annotations

import inspect
import json
import sys
import time
from pathlib import Path

from megedit.artifacts import read_manifest
from megedit.cli import stage_classes, stage_main
from megedit.diffusion.artifact import read_generator_config
from megedit.edits.budget import GeneratorBudget
from megedit.familiarity.artifact import CALIBRATION_WEIGHTS, read_router_config, router_kind


def _cli_value(value) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def config_flags(stage: str, config: dict, overrides: dict[str, dict]) -> list[str]:
    """``--data.* / --model.*`` flags that reproduce a stage manifest's ``config`` (the keys the stage's
    current classes still take) with ``overrides`` on top."""
    module, datamodule = stage_classes(stage)
    accepted = {"model": inspect.signature(module.__init__).parameters,
                "data": inspect.signature(datamodule.__init__).parameters}
    flags = []
    for section in ("data", "model"):
        values = {k: v for k, v in (config.get(section) or {}).items() if k in accepted[section] and k != "self"}
        values.update(overrides.get(section, {}))
        for key, value in values.items():
            flags += [f"--{section}.{key}", _cli_value(value)]
    for key, value in overrides.get("trainer", {}).items():
        flags += [f"--trainer.{key}", _cli_value(value)]
    return flags


def run_stage_with(stage: str, flags: list[str]) -> None:
    """``stage_main`` with exactly ``flags``: the command line of the ``megedit edits`` process is not the
    stage's (LightningCLI would warn that it is given both)."""
    argv = sys.argv
    sys.argv = argv[:1]
    try:
        stage_main(stage, flags)
    finally:
        sys.argv = argv


def _quiet(quiet: bool) -> dict:
    return {"enable_progress_bar": False, "enable_model_summary": False} if quiet else {}


def fine_tune_router(parent: Path, prepare: Path, encoder: Path, out: Path, tb: Path, quiet: bool = False) -> float:
    """Run the familiarity stage for a version, warm-started from the ``parent`` artifact where it saved both
    of its routers (else both from scratch: see ``warm_router``); its wall seconds."""
    config = read_manifest(parent, stage="familiarity")["config"]
    warm = {"init_from": str(parent), "min_epochs": 1} if warm_router(parent) else {}
    overrides = {"data": {"prepare_dir": str(prepare), "encoder_dir": str(encoder)},
                 "model": {"out_dir": str(out), **warm},
                 "trainer": {"logger.init_args.save_dir": str(tb), **_quiet(quiet),
                             "max_epochs": (config.get("trainer") or {}).get("max_epochs", 400)}}
    started = time.time()
    run_stage_with("familiarity", config_flags("familiarity", config, overrides))
    return time.time() - started


def warm_router(parent: Path) -> bool:
    """Whether a version's routers start from the parent's: only where the parent saved its calibration router.
    The threshold is picked on the calibration router and applied to the main one, so both must be trained
    alike. A warm main router beside a cold calibration router got a threshold made for another entropy
    scale (CounterFact-1024 + 128 edits: 89.1% of the paraphrases routed and AUROC 0.971, where the parent's
    cold pair at 1024 had 93.7% and 0.984) and took no fewer epochs (78; the parent's pair: 63).

    Never for a ``nearest`` parent: its memory is rebuilt from the version's edits, and its threshold is
    recalibrated rather than kept. Recalibrating costs nothing here (no training, only the embeddings), and the
    parent's threshold was picked for a memory of the parent's size: the more points a memory holds, the
    nearer an unrelated prompt's best match, so the FPR budget would drift with every added edit."""
    if not (Path(parent) / CALIBRATION_WEIGHTS).is_file():
        return False
    return router_kind(read_router_config(parent)) == "entropy"


def fine_tune_generator(parent: Path, prepare: Path, encoder: Path, collect: Path, out: Path, tb: Path,
                        first_new: int, n_new: int, budget: GeneratorBudget, quiet: bool = False) -> tuple[float, dict]:
    """Run the diffusion stage for a version, fine-tuning the ``parent`` artifact's generator; its wall seconds
    and the settings it ran with (steps, peak lr, value scale)."""
    config = read_manifest(parent, stage="diffusion")["config"]
    saved = read_generator_config(parent)
    value_scale = saved["schedule"].get("default_value_scale", 1.0)
    batch_size = int((config.get("data") or {}).get("batch_size", 32))
    lr = float((config.get("model") or {}).get("lr", 2e-3)) * budget.lr_scale
    overrides = {"data": {"prepare_dir": str(prepare), "encoder_dir": str(encoder), "collect_dir": str(collect),
                          "favour_from": first_new, "favoured_share": budget.new_share, "val_edits": 0},
                 "model": {"out_dir": str(out), "init_from": str(parent), "lr": lr, "warmup_steps": budget.warmup_steps,
                           "value_scales": [value_scale], "report_from": first_new, "report_edits": None},
                 "trainer": {"logger.init_args.save_dir": str(tb), **_quiet(quiet), "max_epochs": -1,
                             "max_steps": budget.steps(n_new, batch_size), "limit_val_batches": 0}}
    started = time.time()
    run_stage_with("diffusion", config_flags("diffusion", config, overrides))
    return time.time() - started, {"steps": overrides["trainer"]["max_steps"], "batch_size": batch_size, "lr": lr,
                                   "value_scale": value_scale, **budget.__dict__}
