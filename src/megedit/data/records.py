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
    source: str = ""  # file the record came from
    index: int = -1  # position in that file

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "EditRecord":
        raw = dict(raw)
        for key in ("locality", "portability", "multi_hop"):
            raw[key] = [Probe(**p) for p in raw.get(key, [])]
        return cls(**raw)


@dataclass
class ParaphraseGroup:
    """Texts that say the same thing, from a paraphrase corpus (pseudo-edit material for the encoder)."""

    id: str
    texts: list[str]
    source: str = ""
