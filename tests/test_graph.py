"""The stage graph is the one source of the Makefile's rules and the stages' input arguments."""

from __future__ import annotations

import inspect
import shutil
import subprocess
from pathlib import Path

import pytest

from megedit.cli import STAGES, _load
from megedit.graph import INPUTS, ORDER, PROBES, RUN_READERS, closure, input_params, make_plan, upstream_dirs
from megedit.paths import REPO_ROOT


def test_the_committed_makefile_plan_is_the_generated_one():
    assert (REPO_ROOT / "stages" / "plan.mk").read_text() == make_plan(), \
        "stages/plan.mk is stale: run `megedit plan > stages/plan.mk`"


def test_every_stage_is_in_the_graph_after_its_inputs():
    assert set(ORDER) | set(PROBES) == set(STAGES)  # a probe measures a finished run, outside `make all`
    for stage, inputs in INPUTS.items():
        assert all(ORDER.index(i) < ORDER.index(stage) for i in inputs), stage
    assert closure("evaluate") == ["prepare", "encoder", "familiarity", "collect", "diffusion"]
    assert closure("familiarity") == ["prepare", "encoder"]


@pytest.mark.parametrize("stage", [s for s in ORDER if INPUTS[s]])
def test_each_datamodule_takes_exactly_its_graph_inputs(stage):
    params = inspect.signature(_load(STAGES[stage].datamodule).__init__).parameters
    dirs = {name for name in params if name.endswith("_dir")}
    assert dirs == set(input_params(stage)), f"{stage}: datamodule takes {sorted(dirs)}"


def test_upstream_dirs_follow_the_flags_or_the_run(tmp_path):
    assert upstream_dirs("diffusion", {"prepare_dir": "a/p", "encoder_dir": "b/e", "collect_dir": "c/c"}) == \
        {"prepare": Path("a/p"), "encoder": Path("b/e"), "collect": Path("c/c")}
    assert RUN_READERS == {"evaluate"}
    got = upstream_dirs("evaluate", {"run_dir": str(tmp_path)})
    assert got == {name: tmp_path / name for name in INPUTS["evaluate"]}


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_runs_each_stage_with_its_inputs_and_experiments_recompute_what_they_change(tmp_path):
    def dry_run(*extra):
        out = subprocess.run(["make", "-n", "all", f"RUNS={tmp_path}", "N=8", "VENV=.venv", *extra], cwd=REPO_ROOT,
                             capture_output=True, text=True, check=True).stdout
        return [line for line in out.splitlines() if "stages/" in line]

    base = dry_run()
    run = tmp_path / "smollm2-counterfact-8"
    assert [line.split("stages/")[1].split(".py")[0] for line in base] == list(ORDER)
    assert f"--data.prepare_dir {run}/prepare --data.encoder_dir {run}/encoder --data.collect_dir {run}/collect" \
        in base[ORDER.index("diffusion")]
    assert f"--data.run_dir {run} " in base[ORDER.index("evaluate")]
    assert "--data.n_edits 8" in base[0] and "trainer.logger" not in base[0]
    # a dataset's own stage config is read over the stage's defaults (CounterFact: the nearest router)
    assert "--config configs/stages/familiarity-counterfact.yaml" in base[ORDER.index("familiarity")]
    assert "familiarity-" not in dry_run("DATASET=zsre")[ORDER.index("familiarity")]
    # ZsRE: the wider generator; CounterFact keeps the CPU preset
    assert "--config configs/stages/diffusion-zsre.yaml" in dry_run("DATASET=zsre")[ORDER.index("diffusion")]
    assert "diffusion-" not in base[ORDER.index("diffusion")]
    # an experiment that changes the generator recomputes the generator and the evaluation only
    exp = dry_run("EXP=mlp-generator")
    recomputed = {line.split("stages/")[1].split(".py")[0] for line in exp if f"{run}-mlp-generator/" in line}
    assert recomputed == {"diffusion", "evaluate"}


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_general_scores_a_finished_run_with_the_asked_variants(tmp_path):
    """``make general RUN=...`` is the general stage on that run (``docs/general.md``), with ``GENERAL_ARGS`` passed
    through and ``GENERAL_ALL=1`` lifting the per-benchmark subset."""
    run = tmp_path / "run"
    for stage in ("prepare", "encoder", "familiarity", "diffusion"):
        (run / stage).mkdir(parents=True)
        (run / stage / "manifest.json").write_text("{}")

    def dry_run(*extra):
        out = subprocess.run(["make", "-n", "general", f"RUN={run}", "VENV=.venv", *extra], cwd=REPO_ROOT,
                             capture_output=True, text=True, check=True).stdout.replace("\\\n", " ")
        return [" ".join(line.split()) for line in out.splitlines() if "stages/general.py" in line]

    (line,) = dry_run()
    assert f"--data.run_dir {run} --model.out_dir {run}/general" in line and "items_per_benchmark" not in line
    (line,) = dry_run("GENERAL_ARGS=--model.variants [base,meg,ft]", "GENERAL_ALL=1")
    assert "--data.items_per_benchmark null" in line and line.endswith("--model.variants [base,meg,ft]")


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_all_scores_meg_and_make_peers_adds_the_peers(tmp_path):
    """``make all`` leaves the peers out (``--model.peer_max_edits 0``) unless ``PEERS=yes``; ``make peers`` runs
    the evaluate stage with its default variants (MeG and the peers) into ``<run>/evaluate-peers``."""
    run = tmp_path / "run"
    for stage in ORDER:
        (run / stage).mkdir(parents=True)
        (run / stage / "manifest.json").write_text("{}")

    def dry_run(target, *extra):
        out = subprocess.run(["make", "-n", target, f"RUN={run}", "VENV=.venv", *extra], cwd=REPO_ROOT,
                             capture_output=True, text=True, check=True).stdout.replace("\\\n", " ")
        return [" ".join(line.split()) for line in out.splitlines() if "stages/evaluate.py" in line]

    base = subprocess.run(["make", "-n", "all", f"RUNS={tmp_path}", "N=8", "VENV=.venv"], cwd=REPO_ROOT,
                          capture_output=True, text=True, check=True).stdout
    (evaluate,) = [line for line in base.splitlines() if "stages/evaluate.py" in line]
    assert "--model.peer_max_edits 0" in evaluate
    # evaluate flags given on the command line do not bring the peers back
    (evaluate,) = dry_run("evaluate", "-W", str(run / "diffusion" / "manifest.json"),
                          "EVALUATE_ARGS=--model.router_threshold 0.1")
    assert "--model.peer_max_edits 0" in evaluate and evaluate.endswith("--model.router_threshold 0.1")
    with_peers = subprocess.run(["make", "-n", "all", f"RUNS={tmp_path}", "N=8", "VENV=.venv", "PEERS=yes"],
                                cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    assert "peer_max_edits" not in with_peers
    (line,) = dry_run("peers")
    assert f"--data.run_dir {run} --model.out_dir {run}/evaluate-peers" in line and "peer_max_edits" not in line
    (line,) = dry_run("peers", "PEERS_ARGS=--model.variants [meg,memit]")
    assert line.endswith("--model.variants [meg,memit]")
    (line,) = dry_run("peers", "DATASET=mquake")  # a dataset's own evaluate config holds for the peers too
    assert "--config configs/stages/evaluate-mquake.yaml" in line
