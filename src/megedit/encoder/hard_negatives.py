"""Hard negatives for the encoder: other facts about the same subject (KnowEdit's relation specificity).

Eq. 5 only contrasts a paraphrase with *other facts' originals*, which mostly name other subjects,
so the encoder learns "same subject = same place". The router memorises edit prompts, and a
prompt about the edited subject's other facts ("The cell component of CD83 is" next to the edit
"Which species has the CD83 gene?") then lands inside the familiar region: on ZsRE-1024 only
36.7% of those locality prompts were routed unfamiliar. Hard negatives teach the encoder that
the relation matters too.

Triples come from the *training* pseudo edits (never the held-out ones, which calibrate the
router, and never an evaluation text), and only when the data has relation templates at all
(:func:`relation_templates`, from sources that test relation specificity, :func:`specificity_sources`;
CounterFact has none, so its encoder trains on eq. 5 alone). Three kinds of hard negative:
- natural: a pseudo edit's own locality prompts about its subject (specificity sources only);
- another relation: a relation template ("The cell component of {} is") filled with the pseudo
  edit's subject, for every subject-bearing training pseudo edit (ZsRE's MEND records too);
- another subject: the pseudo edit's own question about another source's subject. Without it the
  encoder learns to ignore subjects and other subjects' questions crowd the edits.
A locality prompt whose expected answer is the pseudo edit's own original answer restates its fact
(``locality_kinds.restates_edit``) and is never a natural negative. A template that shares a
content word with the anchor (other than the subject's) is skipped:
"The father of {} is" is a paraphrase, not a negative, of "Who fathered Moritz of Limburg?".

The familiarity stage reuses the templates (:func:`relation_templates`, :func:`other_relations`) for
the router's fences.
"""

from __future__ import annotations

import random
import re
from collections import defaultdict
from dataclasses import dataclass

from torch.utils.data import Dataset

from megedit.data.locality_kinds import locality_kind, normalise

SLOT = "\x00"  # the subject's place in a template (a character no prompt contains)
_STOP = {"what", "which", "whom", "whose", "where", "when", "does", "that", "this", "with", "from", "into",
         "have", "been", "were", "there", "their", "about", "after", "before", "other", "name"}


def subject_template(subject: str, prompt: str) -> str | None:
    """``prompt`` with its (first, case-insensitive) mention of ``subject`` replaced by :data:`SLOT`.

    None unless the mention is a whole phrase (word boundaries on both sides): "Bundesautobahn 648
    owner" is not a template of "Bundesautobahn 6".
    """
    if not subject:
        return None
    m = re.search(r"(?<!\w)" + re.escape(subject) + r"(?!\w)", prompt, flags=re.IGNORECASE)
    if m is None:
        return None
    return prompt[:m.start()] + SLOT + prompt[m.end():]


def content_stems(text: str, exclude: str = "") -> set[str]:
    """Lower-cased words of 4+ letters cut to 5 (so "father" meets "fathered"), minus stop words and ``exclude``'s."""
    drop = {w[:5] for w in re.findall(r"[a-z]+", exclude.lower())}
    return {w[:5] for w in re.findall(r"[a-z]+", text.lower()) if len(w) >= 4 and w not in _STOP} - drop


@dataclass
class TripleSource:
    group: str  # the pseudo edit's id
    anchor: str
    positives: list[str]
    subject: str
    natural: list[str]  # its own locality prompts about its subject, minus those sharing the relation
    templates: list[int]  # indices of the swap templates that share no content word with the anchor
    own_template: str | None = None  # the anchor itself with SLOT for its subject (same question, other subject)


def specificity_sources(records, min_share: float = 0.5) -> set[str]:
    """Sources (files) that test relation specificity: at least ``min_share`` of their records have a
    locality prompt naming their subject as a whole phrase.

    KnowEdit ZsRE: all of them. CounterFact: 15 of 8 192 pseudo edits, and those are neighbourhood
    prompts about *other* entities whose name contains the subject ("Vanderbilt University Department
    of ... is headquartered in"), not relation templates; such a source gives no hard negative.
    """
    have, total = defaultdict(int), defaultdict(int)
    for r in records:
        total[r.source] += 1
        have[r.source] += any(subject_template(r.subject, p.prompt) is not None for p in r.locality)
    return {src for src in total if have[src] >= min_share * total[src]}


def relation_templates(records, evaluation: set[str]) -> list[str]:
    """The relation templates ("The cell component of {SLOT} is") of ``records``' locality prompts about their
    subject, from sources that test relation specificity; never from an evaluation text nor from a prompt
    that restates its record's own fact (that template is the record's own relation). A template without a
    content word names no relation and is skipped."""
    sources = specificity_sources(records)
    templates: list[str] = []
    for r in records:
        if r.source not in sources:
            continue
        for p in r.locality:
            skip = p.prompt in evaluation or locality_kind(r, p) == "restates_edit"
            t = None if skip else subject_template(r.subject, p.prompt)
            if t is not None and t not in templates and content_stems(t.replace(SLOT, " ")):
                templates.append(t)
    return templates


def other_relations(prompt: str, subject: str, templates: list[str]) -> list[int]:
    """Indices of the templates that share no content word with ``prompt`` (outside the subject)."""
    stems = content_stems(prompt, exclude=subject)
    return [k for k, t in enumerate(templates) if not content_stems(t.replace(SLOT, " ")) & stems]


def build_sources(pseudo_edits, train_groups: set[str], evaluation: set[str]) -> tuple[list[TripleSource], list[str], dict]:
    """Triple sources for the training pseudo edits with a subject and a paraphrase; templates; counts.

    ``evaluation`` (the edits' prompts, paraphrases and locality prompts) is never a negative nor a
    template (a template filled with a training subject cannot rebuild one: the subjects are disjoint).
    Only sources that test relation specificity (:func:`specificity_sources`) give natural negatives
    and templates; on others (CounterFact) there are none and the encoder trains on eq. 5 alone.
    """
    training = [r for r in pseudo_edits if r.id in train_groups]
    templates = relation_templates(training, evaluation)
    specific = specificity_sources(training)
    sources, natural_count = [], 0
    for r in training:
        positives = list(dict.fromkeys(p for p in r.paraphrases if p != r.prompt))
        if not r.subject or not positives:
            continue
        anchor_stems = content_stems(r.prompt, exclude=r.subject)
        # A restatement of the pseudo edit's own fact (same answer) is a paraphrase, not a negative: neither
        # as a natural negative nor rebuilt from another record's template.
        own_restatements = {normalise(p.prompt) for p in r.locality if locality_kind(r, p) == "restates_edit"}
        natural = [p.prompt for p in r.locality if r.source in specific and locality_kind(r, p) == "same_subject"
                   and subject_template(r.subject, p.prompt) is not None and p.prompt not in evaluation
                   and not content_stems(p.prompt, exclude=r.subject) & anchor_stems]
        allowed = [k for k in other_relations(r.prompt, r.subject, templates)
                   if normalise(templates[k].replace(SLOT, r.subject)) not in own_restatements]
        if natural or allowed:
            sources.append(TripleSource(r.id, r.prompt, positives, r.subject, natural, allowed,
                                        subject_template(r.subject, r.prompt)))
            natural_count += len(natural)
    counts = {"sources": len(sources), "natural": natural_count, "templates": len(templates),
              "groups_with_natural": sum(bool(s.natural) for s in sources)}
    return sources, templates, counts


class HardNegativeTriples(Dataset):
    """(anchor, positive, hard negative) triples; item ``i`` of an epoch comes from source
    ``perm[i % len(sources)]``, ``perm`` a fresh permutation per epoch.

    ``length`` (0: one per source) is set so that an epoch holds as many triple batches as pair batches,
    whether that is fewer or more items than sources. Each access draws anew, one of the kinds the source
    has, uniformly: a natural negative; its subject in a random allowed template (another relation); or
    its own question about another source's subject (another subject).
    """

    def __init__(self, sources: list[TripleSource], templates: list[str], seed: int, length: int = 0):
        if not sources:
            raise ValueError("no hard-negative source")
        self.sources, self.templates, self.seed, self.epoch = sources, templates, seed, 0
        self.length = length if length > 0 else len(sources)
        self._perm: tuple[int, list[int]] | None = None
        self._other_subjects = len({normalise(s.subject) for s in sources}) > 1

    def __len__(self) -> int:
        return self.length

    def _source(self, i: int) -> TripleSource:
        if self._perm is None or self._perm[0] != self.epoch:
            order = list(range(len(self.sources)))
            random.Random(f"{self.seed}:{self.epoch}:order").shuffle(order)
            self._perm = (self.epoch, order)
        return self.sources[self._perm[1][i % len(self.sources)]]

    def __getitem__(self, i: int) -> dict:
        s = self._source(i)
        rng = random.Random(f"{self.seed}:{self.epoch}:{i}")  # str seeds are stable across processes
        positive = s.positives[rng.randrange(len(s.positives))]
        kinds = [k for k, ok in (("natural", s.natural), ("relation", s.templates),
                                 ("subject", s.own_template and self._other_subjects)) if ok]
        kind = kinds[rng.randrange(len(kinds))]
        if kind == "natural":
            negative = s.natural[rng.randrange(len(s.natural))]
        elif kind == "relation":
            negative = self.templates[s.templates[rng.randrange(len(s.templates))]].replace(SLOT, s.subject)
        else:
            # The same question about another subject: relation negatives alone teach the encoder to
            # ignore the subject, and then other subjects' questions crowd the edits (ZsRE-1024: the
            # calibration's pseudo-irrelevant questions bound the threshold and 83% of paraphrases stayed).
            other = self.sources[rng.randrange(len(self.sources))].subject
            step = self.sources.index(s)
            while normalise(other) == normalise(s.subject):  # the next source whose subject differs
                step = (step + 1) % len(self.sources)
                other = self.sources[step].subject
            negative = s.own_template.replace(SLOT, other)
        return {"anchor": s.anchor, "positive": positive, "negative": negative}


def first_triple_per_anchor(triples: dict[str, list[str]]) -> dict[str, list[str]]:
    """A batch without repeated anchors: a source drawn twice would be its own rival candidate."""
    first: dict[str, int] = {}
    for i, anchor in enumerate(triples["anchor"]):
        first.setdefault(anchor, i)
    keep = sorted(first.values())
    return {k: [v[i] for i in keep] for k, v in triples.items()}
