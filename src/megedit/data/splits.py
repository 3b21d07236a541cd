"""Deduplication policy and the seeded, subject-disjoint split into edits and pseudo sets.

Policy (documented in docs/prepare.md): the paper keeps one instance per subject, so the first
record of each subject (in file order, files in the order the dataset config lists them)
is kept and every later one is dropped with a reason:
- ``conflicting_edit``: same subject and prompt as a kept record, different ``target_new``;
- ``duplicate_edit``: same subject, prompt and ``target_new``;
- ``same_subject``: same subject, another prompt.
Records that cannot serve as edits (no paraphrase or no locality prompt) stay available for
the pseudo sets and are counted, not dropped silently.

A dataset whose records carry several atomic rewrites (MQuAKE instances, ``EditRecord.atoms``) shares
subjects between records by design (one instance's new object is the next hop's subject), so its preset
says ``dedupe: atoms``: a record is dropped only when one of its atoms contradicts a kept record's atom
(``conflicting_edit``: same subject and prompt, another target) or all its atoms repeat one kept record's
(``duplicate_edit``).
"""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from megedit.data.records import EditRecord, ParaphraseGroup

_WORD = re.compile(r"\w+", re.UNICODE)


@dataclass
class DropReport:
    """Per file: how many records were read, kept and dropped, and why (with example ids)."""

    read: Counter = field(default_factory=Counter)
    kept: Counter = field(default_factory=Counter)
    dropped: dict = field(default_factory=lambda: defaultdict(Counter))
    examples: dict = field(default_factory=lambda: defaultdict(list))

    def drop(self, source: str, reason: str, record_id: str) -> None:
        self.dropped[source][reason] += 1
        if reason == "invalid_record" or len(self.examples[reason]) < 5:  # every invalid record is listed
            self.examples[reason].append(record_id)

    def to_dict(self) -> dict:
        files = sorted(set(self.read) | set(self.dropped))
        return {
            "files": {f: {"read": self.read[f], "kept": self.kept[f], "dropped": dict(self.dropped[f])} for f in files},
            "total_read": sum(self.read.values()),
            "total_dropped": {r: sum(c[r] for c in self.dropped.values())
                              for r in sorted({r for c in self.dropped.values() for r in c})},
            "examples": dict(self.examples),
        }


def dedupe_by_subject(records: list[EditRecord], report: DropReport) -> list[EditRecord]:
    kept: dict[str, EditRecord] = {}
    out = []
    for rec in records:
        report.read[rec.source] += 1
        first = kept.get(rec.subject)
        if first is None:
            kept[rec.subject] = rec
            out.append(rec)
            report.kept[rec.source] += 1
        elif first.prompt == rec.prompt:
            reason = "duplicate_edit" if first.target_new == rec.target_new else "conflicting_edit"
            report.drop(rec.source, reason, rec.id)
        else:
            report.drop(rec.source, "same_subject", rec.id)
    return out


def dedupe_by_atoms(records: list[EditRecord], report: DropReport) -> list[EditRecord]:
    """The ``atoms`` policy (module docstring): keep every record whose atoms agree with the kept ones."""
    targets: dict[tuple[str, str], str] = {}
    signatures: set[tuple] = set()
    out = []
    for rec in records:
        report.read[rec.source] += 1
        atoms = rec.all_atoms()
        signature = tuple(sorted((a.subject, a.prompt, a.target_new) for a in atoms))
        if any(targets.get((a.subject, a.prompt), a.target_new) != a.target_new for a in atoms):
            report.drop(rec.source, "conflicting_edit", rec.id)
        elif signature in signatures:
            report.drop(rec.source, "duplicate_edit", rec.id)
        else:
            signatures.add(signature)
            targets.update(((a.subject, a.prompt), a.target_new) for a in atoms)
            out.append(rec)
            report.kept[rec.source] += 1
    return out


DEDUPE_POLICIES = {"subject": dedupe_by_subject, "atoms": dedupe_by_atoms}


def dedupe(records: list[EditRecord], report: DropReport, policy: str = "subject") -> list[EditRecord]:
    """The duplicate policy a dataset preset names (``dedupe:``, default ``subject``)."""
    if policy not in DEDUPE_POLICIES:
        raise ValueError(f"dedupe policy {policy!r}: expected one of {', '.join(DEDUPE_POLICIES)}")
    return DEDUPE_POLICIES[policy](records, report)


def record_texts(rec: EditRecord) -> list[str]:
    """Every text a record holds about its own facts: each atom's prompt and paraphrases, its multi-hop
    questions (for a one-atom record without multi-hop questions: its prompt and paraphrases)."""
    return [t for a in rec.all_atoms() for t in (a.prompt, *a.paraphrases)] + [q.prompt for q in rec.multi_hop]


def pseudo_group_pairs(rec: EditRecord) -> list[dict]:
    """A pseudo record's encoder pairs, one group per record: its prompt as the anchor; its paraphrases, its
    other atoms' prompts and paraphrases and its multi-hop questions as positives (a multi-hop question
    lands near the atomic facts it is made of)."""
    return [{"anchor": rec.prompt, "positive": p, "group": rec.id, "source": rec.source}
            for p in record_texts(rec)[1:]]


def _key(text: str) -> tuple[str, ...]:
    return tuple(w.lower() for w in _WORD.findall(text))


class SubjectMatcher:
    """Finds whether a text mentions any of a set of subjects (whole words, case-insensitive), in O(len(text))."""

    def __init__(self, subjects):
        self.keys = {_key(s) for s in subjects} - {()}
        self.max_len = max((len(k) for k in self.keys), default=0)

    def mentions(self, text: str) -> bool:
        words = _key(text)
        for n in range(1, self.max_len + 1):
            for i in range(len(words) - n + 1):
                if words[i:i + n] in self.keys:
                    return True
        return False


class PseudoFilter:
    """Texts the edits are evaluated on, and their subjects, may not reach any training set: ``clean(texts)``
    is False when one of ``texts`` equals an evaluation text of ``edits`` (a paraphrase, locality,
    portability or multi-hop prompt) or mentions an edit's subject (whole words, case-insensitive)."""

    def __init__(self, edits: list[EditRecord]):
        self.forbidden = {t for r in edits for t in (*(p for a in r.all_atoms() for p in a.paraphrases),
                                                     *(p.prompt for p in r.locality),
                                                     *(p.prompt for p in r.portability),
                                                     *(p.prompt for p in r.multi_hop))}
        self.subjects = SubjectMatcher(a.subject for r in edits for a in r.all_atoms())

    def clean(self, texts) -> bool:
        return not any(t in self.forbidden or self.subjects.mentions(t) for t in texts)


@dataclass
class Splits:
    edits: list[EditRecord]
    pseudo_edits: list[EditRecord]
    pseudo_pairs: list[dict]
    pseudo_irrelevant: list[dict]
    counts: dict


def is_edit_eligible(rec: EditRecord) -> bool:
    return bool(rec.paraphrases) and bool(rec.locality)


def make_splits(records: list[EditRecord], groups: list[ParaphraseGroup], n_edits: int, seed: int,
                n_pseudo_irrelevant: int = 2048, max_pseudo_edits: int | None = None) -> Splits:
    """Seeded split, disjoint by subject, with nothing of the edits' evaluation texts in the training sets.

    ``records`` must already be deduplicated by subject. ``n_edits`` may exceed the final N when
    the prepare stage keeps only edits the base model gets wrong (it asks for candidates).
    """
    rng = random.Random(seed)
    order = list(records)
    rng.shuffle(order)
    eligible = [r for r in order if is_edit_eligible(r)]
    if len(eligible) < n_edits:
        raise ValueError(
            f"asked for {n_edits} edits but only {len(eligible)} records have both a paraphrase and a locality "
            f"prompt (of {len(records)} after deduplication); lower N or add files to the dataset config")
    edits = eligible[:n_edits]
    edit_ids = {r.id for r in edits}
    rest = [r for r in order if r.id not in edit_ids]

    clean = PseudoFilter(edits).clean
    counts = Counter()

    # On a small benchmark the irrelevant set may take at most half of what is left, so the pseudo-edit
    # set (encoder pairs, threshold calibration, transfer diagnostics) never ends up empty.
    irrelevant_cap = min(n_pseudo_irrelevant, len(rest) // 2)
    irrelevant, pseudo_edits = [], []
    for rec in rest:
        if not clean(record_texts(rec)):
            counts["pseudo_leak_filtered"] += 1
            continue
        if len(irrelevant) < irrelevant_cap:
            irrelevant.append({"id": rec.id, "subject": rec.subject, "prompt": rec.prompt,
                               "prompt_kind": rec.prompt_kind, "source": rec.source})
        elif len(record_texts(rec)) > 1 and (max_pseudo_edits is None or len(pseudo_edits) < max_pseudo_edits):
            pseudo_edits.append(rec)
        else:
            counts["pseudo_unused_no_paraphrase_or_cap"] += 1

    pairs = [pair for r in pseudo_edits for pair in pseudo_group_pairs(r)]
    for g in groups:
        if not clean(g.texts):
            counts["corpus_leak_filtered"] += 1
            continue
        pairs.extend({"anchor": g.texts[0], "positive": t, "group": g.id, "source": g.source} for t in g.texts[1:])
    counts.update(edits=len(edits), pseudo_edits=len(pseudo_edits), pseudo_pairs=len(pairs),
                  pseudo_irrelevant=len(irrelevant), not_edit_eligible=len(order) - len(eligible))
    if len(irrelevant) < n_pseudo_irrelevant:
        counts["pseudo_irrelevant_short_by"] = n_pseudo_irrelevant - len(irrelevant)
    return Splits(edits, pseudo_edits, pairs, irrelevant, dict(counts))
