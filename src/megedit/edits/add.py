"""``megedit edits add``: a new run version with more edits, without retraining the run from scratch.

What it does, in order (docs/incremental.md, "What add retrains and why"):

1. reads and checks the files as the prepare stage does, and applies the duplicate policy against the
   latest version's edits (``megedit.edits.new_edits``);
2. prepares the new edits: the base LM's pre-edit answers; the pseudo sets lose what leaks a new edit
   (``megedit.edits.prepare_version``);
3. collects one neuron per new edit with the parent's collect recipe (``megedit.edits.collect_version``);
4. fine-tunes the router and recalibrates its threshold, then fine-tunes the generator, each through its
   own stage (``megedit.edits.retrain``).

The encoder is not retrained: it learns only from pseudo data, which a version never adds to. Everything is
written into a staging folder that becomes ``RUN/versions/<n>`` at the very end (``megedit.edits.versions``).
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Sequence

from megedit.artifacts import ArtifactError, read_manifest
from megedit.edits.collect_version import collect_new, write_collect_version
from megedit.edits.new_edits import plan_additions, read_new_edits
from megedit.edits.prepare_version import write_prepare_version
from megedit.edits.removed import read_removed, write_removed
from megedit.edits.retrain import GeneratorBudget, fine_tune_generator, fine_tune_router
from megedit.edits.versions import Staging, stage_owner, write_record, writing_version
from megedit.loading import load_lm, state_dict_sha256
from megedit.prepare.answers import answer_edits
from megedit.prepare.artifact import Prepared, load_prepared
from megedit.prepare.prepare_datamodule import check_targets


def add_edits(run: str | Path, files: Sequence[str | Path], replace: bool = False,
              budget: GeneratorBudget = GeneratorBudget(), quiet: bool = False) -> dict:
    """Write the next version of ``run`` with the edits of ``files`` added; returns its ``version.json``."""
    started = time.time()
    records, file_info = read_new_edits(files)  # bad input fails before anything is locked or written
    with writing_version(run) as staging:
        parent = load_prepared(stage_owner(staging.parent_dir, "prepare"))
        removals = read_removed(staging.parent_dir)
        plan = plan_additions(records, parent.edits, {r.id for r in removals}, replace)
        seconds: dict[str, float] = {}
        prepared = _prepare_and_collect(staging, parent, plan, {p: p for p in file_info}, seconds)
        first_new, n_new = len(prepared.edits) - len(plan.new), len(plan.new)
        staging.link("encoder", stage_owner(staging.parent_dir, "encoder"))
        encoder, tb = stage_owner(staging.parent_dir, "encoder"), staging.dir / "tb"
        seconds["familiarity"] = fine_tune_router(stage_owner(staging.parent_dir, "familiarity"), staging.dir / "prepare",
                                                  encoder, staging.dir / "familiarity", tb, quiet)
        seconds["diffusion"], generator = fine_tune_generator(stage_owner(staging.parent_dir, "diffusion"), staging.dir / "prepare",
                                                   encoder, staging.dir / "collect", staging.dir / "diffusion", tb,
                                                   first_new, n_new, budget, quiet)
        # A removed edit that a new record replaced is gone, even when the new record has its id.
        kept_removals = [r for r in removals if r.id not in plan.replaced]
        if kept_removals:
            write_removed(staging.dir, kept_removals)
        seconds["total"] = time.time() - started
        record = write_record(staging, {
            "kind": "add", "change": {**plan.summary(), "files": file_info},
            "n_edits": len(prepared.edits), "n_removed": len(kept_removals), "first_new_edit": first_new,
            "stages": {"own": ["prepare", "collect", "familiarity", "diffusion"], "linked": ["encoder"]},
            "generator_fine_tuning": generator,
            "seconds": {k: round(v, 1) for k, v in seconds.items()}})
    print(f"edits add: version {record['version']} of {run}: {n_new} edits added ({len(plan.replaced)} replacing "
          f"older ones, {len(plan.duplicates)} duplicates skipped), {record['n_edits']} edits in all; "
          f"{seconds['total']:.0f} s")
    return record


def _prepare_and_collect(staging: Staging, parent: Prepared, plan, input_files: dict, seconds: dict) -> Prepared:
    """Steps 2-3 with one copy of the base LM, freed before the training stages load their own."""
    spec = parent.spec
    lm, tokenizer = load_lm(spec)
    want = parent.lineage.get("model_weights_sha256")
    if want and state_dict_sha256(lm) != want:
        raise ArtifactError(f"the LM loaded for {spec.name} is not the one {parent.dir} was prepared with")
    check_targets(plan.new, tokenizer, spec.name)
    cfg = parent.manifest["config"]
    t0 = time.time()
    rows = answer_edits(lm, tokenizer, plan.new, spec.format_prompt,
                        max_new_tokens=cfg.get("model", {}).get("max_new_tokens", 20),
                        batch_size=cfg.get("data", {}).get("batch_size", 32))
    prepared = write_prepare_version(staging.dir / "prepare", parent, plan, rows, input_files, staging.version)
    seconds["prepare"] = time.time() - t0
    t0 = time.time()
    parent_collect = stage_owner(staging.parent_dir, "collect")
    first_new = len(prepared.edits) - len(plan.new)
    weights, records = collect_new(lm, tokenizer, prepared, first_new, read_manifest(parent_collect, stage="collect"))
    write_collect_version(staging.dir / "collect", parent_collect, prepared, weights, records, time.time() - t0,
                          staging.version)
    seconds["collect"] = time.time() - t0
    del lm
    gc.collect()
    return prepared
