"""Duplicate policy and the seeded, subject-disjoint, leak-free split."""

from __future__ import annotations

from megedit.data.records import EditRecord, ParaphraseGroup, Probe
from megedit.data.splits import DropReport, SubjectMatcher, dedupe_by_subject, make_splits


def rec(i, subject, prompt=None, target="X", paraphrase=True, locality=True, source="f.json"):
    return EditRecord(id=f"f:{i}", subject=subject, prompt=prompt or f"{subject} works for", prompt_kind="completion",
                      target_new=target, target_true="Y", paraphrases=[f"{subject} is employed by"] if paraphrase else [],
                      locality=[Probe(f"Someone{i} works for", "Z")] if locality else [], source=source, index=i)


def test_dedupe_keeps_first_per_subject_and_names_the_reason():
    report = DropReport()
    kept = dedupe_by_subject([rec(0, "A"), rec(1, "A", target="Q"), rec(2, "A"), rec(3, "A", prompt="A lives in"),
                              rec(4, "B")], report)
    assert [r.id for r in kept] == ["f:0", "f:4"]
    d = report.to_dict()
    assert d["files"]["f.json"] == {"read": 5, "kept": 2,
                                    "dropped": {"conflicting_edit": 1, "duplicate_edit": 1, "same_subject": 1}}
    assert d["examples"]["conflicting_edit"] == ["f:1"]


def test_subject_matcher_matches_whole_words_only():
    m = SubjectMatcher(["Go", "New York City"])
    assert m.mentions("I live in new york city now") and m.mentions("Go is a language")
    assert not m.mentions("Google is big") and not m.mentions("New York is big")


def test_split_is_seeded_disjoint_and_leak_free():
    records = [rec(i, f"Subject{i}") for i in range(60)] + [rec(100 + i, f"Loner{i}", paraphrase=False) for i in range(5)]
    # A pseudo record whose prompt is an edit's locality prompt, one that mentions an edit subject.
    groups = [ParaphraseGroup("g:0", ["Who employs Carl?", "Carl works where?"]),
              ParaphraseGroup("g:1", ["Where does Subject3 work?", "Subject3's employer?"])]
    a = make_splits(records, groups, n_edits=10, seed=1, n_pseudo_irrelevant=5)
    b = make_splits(records, groups, n_edits=10, seed=1, n_pseudo_irrelevant=5)
    c = make_splits(records, groups, n_edits=10, seed=2, n_pseudo_irrelevant=5)
    assert [r.id for r in a.edits] == [r.id for r in b.edits] != [r.id for r in c.edits]
    edit_subjects = {r.subject for r in a.edits}
    pseudo_subjects = {r.subject for r in a.pseudo_edits}
    irrelevant_subjects = {r["subject"] for r in a.pseudo_irrelevant}
    assert not edit_subjects & pseudo_subjects and not edit_subjects & irrelevant_subjects
    assert not pseudo_subjects & irrelevant_subjects
    eval_texts = {t for r in a.edits for t in (*r.paraphrases, *(p.prompt for p in r.locality))}
    train_texts = {t for p in a.pseudo_pairs for t in (p["anchor"], p["positive"])}
    assert not eval_texts & train_texts
    assert all(r.paraphrases and r.locality for r in a.edits)
    assert len(a.pseudo_irrelevant) == 5 and a.counts["edits"] == 10
    if "Subject3" in edit_subjects:
        assert a.counts["corpus_leak_filtered"] == 1


def test_small_benchmarks_keep_pseudo_edits():
    records = [rec(i, f"Subject{i}") for i in range(30)]
    s = make_splits(records, [], n_edits=10, seed=0, n_pseudo_irrelevant=2048)
    assert len(s.pseudo_irrelevant) == 10 and len(s.pseudo_edits) == 10
    assert s.counts["pseudo_irrelevant_short_by"] == 2048 - 10


def test_split_refuses_more_edits_than_eligible_records():
    import pytest

    with pytest.raises(ValueError, match="asked for 5 edits but only 2 records"):
        make_splits([rec(0, "A"), rec(1, "B"), rec(2, "C", locality=False)], [], n_edits=5, seed=0)
