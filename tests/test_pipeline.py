"""The whole pipeline end to end on the packaged SmolLM2 + MiniLM with 12 ZsRE edits:
prepare -> encoder -> familiarity -> collect -> diffusion -> evaluate, then ``megedit ask`` on the result.

ZsRE questions go through the model's question template, so a paraphrase ends like its original
question; that is where a collected neuron transfers to paraphrases at all on a 135M model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megedit.cli import main as megedit_main

pytestmark = pytest.mark.slow


N_EDITS = 12  # the run of conftest's served_run / pipeline_run fixtures


@pytest.fixture(scope="module")
def run_dir(pipeline_run) -> Path:
    return pipeline_run


def test_no_evaluation_text_is_ever_trained_on(run_dir):
    """Collection, the encoder, the router and the generator train only on the edit prompts, the prepare run's
    pseudo texts and the collect run's relation views: none of them may equal an evaluation paraphrase or
    locality prompt, up to case, whitespace and a context prefix."""
    from megedit.artifacts import read_jsonl
    from megedit.collect.views import LeakGuard, evaluation_texts
    from megedit.prepare.artifact import load_prepared

    prepared = load_prepared(run_dir / "prepare")
    guard = LeakGuard(evaluation_texts(prepared.edits))
    trained = {"edit prompts": [e.prompt for e in prepared.edits],
               "pseudo pairs (encoder, router shifts, generator shifts)":
                   [t for pair in prepared.pseudo_pairs for t in (pair["anchor"], pair["positive"])],
               "pseudo edits (router, calibration, pseudo neurons)":
                   [t for r in prepared.pseudo_edits for t in (r.prompt, *r.paraphrases)],
               "pseudo-irrelevant prompts (router negatives, zero-weight pairs)":
                   [r["prompt"] for r in prepared.pseudo_irrelevant],
               "relation views (collection)":
                   [v for row in read_jsonl(run_dir / "collect" / "per_edit.jsonl") for v in row["relation_views"]]}
    assert trained["pseudo pairs (encoder, router shifts, generator shifts)"]
    for source, texts in trained.items():
        leaked = [t for t in texts if guard.leaks(t)]
        assert not leaked, f"{source}: {leaked[:3]}"


def test_generator_learns_pseudo_neurons_and_reports_their_generality(run_dir):
    from megedit.collect.artifact import load_pseudo_neurons

    ids, weights, success = load_pseudo_neurons(run_dir / "collect")
    assert len(ids) == 8 and weights.shape[0] == 8
    report = json.loads((run_dir / "diffusion" / "report.json").read_text())
    pg = report["pseudo_generality"]
    assert pg["pseudo_gen_n"] >= int(success.sum()) > 0  # one row per paraphrase of a collected pseudo edit
    assert 0.0 <= pg["pseudo_gen_ag"] <= 1.0 and 0.0 <= pg["pseudo_gen_collected_ag"] <= 1.0
    trained = json.loads((run_dir / "diffusion" / "generator.json").read_text())["trained_on"]
    assert trained["pseudo_edits"] == int(success.sum()) and trained["paraphrase_shifts"] > 0


def test_evaluate_writes_every_output_with_its_protocol(run_dir):
    out = run_dir / "evaluate"
    summary = json.loads((out / "results.json").read_text())
    assert set(summary["results"]) == {"meg", "meg_no_router", "meg_retrieval", "ft", "memit", "alphaedit"}
    meta = summary["metric_meta"]
    assert meta["ag_protocol"] == "target_length" and meta["n_edits"] == N_EDITS and meta["steps"] == 20
    for variant, r in summary["results"].items():
        six = [r[k] for k in ("rel_tf", "rel_ag", "gen_tf", "gen_ag", "loc_tf", "loc_ag")]
        assert all(0.0 <= v <= 100.0 for v in six), (variant, r)
        if min(six) > 0:
            assert r["score"] == pytest.approx(6 / sum(1 / v for v in six), abs=0.02)
    meg, ft = summary["results"]["meg"], summary["results"]["ft"]
    # The routed-away locality prompts run on the untouched LM, so they keep their pre-edit answers.
    unrouted = 100.0 - meg["routing_familiar"]["loc"]
    assert meg["loc_tf"] >= unrouted - 1e-6
    assert meg["rel_tf"] > 50.0, meg
    for peer in ("ft", "memit", "alphaedit"):  # the peers edit the weights: nothing is routed
        assert summary["results"][peer]["routing_familiar"] == {"rel": 0.0, "gen": 0.0, "loc": 0.0}
        assert summary["method_seconds"][peer]["edit"] > 0 and summary["method_seconds"][peer]["evaluate"] > 0
        assert (out / "peers" / f"{peer}.safetensors").is_file()  # for a resumed evaluation and the general stage
    assert set(summary["method_seconds"]["meg_stages"]) == {"encoder", "familiarity", "collect", "diffusion"}
    # FT trains until it has learnt the edits (or its budget), and says which.
    acc = summary["peers"]["ft"]
    assert acc["reached_target"] == (acc["reliability"][-1] >= 0.95) and acc["epochs"] == len(acc["losses"]) <= 30
    assert acc["reached_target"] or acc["epochs"] == 30
    # MEMIT and AlphaEdit wrote the edits (the unedited LM gets none of these targets) on their layers only.
    assert summary["results"]["memit"]["rel_tf"] > 25.0 and summary["results"]["alphaedit"]["rel_tf"] > 25.0
    assert summary["peers"]["memit"]["shared_z_seconds"] == summary["peers"]["alphaedit"]["shared_z_seconds"]
    assert "| MEMIT |" in (out / "results.md").read_text() and "FT: Adam on layer" in (out / "results.md").read_text()
    # An edit prompt's nearest edit is itself, so a routed edit prompt gets its own verified neuron.
    retrieval = summary["results"]["meg_retrieval"]
    assert retrieval["routing_familiar"] == meg["routing_familiar"]
    collect_report = json.loads((run_dir / "collect" / "report.json").read_text())
    if collect_report["success_rate"] == 1.0:
        assert retrieval["rel_ag"] >= retrieval["routing_familiar"]["rel"] - 1e-6, retrieval
    rows = [json.loads(line) for line in (out / "per_example.jsonl").read_text().splitlines()]
    assert len(rows) == 6 * sum(meta["items"].values())
    # Every locality prompt has its kind, and the per-kind counts add up to the Locality items.
    assert {r["locality_kind"] for r in rows if r["group"] == "locality"} <= {"other", "same_subject", "restates_edit"}
    assert sum(k["n"] for k in meg["locality"]["by_kind"].values()) == meta["items"]["locality"]
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert "| MeG |" in (out / "results.md").read_text()
    assert list((run_dir / "tb").rglob("events.out.tfevents.*"))


def test_ask_answers_edit_and_leaves_unrelated_question_alone(run_dir, capsys):
    from megedit.prepare.artifact import load_prepared

    prepared = load_prepared(run_dir / "prepare")
    rows = [json.loads(line) for line in (run_dir / "evaluate" / "per_example.jsonl").read_text().splitlines()]
    meg = {(r["group"], r["edit"], r["pos"]): r for r in rows if r["variant"] == "meg"}
    # An edit the evaluation found right on its prompt and on a paraphrase, and an unrouted locality prompt.
    edit = next(i for i in range(len(prepared.edits)) if meg[("reliability", i, 0)]["ag"] and meg.get(("generality", i, 0), {}).get("ag"))
    loc = next(r for r in rows if r["variant"] == "meg" and r["group"] == "locality" and not r["familiar"]
               and r["kind"] == "question")
    rec = prepared.edits[edit]
    questions = [rec.prompt, rec.paraphrases[0], loc["query"]]
    assert megedit_main(["ask", "--run", str(run_dir), "--kind", "question", "--steps", "20", "--json",
                         "--max-new-tokens", "8", *questions]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [a["question"] for a in answers] == questions
    assert answers[0]["routed"] and answers[0]["answer"].startswith(rec.target_new)
    assert answers[1]["routed"] and answers[1]["answer"].startswith(rec.target_new)
    assert answers[0]["nearest_edit"]["id"] == rec.id and answers[0]["nearest_edit"]["similarity"] > 0.99
    pre = prepared.pre_edit[loc["edit"]]["locality"][loc["pos"]]["text"].strip()
    assert not answers[2]["routed"] and pre.startswith(answers[2]["answer"])
