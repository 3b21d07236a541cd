"""How long and how ``edits add`` fine-tunes the generator: a module of its own, so the command line can show
its defaults without loading Lightning (``megedit.edits.retrain`` does)."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class GeneratorBudget:
    """How long and how the generator is fine-tuned on a version's edits (docs/incremental.md)."""

    draws_per_new_edit: int = 300  # the stage's own run draws each edit ~400 times (400 epochs)
    # of every batch: the rest rehearses the older edits and the pseudo edits. 0.35 and lr_scale 0.3 against
    # 0.5 / 0.5: the older edits lost less Generality in bench/incremental.py (docs/incremental.md#measured)
    new_share: float = 0.35
    lr_scale: float = 0.3  # peak lr = this x the parent's (its schedule had annealed to 0.05 x)
    warmup_steps: int = 50

    def __post_init__(self):
        if self.draws_per_new_edit < 1 or not 0.0 < self.new_share < 1.0 or self.lr_scale <= 0 or self.warmup_steps < 0:
            raise ValueError(f"generator budget: need draws_per_new_edit >= 1, 0 < new_share < 1, lr_scale > 0 and "
                             f"warmup_steps >= 0; got {self.draws_per_new_edit}, {self.new_share}, {self.lr_scale}, "
                             f"{self.warmup_steps}")

    def steps(self, n_new: int, batch_size: int) -> int:
        return max(1, math.ceil(self.draws_per_new_edit * n_new / (batch_size * self.new_share)))
