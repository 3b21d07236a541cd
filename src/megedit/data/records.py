"""The one normalised edit record every reader produces and every stage consumes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

PromptKind = Literal["completion", "question"]


@dataclass
class Probe:
    """A prompt that is not the edit itself: a locality, portability or multi-hop question."""

    prompt: str
    answer: str | None = None  # ground truth where the format gives one
    kind: PromptKind = "completion"
    aliases: list[str] = field(default_factory=list)  # other accepted answers (MQuAKE's new_answer_alias)


@dataclass
class Atom:
    """One atomic fact an edit rewrites. A record's own ``prompt``/``target_new`` is its first atom; an
    MQuAKE instance's further rewrites are more atoms of the same edit (``EditRecord.atoms``), all carried
    by the edit's one neuron."""

    prompt: str
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrases: list[str] = field(default_factory=list)


@dataclass
class EditRecord:
    id: str  # stable: "<file stem>:<native id or index>"
    subject: str
    prompt: str  # completion prompt (CounterFact) or question (ZsRE), subject filled in
    prompt_kind: PromptKind
    target_new: str
    target_true: str | None
    paraphrases: list[str] = field(default_factory=list)
    locality: list[Probe] = field(default_factory=list)
    portability: list[Probe] = field(default_factory=list)
    multi_hop: list[Probe] = field(default_factory=list)
    atoms: list[Atom] = field(default_factory=list)  # further atomic rewrites of the same edit (MQuAKE)
    source: str = ""  # file the record came from
    index: int = -1  # position in that file

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "EditRecord":
        raw = dict(raw)
        for key in ("locality", "portability", "multi_hop"):
            raw[key] = [Probe(**p) for p in raw.get(key, [])]
        raw["atoms"] = [Atom(**a) for a in raw.get("atoms", [])]
        return cls(**raw)

    def all_atoms(self) -> list[Atom]:
        """Every atomic fact of the edit, its own prompt first: what its neuron is collected on."""
        return [Atom(self.prompt, self.subject, self.target_new, self.target_true, list(self.paraphrases)),
                *self.atoms]


@dataclass
class ParaphraseGroup:
    """Texts that say the same thing, from a paraphrase corpus (pseudo-edit material for the encoder)."""

    id: str
    texts: list[str]
    source: str = ""
