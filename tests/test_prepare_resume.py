"""A killed prepare resumes from its answer log (megedit.prepare.answer_log) and writes the same artifact."""

import json

import pytest

from megedit.prepare.answer_log import LOG_DIR, AnswerLog


def test_answer_log_keeps_whole_batches_and_ignores_a_torn_line(tmp_path):
    header = {"model": "m", "n": 1}
    log = AnswerLog(tmp_path, header)
    log.append(["Besançon est", "b"], [[1, 2], [3]])
    with open(log.path, "ab") as f:  # a kill in the middle of a write, inside a non-ASCII character
        f.write('{"texts": ["Besançon'.encode("utf-8")[:-1])
    again = AnswerLog(tmp_path, header)
    assert again.answers_for(["Besançon est", "b"]) == [[1, 2], [3]]
    assert again.answers_for(["b", "Besançon est"]) is None  # only the same batch, in the same order
    again.append(["d"], [[5]])  # lands on its own line, after the torn one
    assert AnswerLog(tmp_path, header).answers_for(["d"]) == [[5]]
    other = AnswerLog(tmp_path, {"model": "m", "n": 2})  # another setting: nothing reused, the old log kept aside
    assert not other.batches and not log.path.exists()
    (stale,) = tmp_path.glob(f"{LOG_DIR}.stale-*/rank-0.jsonl")
    assert AnswerLog(tmp_path, header).batches == {}  # a stale log is not read back
    other.remove()
    assert not (tmp_path / LOG_DIR).exists() and stale.exists()


@pytest.mark.slow
def test_prepare_killed_mid_run_resumes_to_the_same_artifact(tmp_path, data_dir, capsys):
    """Killed after its second batch (of three) and run again, prepare generates only what is missing and
    writes the edits an uninterrupted run writes."""
    from megedit.cli import stage_main
    from _interrupt import SimulatedKill

    def args(out):
        return ["--data.n_edits", "8", "--data.n_pseudo_irrelevant", "64", "--data.max_pseudo_edits", "256",
                "--data.batch_size", "8", "--data.data_dir", str(data_dir), "--model.out_dir", str(out),
                "--trainer.enable_progress_bar", "false"]

    out = tmp_path / "prepare"
    with pytest.raises(SimulatedKill):
        stage_main("prepare", args(out) + ["--trainer.callbacks+=_interrupt.KillAtPredictBatch",
                                           "--trainer.callbacks.batch", "1"])
    assert not (out / "manifest.json").exists()
    logged = (out / LOG_DIR / "rank-0.jsonl").read_text().splitlines()
    assert len(logged) == 3  # the header and two batches
    capsys.readouterr()
    stage_main("prepare", args(out))
    assert "resuming with 16 answers" in capsys.readouterr().out
    assert (out / "manifest.json").exists() and not (out / LOG_DIR).exists()
    stage_main("prepare", args(tmp_path / "straight"))
    rows, want = ([json.loads(line) for line in (d / "edits.jsonl").read_text().splitlines()]
                  for d in (out, tmp_path / "straight"))
    assert rows == want and json.loads((out / "report.json").read_text())["prompts_answered"] == 24
