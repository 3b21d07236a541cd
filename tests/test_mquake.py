"""MQuAKE as an edit set (docs/mquake.md): instances with several atoms, the atom duplicate policy, the
pseudo instances' question <-> atom pairs, one collect item per instance, multi-hop items and measures."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from megedit.collect.views import atom_queries, collect_item
from megedit.data.records import Atom, EditRecord, Probe
from megedit.data.splits import DropReport, dedupe, make_splits, pseudo_group_pairs, record_texts
from megedit.evaluate.items import answer_matches, edit_items
from megedit.evaluate.metrics import multi_hop_summary
from megedit.evaluate.report import multi_hop_table


def instance(i: int, chain: list[tuple[str, str, str]], answer: str = "Arabic", source: str = "mq.json") -> EditRecord:
    """An MQuAKE-like record: ``chain`` is [(subject, relation template, new target)], the first its own prompt."""
    atoms = [Atom(t.format(s), s, new, "old", [f"Q {t.format(s)}?"]) for s, t, new in chain]
    first = atoms[0]
    return EditRecord(id=f"mq:{i}", subject=first.subject, prompt=first.prompt, prompt_kind="completion",
                      target_new=first.target_new, target_true="old", paraphrases=first.paraphrases,
                      locality=[Probe(f"Unrelated{i} lives in", "Paris")], atoms=atoms[1:],
                      multi_hop=[Probe(f"multi-hop {i} {k}?", answer, "question", ["ar", "Arabic language"])
                                 for k in range(3)], source=source, index=i)


def test_atom_policy_keeps_shared_subjects_and_drops_conflicts_and_repeats():
    a = instance(0, [("Hey Jude", "{} was performed by", "Madonna"), ("Madonna", "{} is a citizen of", "India")])
    shares = instance(1, [("Madonna", "{} is a citizen of", "India"), ("India", "The capital of {} is", "Oslo")])
    conflicts = instance(2, [("Yesterday", "{} was performed by", "Adele"), ("Madonna", "{} is a citizen of", "Peru")])
    repeats = instance(3, [("Madonna", "{} is a citizen of", "India"), ("Hey Jude", "{} was performed by", "Madonna")])
    report = DropReport()
    kept = dedupe([a, shares, conflicts, repeats], report, "atoms")
    assert [r.id for r in kept] == ["mq:0", "mq:1"]
    assert report.to_dict()["total_dropped"] == {"conflicting_edit": 1, "duplicate_edit": 1}
    with pytest.raises(ValueError, match="dedupe policy 'nope'"):
        dedupe([a], DropReport(), "nope")


def test_pseudo_instance_pairs_its_multi_hop_questions_with_its_atoms():
    rec = instance(0, [("Hey Jude", "{} was performed by", "Madonna"), ("Madonna", "{} is a citizen of", "India")])
    pairs = pseudo_group_pairs(rec)
    assert {p["anchor"] for p in pairs} == {"Hey Jude was performed by"} and {p["group"] for p in pairs} == {"mq:0"}
    positives = [p["positive"] for p in pairs]
    assert "Madonna is a citizen of" in positives and "Q Madonna is a citizen of?" in positives
    assert [f"multi-hop 0 {k}?" for k in range(3)] == positives[-3:]
    assert record_texts(rec)[0] == rec.prompt and len(record_texts(rec)) == 2 * 2 + 3


def test_split_keeps_pseudo_instances_off_every_edited_atom_subject():
    records = [instance(i, [(f"Song{i}", "{} was performed by", f"Singer{i}"), (f"Singer{i}", "{} is a citizen of",
                                                                               f"Land{i % 3}")]) for i in range(12)]
    records.append(instance(99, [("Other", "{} was performed by", "Someone"), ("Singer0", "{} is a citizen of",
                                                                           "Land0")]))
    splits = make_splits(records, [], n_edits=4, seed=1, n_pseudo_irrelevant=2)
    edited = {a.subject for r in splits.edits for a in r.all_atoms()}
    for r in splits.pseudo_edits:
        assert not any(s in t for s in edited for t in record_texts(r)), r.id
    assert {p["group"] for p in splits.pseudo_pairs} == {r.id for r in splits.pseudo_edits}


def test_collect_item_trains_every_atom_toward_its_own_target():
    rec = instance(0, [("Hey Jude", "{} was performed by", "Madonna"), ("Madonna", "{} is a citizen of", "India")])
    item = collect_item(7, rec, lambda text, kind: f"<{text}>", ["Ctx."], ["Hey Jude, the song, was performed by"])
    assert item.key == 7 and item.required == 2
    assert item.views[:2] == ["<Hey Jude was performed by>", "<Madonna is a citizen of>"]
    assert [item.view_target(v) for v in range(len(item.views))] == ["Madonna", "India", "Madonna", "India", "Madonna"]
    plain = EditRecord("x", "S", "S works for", "completion", "IBM", None)
    single = collect_item(0, plain, lambda t, k: t, [], [])
    assert single.targets is None and single.required == 1 and single.view_target(0) == "IBM"
    assert atom_queries([plain, rec]) == ([0, 1, 1], ["S works for", "Hey Jude was performed by",
                                                       "Madonna is a citizen of"], ["IBM", "Madonna", "India"])


def test_items_score_each_atom_and_the_multi_hop_questions_as_their_own_group():
    rec = instance(0, [("Hey Jude", "{} was performed by", "Madonna"), ("Madonna", "{} is a citizen of", "India")])
    prepared = SimpleNamespace(edits=[rec], pre_edit=[{"locality": [{"tokens": [5]}]}])
    items = edit_items(prepared, [0])
    by_group = {g: [it for it in items if it["group"] == g] for g in ("reliability", "generality", "locality",
                                                                       "multi_hop")}
    assert [(it["query"], it["target"]) for it in by_group["reliability"]] == [
        ("Hey Jude was performed by", "Madonna"), ("Madonna is a citizen of", "India")]
    assert [it["target"] for it in by_group["generality"]] == ["Madonna", "India"]
    assert [it["pos"] for it in by_group["generality"]] == [0, 1] and len(by_group["locality"]) == 1
    hop = by_group["multi_hop"][0]
    assert (hop["target"], hop["aliases"], hop["kind"]) == ("Arabic", ["ar", "Arabic language"], "question")


def test_a_multi_hop_answer_matches_the_new_answer_or_an_alias():
    class Tok:
        def decode(self, tokens, skip_special_tokens=True):
            return {1: " Arabic, spoken", 2: " ar.", 3: " English", 4: " Arab"}[tokens[0]]

    hop = {"group": "multi_hop", "target": "Arabic", "aliases": ["ar", "Arabic language"]}
    assert [answer_matches(Tok(), [t], hop) for t in (1, 2, 3, 4)] == [True, True, False, False]
    assert answer_matches(Tok(), [3], {"group": "reliability", "target": "english"})


def _row(variant, edit, group, ag, familiar=True):
    return {"variant": variant, "edit": edit, "group": group, "ag": ag, "tf": float(ag), "familiar": familiar}


def test_multi_hop_summary_per_question_and_per_instance_and_the_table():
    rows = [_row("meg", 0, "multi_hop", True), _row("meg", 0, "multi_hop", False), _row("meg", 0, "multi_hop", False),
            _row("meg", 1, "multi_hop", False), _row("meg", 1, "multi_hop", False), _row("meg", 1, "multi_hop", False),
            _row("meg", 0, "reliability", True), _row("meg", 0, "reliability", True),
            _row("meg", 1, "reliability", True), _row("meg", 1, "reliability", False),
            _row("base", 0, "multi_hop", False, False), _row("base", 0, "reliability", False, False)]
    out = multi_hop_summary(rows, ["meg", "base"])
    m = out["meg"]
    assert (m["n_questions"], m["n_instances"]) == (6, 2)
    assert (m["multi_hop_question"], m["multi_hop_instance"]) == (16.67, 50.0)
    assert (m["edit_wise"], m["instance_wise"], m["multi_hop_familiar"]) == (75.0, 50.0, 100.0)
    assert out["base"]["multi_hop_instance"] == 0.0
    assert multi_hop_summary([_row("meg", 0, "reliability", True)], ["meg"]) == {}
    table = "\n".join(multi_hop_table({"results": {v: {"multi_hop": r} for v, r in out.items()}}))
    assert "| MeG | 75.00 | 50.00 | **50.00** | 16.67 |" in table and "| base LM (unedited) |" in table


def test_the_router_memorises_an_atom_shared_by_instances_once():
    # Two random labels on one text cannot both be memorised: the router would keep a high entropy there.
    from megedit.familiarity.familiarity_datamodule import edit_texts

    a = instance(0, [("Hey Jude", "{} was performed by", "Madonna"), ("Madonna", "{} is a citizen of", "India")])
    shares = instance(1, [("Madonna", "{} is a citizen of", "India"), ("India", "The capital of {} is", "Oslo")])
    texts = edit_texts([a, shares])
    assert texts["edit_prompts"] == ["Hey Jude was performed by", "Madonna is a citizen of", "The capital of India is"]
    assert len(texts["edit_paraphrases"]) == 4  # scored per atom, as the evaluation scores them
