"""Hard negatives for the encoder: templates, the same-relation filter, the triple loss by hand."""

from __future__ import annotations

import math

import pytest
import torch

from megedit.components.contrastive import info_nce, info_nce_with_hard_negatives, pairwise_auc
from megedit.data.records import EditRecord, Probe
from megedit.data.locality_kinds import locality_kind, mentions_subject
from megedit.encoder.hard_negatives import (SLOT, HardNegativeTriples, build_sources, content_stems,
                                            first_triple_per_anchor, other_relations, relation_templates,
                                            specificity_sources, subject_template)


def _record(rid: str, subject: str, prompt: str, locality: list[str], paraphrases=("a paraphrase",)) -> EditRecord:
    return EditRecord(id=rid, subject=subject, prompt=prompt, prompt_kind="question", target_new="x",
                      target_true=None, paraphrases=list(paraphrases), locality=[Probe(p) for p in locality])


def test_subject_template_needs_a_whole_phrase():
    assert subject_template("CD83", "The cell component of cd83 is") == f"The cell component of {SLOT} is"
    assert subject_template("Bundesautobahn 6", "Bundesautobahn 648 owner") is None
    assert subject_template("", "anything") is None
    assert mentions_subject("Bundesautobahn 6", "Bundesautobahn 648 owner")  # substring: the router's wider test


def test_content_stems_meet_across_inflections_and_drop_the_subject():
    assert content_stems("Who fathered Moritz of Limburg?", exclude="Moritz of Limburg") == {"fathe"}
    assert content_stems("The father of X is") & content_stems("Who fathered Y?")
    assert not content_stems("The cell component of X is") & content_stems("Which species has the X gene?")


def test_build_sources_uses_training_groups_and_skips_same_relation_and_evaluation_texts():
    edits = [
        _record("a", "CD83", "Which species has the CD83 gene?",
                ["The cell component of CD83 is", "CD83 cell component", "Who won the 1990 cup?"]),
        _record("b", "Moritz of Limburg", "Who fathered Moritz of Limburg?",
                ["The father of Moritz of Limburg is", "The place of birth of Moritz of Limburg is"]),
        _record("c", "Held Out", "Which species has the Held Out gene?", ["The mother of Held Out is"]),
        _record("d", "Leaky", "What is Leaky?", ["The eval text about Leaky is"]),
    ]
    sources, templates, counts = build_sources(edits, {"a", "b", "d"}, evaluation={"The eval text about Leaky is"})
    by_group = {s.group: s for s in sources}
    # Held-out "c" gives neither a source nor a template; the evaluation text gives neither either.
    assert "c" not in by_group and not any("mother" in t for t in templates)
    assert not any("eval text" in t for t in templates) and not by_group["d"].natural
    assert by_group["a"].natural == ["The cell component of CD83 is", "CD83 cell component"]
    # "The father of ... is" shares the relation with "Who fathered ...?": not a negative of it, natural or swapped.
    assert by_group["b"].natural == ["The place of birth of Moritz of Limburg is"]
    b_templates = {templates[k] for k in by_group["b"].templates}
    assert f"The father of {SLOT} is" not in b_templates and f"The cell component of {SLOT} is" in b_templates
    assert counts == {"sources": 3, "natural": 3, "templates": 4, "groups_with_natural": 2}


def test_triple_epochs_visit_every_source_and_batches_drop_repeated_anchors():
    edits = [_record(f"r{i}", f"S{i}", f"Which species has the S{i} gene?", [f"The mother of S{i} is"])
             for i in range(10)]
    sources, templates, _ = build_sources(edits, {e.id for e in edits}, evaluation=set())
    short = HardNegativeTriples(sources, templates, seed=0, length=4)  # fewer items than sources
    assert len(short) == 4
    seen = set()
    for epoch in range(6):
        short.epoch = epoch
        seen |= {short[i]["anchor"] for i in range(4)}
    assert len(seen) > 4  # a fresh order per epoch, not always the first four sources
    batch = {"anchor": ["a", "b", "a"], "positive": ["pa", "pb", "pa2"], "negative": ["na", "nb", "na2"]}
    assert first_triple_per_anchor(batch) == {"anchor": ["a", "b"], "positive": ["pa", "pb"], "negative": ["na", "nb"]}


def test_triples_are_stable_fresh_per_epoch_and_name_the_subject():
    edits = [_record(f"r{i}", f"Subject{i}", f"Which species has the Subject{i} gene?",
                     [f"The cell component of Subject{i} is", f"The mother of Subject{i} is"],
                     paraphrases=(f"p1 of {i}", f"p2 of {i}")) for i in range(6)]
    sources, templates, _ = build_sources(edits, {e.id for e in edits}, evaluation=set())
    ds = HardNegativeTriples(sources, templates, seed=3, length=30)
    assert len(ds) == 30
    first = [ds[i] for i in range(len(ds))]
    assert first == [HardNegativeTriples(sources, templates, seed=3, length=30)[i] for i in range(30)]
    kinds = set()
    for t in first:
        k = next(j for j, e in enumerate(edits) if e.prompt == t["anchor"])
        assert t["positive"] in edits[k].paraphrases and t["negative"] != t["anchor"]
        if f"Subject{k} " in t["negative"] + " ":
            kinds.add("other relation")  # natural or template: another fact about the anchor's subject
        else:  # the anchor's own question about another source's subject
            other = t["negative"].removeprefix("Which species has the ").removesuffix(" gene?")
            assert other in {e.subject for e in edits} - {edits[k].subject}
            kinds.add("other subject")
    assert kinds == {"other relation", "other subject"}
    assert {t["anchor"] for t in first} == {e.prompt for e in edits}  # 30 items over 6 sources: each one
    ds.epoch = 1
    assert [ds[i] for i in range(30)] != first
    with pytest.raises(ValueError, match="no hard-negative source"):
        HardNegativeTriples([], templates, seed=0)


def test_triple_loss_matches_hand_computation():
    # anchor a=(1,0), positive p=(0.6,0.8), hard negative n=(0.8,0.6); one triple, tau=1.
    # positive -> [a, n]: logits [0.6, 0.96], target a: log(1 + e^0.36)
    # anchor   -> [p, n]: logits [0.6, 0.8],  target p: log(1 + e^0.2)
    a, p, n = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.6, 0.8]]), torch.tensor([[0.8, 0.6]])
    expected = (math.log(1 + math.exp(0.36)) + math.log(1 + math.exp(0.2))) / 2
    assert info_nce_with_hard_negatives(a, p, n, 1.0).item() == pytest.approx(expected, abs=1e-6)
    # The hard negatives only add candidates: far-away ones leave eq. 5 (both directions) unchanged.
    far = -a
    plain = (info_nce(p, a, 0.05) + info_nce(a, p, 0.05)) / 2
    assert info_nce_with_hard_negatives(a, p, far, 0.05).item() == pytest.approx(plain.item(), abs=1e-6)
    with pytest.raises(ValueError, match="one hard negative per triple"):
        info_nce_with_hard_negatives(a, p, torch.cat([n, n]), 1.0)


def test_pairwise_auc():
    assert pairwise_auc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert pairwise_auc(torch.tensor([1.0]), torch.tensor([1.0, 2.0])) == 0.25  # one tie (half), one loss
    assert pairwise_auc(torch.tensor([]), torch.tensor([1.0])) is None


def test_locality_kinds_split_restatements_from_other_facts_about_the_subject():
    edit = _record("e", "32 Pegasi", "What constellation is 32 Pegasi in?", [])
    edit.target_true = "Pegasus"
    assert locality_kind(edit, Probe("The constellation of 32 Pegasi is", answer=" pegasus")) == "restates_edit"
    assert locality_kind(edit, Probe("The distance of 32 Pegasi is", answer="550 ly")) == "same_subject"
    assert locality_kind(edit, Probe("Who wrote Hamlet?", answer="Pegasus")) == "other"  # same answer, other subject
    edit.target_true = None  # no original answer: nothing can restate it
    assert locality_kind(edit, Probe("The constellation of 32 Pegasi is", answer="")) == "same_subject"


def test_a_restatement_is_never_a_negative_natural_or_rebuilt():
    edit = _record("e", "32 Pegasi", "Which sky region holds 32 Pegasi?",  # no content word shared with
                   ["The constellation of 32 Pegasi is", "The distance of 32 Pegasi is"])  # ... its restatement
    edit.target_true = "Pegasus"
    edit.locality[0].answer = "Pegasus"
    # Another record brings the same relation's template: filled with 32 Pegasi it would rebuild the restatement.
    other = _record("o", "HD 1", "What is the mass of HD 1?", ["The constellation of HD 1 is"])
    sources, templates, _ = build_sources([edit, other], {"e", "o"}, evaluation=set())
    mine = next(s for s in sources if s.group == "e")
    assert mine.natural == ["The distance of 32 Pegasi is"]
    assert f"The constellation of {SLOT} is" in templates  # from "o", where it is another relation
    ds = HardNegativeTriples(sources, templates, seed=0, length=200)
    negatives = {ds[i]["negative"] for i in range(len(ds)) if ds[i]["anchor"] == edit.prompt}
    assert negatives and "The constellation of 32 Pegasi is" not in {n for n in negatives}


def test_only_sources_that_test_relation_specificity_give_templates_and_natural_negatives():
    # "cf": one record in three has a locality prompt naming its subject (another entity's name containing
    # it); "zsre": every record asks another fact about its subject.
    cf = [_record(f"c{i}", f"Fiat {i}", f"Fiat {i} is produced by", [f"The twin of Fiat {i} is" if i == 0 else "x"])
          for i in range(3)]
    zsre = [_record(f"z{i}", f"Gene{i}", f"Which species has the Gene{i} gene?", [f"The cell component of Gene{i} is"])
            for i in range(2)]
    for r in cf:
        r.source = "cf.json"
    for r in zsre:
        r.source = "zsre.json"
    assert specificity_sources(cf + zsre) == {"zsre.json"}
    assert relation_templates(cf + zsre, evaluation=set()) == [f"The cell component of {SLOT} is"]
    sources, _, counts = build_sources(cf + zsre, {r.id for r in cf + zsre}, evaluation=set())
    assert all(not s.natural for s in sources if s.group.startswith("c")) and counts["groups_with_natural"] == 2
    # CounterFact alone: no template, no natural negative, no source; the encoder trains on eq. 5 alone.
    assert build_sources(cf, {r.id for r in cf}, evaluation=set())[0] == []
    assert other_relations("Which species has the X gene?", "X", ["The species of \x00 is", "The cell of \x00 is"]) == [1]


def test_the_other_subject_is_never_the_anchors_own():
    # Two sources name one subject in two cases; the third is the only other subject there is.
    edits = [_record("a", "Gene", "Which species has the Gene gene?", ["The mother of Gene is"]),
             _record("b", "GENE", "Which family has the GENE gene?", ["The father of GENE is"]),
             _record("c", "Other", "Which species has the Other gene?", ["The cell of Other is"])]
    sources, templates, _ = build_sources(edits, {"a", "b", "c"}, evaluation=set())
    ds = HardNegativeTriples(sources, templates, seed=0, length=300)
    for i in range(len(ds)):
        t = ds[i]
        assert t["negative"] != t["anchor"]
        if t["anchor"].startswith("Which species has the Gene"):
            assert t["negative"] != "Which species has the GENE gene?"
    # One subject only: no "other subject" negative can exist, so none is drawn.
    alone = HardNegativeTriples(sources[:1], templates, seed=0, length=20)
    assert all("Gene" in alone[i]["negative"] and alone[i]["negative"] != alone[i]["anchor"] for i in range(20))
