"""Training views lent by other records, and the guard that keeps every evaluation text out of training."""

from __future__ import annotations

from megedit.collect.views import LeakGuard, evaluation_texts, relation_template, relation_views
from megedit.data.records import EditRecord, Probe


def _rec(i, subject, prompt, paraphrases, locality=()):
    return EditRecord(id=f"r{i}", subject=subject, prompt=prompt, prompt_kind="completion", target_new="X",
                      target_true=None, paraphrases=list(paraphrases), locality=[Probe(p) for p in locality])


def test_guard_catches_case_whitespace_and_context_prefixes():
    guard = LeakGuard(["and Sallie Riley. Madrid University is located in", "Toko Yasuda is incredible at"])
    for leaked in ["madrid university  is located in", "Some other context. Madrid University is located in",
                   "TOKO YASUDA is incredible at", "Prefix words without a break Toko Yasuda is incredible at",
                   "and Sallie Riley. Madrid University is located in"]:
        assert guard.leaks(leaked), leaked
    for fine in ["Madrid University is in", "Toko Yasuda plays the", "Madrid University, which is located in"]:
        assert not guard.leaks(fine), fine


def test_relation_views_lend_other_records_templates_and_never_an_evaluation_text():
    edit = _rec(0, "Toko Yasuda", "Toko Yasuda, the", ["Toko Yasuda is incredible at"])
    pool = [
        _rec(1, "Ann Lee", "Ann Lee, the", ["Ann Lee performs on the", "Ann Lee is incredible at",
                                            "Lovely day. Ann Lee plays the"]),
        _rec(2, "Bo Chu", "Bo Chu, the", ["Bo Chu is known for playing the", "Unrelated text without subject"]),
        _rec(3, "Cy Dee", "Cy Dee was born in", ["Cy Dee's birthplace is"]),  # another relation: never lent
    ]
    banned = LeakGuard(["Toko Yasuda is known for playing the"])  # e.g. another edit's evaluation paraphrase
    (views,) = relation_views([edit], pool, k=10, guard=banned)
    assert sorted(views) == ["Lovely day. Toko Yasuda plays the", "Toko Yasuda performs on the"]
    # "is incredible at" is the edit's own paraphrase, "is known for playing" a banned text: both dropped.
    assert relation_views([edit], pool, k=1, guard=banned)[0][0] in views
    assert relation_views([edit], pool, k=0, guard=banned) == [[]]
    assert relation_template("Cy Dee was born in", "Cy Dee") == "{} was born in"
    assert relation_template("Cy Dee was born in", "Nobody") is None
    assert evaluation_texts([_rec(4, "S", "S is", ["S para"], ["loc prompt"])]) == ["S para", "loc prompt"]
