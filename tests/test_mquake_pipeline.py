"""The MQuAKE path end to end (docs/mquake.md) on the packaged SmolLM2 + MiniLM with a handful of instances:
prepare -> encoder -> familiarity -> collect -> diffusion -> evaluate under the dataset's own stage configs
(``configs/stages/*-mquake.yaml``, as ``make all DATASET=mquake`` passes them), then the multi-hop measures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megedit.paths import REPO_ROOT

pytestmark = pytest.mark.slow

N = 6
QUIET = ["--trainer.enable_progress_bar", "false"]


def mquake_config(stage: str) -> list[str]:
    return ["--config", str(REPO_ROOT / "configs" / "stages" / f"{stage}-mquake.yaml")]


@pytest.fixture(scope="module")
def mquake_run(tmp_path_factory, data_dir) -> Path:
    from megedit.cli import stage_main

    run = tmp_path_factory.mktemp("mquake") / f"smollm2-mquake-{N}"
    p, tb = ["--data.prepare_dir", str(run / "prepare")], ["--trainer.logger.init_args.save_dir", str(run / "tb")]
    stage_main("prepare", [*mquake_config("prepare"), "--data.dataset", "mquake", "--data.n_edits", str(N),
                           "--data.data_dir", str(data_dir), "--model.out_dir", str(run / "prepare"), *QUIET])
    stage_main("encoder", [*mquake_config("encoder"), *p, "--model.out_dir", str(run / "encoder"),
                           "--trainer.max_epochs", "2", "--data.batch_size", "32", *tb, *QUIET])
    stage_main("familiarity", [*p, "--data.encoder_dir", str(run / "encoder"), "--model.out_dir",
                               str(run / "familiarity"), *tb, *QUIET])
    stage_main("collect", [*p, "--model.out_dir", str(run / "collect"), "--model.transfer_n", "4", *QUIET])
    stage_main("diffusion", [*mquake_config("diffusion"), *p, "--data.encoder_dir", str(run / "encoder"),
                             "--data.collect_dir", str(run / "collect"), "--model.out_dir", str(run / "diffusion"),
                             "--model.preset", "dit-cpu", "--data.batch_size", str(N), "--trainer.max_epochs", "300",
                             "--trainer.check_val_every_n_epoch", "300", "--data.val_edits", str(N),
                             "--model.report_steps", "20", "--data.paraphrase_shifts", "64", *tb, *QUIET])
    stage_main("evaluate", [*mquake_config("evaluate"), "--data.run_dir", str(run), "--model.out_dir",
                            str(run / "evaluate"), "--model.steps", "10", *tb, *QUIET])
    return run


def test_each_instance_is_one_edit_and_one_neuron_over_all_its_atoms(mquake_run):
    from megedit.artifacts import read_jsonl
    from megedit.data.splits import SubjectMatcher
    from megedit.prepare.artifact import load_prepared

    prepared = load_prepared(mquake_run / "prepare")
    assert len(prepared.edits) == N and any(e.atoms for e in prepared.edits)
    rows = read_jsonl(mquake_run / "collect" / "per_edit.jsonl")
    assert [r["id"] for r in rows] == [e.id for e in prepared.edits]
    edited = SubjectMatcher(a.subject for e in prepared.edits for a in e.all_atoms())
    questions = {q.prompt for e in prepared.edits for q in e.multi_hop}
    assert prepared.pseudo_pairs
    for pair in prepared.pseudo_pairs:  # pseudo instances: none of the edits' subjects or questions
        assert pair["positive"] not in questions
        assert not edited.mentions(pair["anchor"]) and not edited.mentions(pair["positive"])


def test_evaluate_reports_multi_hop_accuracy_with_the_base_lm_as_reference(mquake_run):
    from megedit.prepare.artifact import load_prepared

    summary = json.loads((mquake_run / "evaluate" / "results.json").read_text())
    prepared = load_prepared(mquake_run / "prepare")
    assert summary["metric_meta"]["items"]["multi_hop"] == sum(len(e.multi_hop) for e in prepared.edits) == 3 * N
    assert summary["metric_meta"]["items"]["reliability"] == sum(len(e.all_atoms()) for e in prepared.edits)
    for variant in ("meg", "base"):
        m = summary["results"][variant]["multi_hop"]
        assert (m["n_questions"], m["n_instances"]) == (3 * N, N)
        for key in ("multi_hop_question", "multi_hop_instance", "edit_wise", "instance_wise"):
            assert 0.0 <= m[key] <= 100.0, (variant, key)
        assert m["multi_hop_instance"] >= m["multi_hop_question"] / 3
    assert summary["results"]["base"]["loc_tf"] >= 90.0  # the unedited LM is its own locality reference
    table = (mquake_run / "evaluate" / "results.md").read_text()
    assert "Multi-hop (instance)" in table and "base LM (unedited)" in table
