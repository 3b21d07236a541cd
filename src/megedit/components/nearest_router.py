"""The nearest-neighbour router: a query is familiar when its best cosine to the memorised edit prompts is high.

No training: it memorises the N edit prompts' L2-normalised embeddings and scores a query by
``1 - max cosine`` to them (0 on a memorised prompt, 1 orthogonal to all of them, at most 2), so lower
means more familiar, as the familiarity net's entropy does: the same ``score < threshold`` rule, the
same calibration, and the same interface as ``FamiliarityRouter`` (``.entropy(emb)`` returns the score).
``bench/familiarity_scale.py`` measured it against the net at 10k edits (AUROC 0.960 against 0.939).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# The largest score: 1 - cos for two opposite embeddings.
MAX_SCORE = 2.0


class NearestRouter(nn.Module):
    """Memorised embeddings ``[N, H]`` (a buffer, saved as ``memory``) + a threshold on ``1 - max cosine``."""

    kind = "nearest"

    def __init__(self, memory: torch.Tensor, threshold: float):
        super().__init__()
        if memory.dim() != 2 or not len(memory):
            raise ValueError(f"the nearest router needs a non-empty [N, H] memory, got shape {tuple(memory.shape)}")
        self.register_buffer("memory", F.normalize(memory.float(), dim=-1))
        self.threshold = float(threshold)

    def config(self) -> dict:
        return {"n": int(self.memory.shape[0]), "dim": int(self.memory.shape[1])}

    @torch.no_grad()
    def entropy(self, emb: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """Score ``[B]``: ``1 - max cosine`` of each embedding ``[B, H]`` to the memory (the name keeps the
        interface of ``FamiliarityRouter.entropy``; lower = more familiar)."""
        if emb.shape[-1] != self.memory.shape[1]:
            raise ValueError(f"nearest router expects {self.memory.shape[1]}-dim embeddings, got {tuple(emb.shape)}")
        out = [1 - (F.normalize(emb[i:i + batch_size].to(self.memory), dim=-1) @ self.memory.T).max(1).values
               for i in range(0, emb.shape[0], batch_size)]
        return torch.cat(out).clamp(0, MAX_SCORE) if out else torch.empty(0, device=self.memory.device)

    @torch.no_grad()
    def is_familiar(self, emb: torch.Tensor) -> torch.Tensor:
        """Bool ``[B]``: True where the score < threshold (the query is near an edit prompt)."""
        return self.entropy(emb) < self.threshold

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.is_familiar(emb)
