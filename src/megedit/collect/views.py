"""Training views of an edit: the texts its neuron is optimised on, besides the prompt itself.

A neuron tuned on one string keys on that string's exact activations; a paraphrase moves them.
Training it on several phrasings of the same fact makes it fire on the fact rather than the
string. The phrasings must never come from the evaluation data, so they are built from other
records only:

* ``relation`` views: other records whose prompt has the same relation template (the prompt with
  its subject taken out, e.g. ``"{}, which is located in"``) lend their *paraphrases* as templates,
  with this record's subject put in. Only pseudo edits (records that are never edited) are lent.
* every view is checked against the banned texts (the evaluation paraphrases and locality prompts)
  by :func:`leaks`: equal after lower-casing, collapsing whitespace and removing a leading context
  (any text up to a sentence break), or one ending with the other. A view that leaks is dropped.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from typing import Iterable, Sequence

from megedit.collect.engine import CollectItem, with_prefix

_BREAK = re.compile(r"(?<=[.?!;:\n])\s+")
_MIN_CORE_WORDS = 3  # a shorter tail ("It is") is shared by unrelated prompts: never a reason to match


def normalise(text: str) -> str:
    return " ".join(text.lower().split())


def cores(text: str) -> set[str]:
    """The text and every tail of it that starts after a sentence break (a context prefix removed)."""
    text = normalise(text)
    out = {text}
    for m in _BREAK.finditer(text):
        tail = text[m.end():]
        if len(tail.split()) >= _MIN_CORE_WORDS:
            out.add(tail)
    return out


def word_suffixes(text: str) -> set[str]:
    """Every tail of the normalised text that starts at a word and holds at least ``_MIN_CORE_WORDS`` words."""
    words = normalise(text).split()
    return {" ".join(words[i:]) for i in range(max(1, len(words) - _MIN_CORE_WORDS + 1))}


class LeakGuard:
    """Answers "does this view equal a banned text, up to case, whitespace and a context prefix?".

    A view leaks when it equals a banned text, ends with one (a context put before it), is the end of one
    (the banned text is the view with a context before it), or both have the same text after a sentence
    break. Every test is a set lookup, so a guard over 10k edits' texts stays cheap per view.
    """

    def __init__(self, banned: Iterable[str]):
        self.texts: set[str] = set()
        self.tails: set[str] = set()
        self.cores: set[str] = set()
        for text in banned:
            self.texts.add(normalise(text))
            self.tails |= word_suffixes(text)
            self.cores |= cores(text)

    def leaks(self, view: str) -> bool:
        v = normalise(view)
        return (v in self.texts or v in self.tails or bool(word_suffixes(view) & self.texts)
                or bool(cores(view) & self.cores))


def evaluation_texts(records: Sequence) -> list[str]:
    """The texts of ``records`` that measure an edit and so must never be trained on: paraphrases and
    locality prompts (the prompt itself is the edit's own training text)."""
    return [t for r in records for t in (*r.paraphrases, *(q.prompt for q in r.locality))]


def relation_template(prompt: str, subject: str | None) -> str | None:
    """The prompt with its (first) subject replaced by ``{}``; None when the subject is not in it."""
    if not subject or subject not in prompt:
        return None
    return prompt.replace(subject, "{}", 1)


def relation_views(records: Sequence, pool: Sequence, k: int, guard: LeakGuard, seed: int = 0) -> list[list[str]]:
    """Per record, up to ``k`` rephrasings lent by ``pool`` records of the same relation template.

    A pool record lends each paraphrase that holds its own subject; the subject is swapped for the
    record's. The record itself, its own paraphrases and anything ``guard`` rejects never appear.
    """
    if k <= 0:
        return [[] for _ in records]
    by_template: dict[str, list[str]] = defaultdict(list)
    for rec in pool:
        template = relation_template(rec.prompt, rec.subject)
        if template is None:
            continue
        for para in rec.paraphrases:
            lent = relation_template(para, rec.subject)
            if lent is not None:
                by_template[template].append(lent)
    rng = random.Random(f"{seed}:relation-views")
    out = []
    for rec in records:
        template = relation_template(rec.prompt, rec.subject)
        own = LeakGuard([rec.prompt, *rec.paraphrases])
        seen, views = set(), []
        candidates = list(by_template.get(template, [])) if template else []
        rng.shuffle(candidates)
        for lent in candidates:
            text = lent.replace("{}", rec.subject, 1)
            key = normalise(text)
            if key in seen or own.leaks(text) or guard.leaks(text):
                continue
            seen.add(key)
            views.append(text)
            if len(views) == k:
                break
        out.append(views)
    return out


__all__ = ["LeakGuard", "atom_queries", "collect_item", "cores", "evaluation_texts", "normalise",
           "relation_template", "relation_views"]


def edit_views(edit, format_prompt, prefixes: Sequence[str], extra: Sequence[str]) -> list[str]:
    """The LM strings an edit's neuron is trained on: its prompt, context-prefixed copies of it, then its
    relation views (``extra``), each in the model's template for the edit's prompt kind."""
    texts = [edit.prompt] + [with_prefix(p, edit.prompt) for p in prefixes] + list(extra)
    return [format_prompt(t, edit.prompt_kind) for t in texts]


def collect_item(key, edit, format_prompt, prefixes: Sequence[str], extra: Sequence[str]) -> CollectItem:
    """What the engine optimises an edit's one neuron on. A one-atom edit: ``edit_views`` toward its target.
    An edit with several atoms (an MQuAKE instance): every atom's prompt first, each toward its own target and
    each required for success, then their context-prefixed copies, then the relation views (``extra``, lent
    for the first atom's prompt)."""
    if not edit.atoms:
        return CollectItem(key, edit_views(edit, format_prompt, prefixes, extra), edit.target_new, edit.subject)
    atoms = edit.all_atoms()
    texts = [a.prompt for a in atoms] + [with_prefix(p, a.prompt) for p in prefixes for a in atoms] + list(extra)
    targets = [a.target_new for a in atoms] * (1 + len(prefixes)) + [edit.target_new] * len(extra)
    return CollectItem(key, [format_prompt(t, edit.prompt_kind) for t in texts], edit.target_new, edit.subject,
                       targets=targets, required=len(atoms))


def atom_queries(edits: Sequence) -> tuple[list[int], list[str], list[str]]:
    """Every atom of ``edits`` flattened: (owner position in ``edits``, prompt, target)."""
    flat = [(k, a.prompt, a.target_new) for k, e in enumerate(edits) for a in e.all_atoms()]
    return [k for k, _, _ in flat], [p for _, p, _ in flat], [t for _, _, t in flat]
