"""`megedit report`: one table over evaluate folders, MeG scored twice in a run (evaluate/ and evaluate-peers/) kept once."""

import json

from megedit.evaluate.metrics import metric_names
from megedit.report import collect, main


def _results(folder, variants: dict, threshold=0.25, n=8):
    folder.mkdir(parents=True)
    results = {v: {**{k: value for k in metric_names()}, "score": value} for v, value in variants.items()}
    (folder / "results.json").write_text(json.dumps({
        "lineage": {"model": "smollm2", "dataset": "counterfact"},
        "metric_meta": {"n_edits": n, "protocol": "p", "ag_protocol": "target_length", "router_threshold": threshold},
        "results": results, "method_seconds": {}}))
    return folder


def test_meg_scored_in_evaluate_and_evaluate_peers_is_one_row(tmp_path):
    run = tmp_path / "runs" / "smollm2-counterfact-8"
    a = _results(run / "evaluate", {"meg": 90.0, "meg_retrieval": 95.0})
    b = _results(run / "evaluate-peers", {"meg": 90.0, "memit": 50.0})
    rows = collect([a, b])
    assert [(r["variant"], r["run"]) for r in rows] == [("meg", str(a)), ("meg_retrieval", str(a)), ("memit", str(b))]


def test_rows_that_differ_are_all_kept(tmp_path):
    run = tmp_path / "runs" / "smollm2-counterfact-8"
    a = _results(run / "evaluate", {"meg": 90.0})
    b = _results(run / "evaluate-threshold-0.7", {"meg": 90.0}, threshold=0.7)  # another threshold: another row
    c = _results(tmp_path / "runs" / "smollm2-counterfact-8-other" / "evaluate", {"meg": 90.0})  # another run
    d = _results(run / "evaluate-n4", {"meg": 90.0}, n=4)  # another edit count in the same run folder
    published = tmp_path / "published"  # results files side by side, as bench/results/runs/<run-name>.json
    published.mkdir()
    e, f = published / "run-a.json", published / "run-b.json"
    e.write_text((a / "results.json").read_text())
    f.write_text((a / "results.json").read_text())
    assert [r["run"] for r in collect([a, b, c, d, e, f])] == [str(x) for x in (a, b, c, d, published, published)]


def test_a_relative_folder_is_resolved_before_its_run_is_taken(tmp_path, monkeypatch):
    run = tmp_path / "run"
    a, b = _results(run / "evaluate", {"meg": 90.0}), _results(run / "evaluate-peers", {"meg": 90.0})
    monkeypatch.chdir(a)
    assert len(collect([".", b])) == 1


def test_main_writes_table_json_and_plot(tmp_path):
    a = _results(tmp_path / "run" / "evaluate", {"meg": 90.0})
    out = tmp_path / "report"
    assert main([str(a), str(a / "results.json"), "--out", str(out)]) == 0
    assert len(json.loads((out / "report.json").read_text())) == 1  # the same folder given twice: one row
    assert "| smollm2 | counterfact | 8 |" in (out / "report.md").read_text()
    assert (out / "scaling.png").stat().st_size > 0
