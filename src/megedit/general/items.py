"""One benchmark item as every general-ability benchmark states it, and the seeded subset of a benchmark.

An item is either a *choice* item (``choices`` non-empty: the LM's log-probability of each continuation
decides, e.g. MMLU's " A".." D") or a *generated* one (greedy decoding, then the answer is read from the
text as ``answer_format`` says and compared with ``gold``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

ANSWER_FORMATS = ("last_number", "first_line", "answer_is")


@dataclass(frozen=True)
class Item:
    benchmark: str  # gsm8k | bbh | mmlu | rte | sst2
    id: str  # stable within its benchmark: "<task or subject>/<index in its file>" or "<index in the file>"
    query: str  # the item's own text, without instructions or exemplars: what MeG's router sees
    body: str  # the test prompt after the exemplars; ends where the answer starts
    gold: str  # the correct choice (one of ``choices``) or the reference answer of a generated item
    choices: tuple[str, ...] = ()  # continuations compared by log-probability; empty: a generated item
    answer_format: str = ""  # how a generated answer is read (ANSWER_FORMATS)
    header: str = ""  # text before the exemplars (a task description, MMLU's subject line)
    shots: tuple[str, ...] = ()  # formatted exemplars, each ending in a blank line
    group: str = ""  # BBH task / MMLU subject, for the breakdown
    stops: tuple[str, ...] = ()  # generation ends at the first of these (after some non-blank text)

    def __post_init__(self):
        if self.choices and self.gold not in self.choices:
            raise ValueError(f"{self.benchmark} {self.id}: gold {self.gold!r} is not one of {self.choices}")
        if not self.choices and self.answer_format not in ANSWER_FORMATS:
            raise ValueError(f"{self.benchmark} {self.id}: a generated item needs answer_format in {ANSWER_FORMATS}")

    @property
    def key(self) -> str:
        return f"{self.benchmark}/{self.id}"

    def prompt(self, n_shots: int | None = None) -> str:
        """The text the LM sees: header, the first ``n_shots`` exemplars (all when None), the body."""
        shots = self.shots if n_shots is None else self.shots[:n_shots]
        return self.header + "".join(shots) + self.body


def seeded_subset(items: Sequence[Item], size: int | None, seed: int) -> list[Item]:
    """``size`` items drawn uniformly without replacement, in file order; the same for the same (benchmark,
    seed) whatever else runs, so every variant and every rerun scores the same items. None: all items."""
    if size is None or size >= len(items):
        return list(items)
    if not items:
        return []
    rng = random.Random(f"{items[0].benchmark}:{seed}")  # a string seed is stable across Python versions
    keep = sorted(rng.sample(range(len(items)), size))
    return [items[i] for i in keep]
