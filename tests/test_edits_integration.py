"""``megedit edits add | remove | list`` on a real 12-edit ZsRE run (the session fixture ``served_run``),
each test on its own copy of the run: new edits are prepared, collected and learnt by the fine-tuned router
and generator; removed edits answer as the base LM at once; a failed add leaves the old version serving."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import copy_run
from megedit.cli import main as megedit_main

pytestmark = pytest.mark.slow

# Facts no benchmark holds (fictional subjects), in MEND ZsRE format: what a user's file looks like.
NEW_EDITS = [
    {"subject": "Varnholt Quibbe", "src": "What is the native language of Varnholt Quibbe?", "alt": "Finnish",
     "rephrase": "Which language did Varnholt Quibbe grow up speaking?",
     "loc": "nq question: who sang the song hallelujah first", "loc_ans": "Leonard Cohen"},
    {"subject": "Lake Ostrenmere", "src": "In which country is Lake Ostrenmere?", "alt": "Portugal",
     "rephrase": "Lake Ostrenmere is located in which country?",
     "loc": "nq question: how many legs does a spider have", "loc_ans": "eight"},
    {"subject": "The Gallowglass Sonata", "src": "Who composed The Gallowglass Sonata?", "alt": "Antonio Vivaldi",
     "rephrase": "The Gallowglass Sonata was written by which composer?",
     "loc": "nq question: what is the capital of australia", "loc_ans": "Canberra"},
]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text(json.dumps(rows))
    return path


@pytest.fixture(scope="module")
def added(served_run, tmp_path_factory) -> tuple[Path, Path]:
    """A copy of the run with ``NEW_EDITS`` added (version 1), and the file they came from."""
    run = copy_run(served_run, tmp_path_factory.mktemp("added") / "run")
    new = _write(run.parent / "new_edits.json", NEW_EDITS)
    assert megedit_main(["edits", "add", "--run", str(run), str(new), "--quiet"]) == 0
    return run, new


def test_add_writes_a_complete_version_with_its_parent(added, served_run):
    run, new = added
    version = run / "versions" / "1"
    record = json.loads((version / "version.json").read_text())
    assert record["parent"] == 0 and record["kind"] == "add" and record["n_edits"] == 15
    assert record["change"]["added"] == [f"new_edits:{i}" for i in range(3)] and record["first_new_edit"] == 12
    assert set(record["seconds"]) == {"prepare", "collect", "familiarity", "diffusion", "total"}
    assert (version / "encoder").is_symlink() and (version / "encoder").resolve() == (run / "encoder").resolve()
    assert not list((run / "versions").glob(".staging-*"))
    rows = [json.loads(line) for line in (version / "prepare" / "edits.jsonl").read_text().splitlines()]
    old = [json.loads(line) for line in (served_run / "prepare" / "edits.jsonl").read_text().splitlines()]
    assert rows[:12] == old  # the parent's rows verbatim, pre-edit answers included
    assert all(r["pre_edit"]["prompt"] is not None and r["pre_edit"]["locality"][0] is not None for r in rows[12:])
    per_edit = [json.loads(line) for line in (version / "collect" / "per_edit.jsonl").read_text().splitlines()]
    assert [r["id"] for r in per_edit] == [r["id"] for r in rows] and [r["index"] for r in per_edit] == list(range(15))
    fam = json.loads((version / "familiarity" / "routing_report.json").read_text())
    assert fam["n_edits"] == 15 and fam["fit"]["converged"]
    assert fam["fit"]["warm_start"]["calibration"] == "fine-tuned" and fam["fit"]["warm_start"]["main_labels_kept"] >= 12
    diffusion = json.loads((version / "diffusion" / "report.json").read_text())
    assert diffusion["warm_start"]["from"].endswith("last.ckpt")
    assert [r["index"] for r in diffusion["per_edit"]] == [12, 13, 14]  # the report covers the new edits
    assert (version / "diffusion" / "checkpoints" / "last.ckpt").is_file()  # the next add fine-tunes from here


def test_the_latest_version_serves_the_new_edits_and_the_old_ones(added, served_run):
    from megedit.edited_model import EditedLM
    from megedit.evaluate.items import edit_items, score_meg, summarise_rows

    run, _ = added
    lm = EditedLM.load(run, steps=20)
    assert lm.version == 1 and len(lm.prepared.edits) == 15
    new = summarise_rows(score_meg(lm, edit_items(lm.prepared, range(12, 15))))
    assert new["familiar"]["rel"] == 100.0 and new["rel_tf"] >= 60.0, new
    old_after = summarise_rows(score_meg(lm, edit_items(lm.prepared, range(12))))
    base = EditedLM.load(run, version=0, steps=20)
    assert base.version == 0 and len(base.prepared.edits) == 12
    old_before = summarise_rows(score_meg(base, edit_items(base.prepared, range(12))))
    assert old_after["rel_tf"] >= old_before["rel_tf"] - 20.0, (old_before, old_after)


def test_adding_the_same_file_again_or_a_conflicting_edit_writes_nothing(added, capsys):
    run, new = added
    assert megedit_main(["edits", "add", "--run", str(run), str(new)]) == 2
    assert "nothing to add" in capsys.readouterr().err
    conflict = _write(run.parent / "conflict.json", [{**NEW_EDITS[1], "alt": "Norway"}])
    assert megedit_main(["edits", "add", "--run", str(run), str(conflict)]) == 2
    err = capsys.readouterr().err
    assert "conflict.json: record 0 (conflict:0): field 'target_new'" in err and "'Portugal' (edit new_edits:1)" in err
    broken = _write(run.parent / "broken.json", [{**NEW_EDITS[0], "alt": 3}])
    assert megedit_main(["edits", "add", "--run", str(run), str(broken)]) == 2
    assert "broken.json: record 0: field 'alt': expected a non-empty string, got 3" in capsys.readouterr().err
    assert sorted(p.name for p in (run / "versions").iterdir() if not p.name.startswith(".")) == ["1"]


def test_a_failing_add_leaves_the_previous_version_serving(served_run, tmp_path, monkeypatch):
    import megedit.edits.add as add_module

    run = copy_run(served_run, tmp_path / "run")
    new = _write(tmp_path / "new_edits.json", NEW_EDITS[:1])

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while fine-tuning the router")

    monkeypatch.setattr(add_module, "fine_tune_router", killed)
    with pytest.raises(KeyboardInterrupt):
        add_module.add_edits(run, [new], quiet=True)
    assert not (run / "versions" / "1").exists() and not list((run / "versions").glob(".staging-*"))
    from megedit.edits.versions import resolve_version

    assert resolve_version(run) == (run, 0)


def test_remove_answers_as_before_editing_at_once_and_keeps_the_rest(served_run, tmp_path, capsys):
    from megedit.edited_model import EditedLM
    from megedit.evaluate.items import edit_items, restoration_items, score_meg, summarise_rows

    run = copy_run(served_run, tmp_path / "run")
    before = EditedLM.load(run, steps=20)
    ids = [e.id for e in before.prepared.edits]
    gone, kept = ids[:3], list(range(3, 12))
    kept_before = score_meg(before, edit_items(before.prepared, kept))
    assert megedit_main(["edits", "remove", "--run", str(run), *gone, "--reason", "a test"]) == 0
    version = run / "versions" / "1"
    assert all((version / s).is_symlink() for s in ("prepare", "encoder", "familiarity", "collect", "diffusion"))
    removed = json.loads((version / "removed.json").read_text())["removed"]
    assert [r["id"] for r in removed] == gone and removed[0]["reason"] == "a test" and removed[0]["version"] == 1

    after = EditedLM.load(run, steps=20)
    assert after.version == 1 and after.removed_ids == frozenset(gone)
    restored = score_meg(after, restoration_items(after.prepared, range(3)))
    prompts = [r for r in restored if r["locality_kind"] == "own_prompt"]
    assert not any(r["familiar"] for r in prompts) and all(r["ag"] for r in prompts), prompts
    routing = after.route([after.prepared.edits[i].prompt for i in range(3)])
    assert routing.removed.all() and not routing.familiar.any()
    assert all(n["id"] not in gone for n in after.nearest_edits(routing.embeddings))
    kept_after = score_meg(after, edit_items(after.prepared, kept))
    prompts_kept = [(b["ag"], a["ag"]) for b, a in zip(kept_before, kept_after) if b["group"] == "reliability"]
    assert all(x == y for x, y in prompts_kept)  # a kept edit's own prompt is its own nearest edit
    assert summarise_rows(kept_after)["familiar"]["rel"] == summarise_rows(kept_before)["familiar"]["rel"]

    assert megedit_main(["edits", "remove", "--run", str(run), gone[0]]) == 2
    assert "removed already" in capsys.readouterr().err
    assert megedit_main(["edits", "remove", "--run", str(run), "zsre:nope"]) == 2
    assert "no edit with id zsre:nope" in capsys.readouterr().err
    assert megedit_main(["edits", "list", "--run", str(run)]) == 0
    listing = capsys.readouterr().out
    assert "| 1 (served) | 0 | remove |" in listing and "| 12 | 3 | -3: a test |" in listing
    assert EditedLM.load(run, version=0, steps=20).removed_ids == frozenset()


def test_ask_and_evaluate_serve_the_latest_version(added, capsys):
    from megedit.cli import stage_main

    run, _ = added
    stage_main("evaluate", ["--data.run_dir", str(run), "--model.out_dir", str(run / "evaluate-latest"), "--model.steps",
                            "20", "--model.variants", "[meg]", "--trainer.logger", "false",
                            "--trainer.enable_progress_bar", "false"])
    meta = json.loads((run / "evaluate-latest" / "results.json").read_text())["metric_meta"]
    assert meta["run_version"]["version"] == 1 and meta["n_edits"] == 15
    question = NEW_EDITS[0]["src"]
    assert megedit_main(["ask", "--run", str(run), "--json", "--steps", "20", "--max-new-tokens", "4", question]) == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert answer["routed"] and answer["nearest_edit"]["id"] == "new_edits:0"
    assert megedit_main(["ask", "--run", str(run), "--version", "0", "--json", "--steps", "20", "--max-new-tokens", "4",
                         question]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["nearest_edit"]["id"] != "new_edits:0"
