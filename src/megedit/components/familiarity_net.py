"""The familiarity network (paper eq. 6, 9-10): a K-way classifier overfit to random labels.

Trained to memorise a random label for every edit prompt's embedding, it gives near-zero
output entropy on those embeddings and their close neighbours (paraphrases), and a spread
distribution on embeddings it never saw. ``FamiliarityRouter`` wraps it with the entropy
threshold: a query is "familiar" (gets the dynamic neuron) iff its entropy < threshold.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class FFNBlock(nn.Module):
    """Pre-norm residual feed-forward block ``x + W2 act(W1 LN(x))`` (the authors use 768->3072->768)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class FamiliarityNet(nn.Module):
    """``depth`` FFN blocks and a K-way head over an L2-normalised query embedding.

    The input is rescaled by ``sqrt(in_dim)`` so that unit-norm embeddings reach the first
    block with unit-variance coordinates; without it the blocks see tiny inputs and the net
    needs many more epochs to memorise the random labels.
    """

    def __init__(self, in_dim: int, num_classes: int = 10, depth: int = 5, hidden_mult: int = 4,
                 width: int | None = None):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes (K) must be >= 2, got {num_classes}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.in_dim, self.num_classes, self.depth, self.hidden_mult = in_dim, num_classes, depth, hidden_mult
        self.width = width or in_dim
        self.proj = nn.Identity() if self.width == in_dim else nn.Linear(in_dim, self.width)
        self.blocks = nn.Sequential(*[FFNBlock(self.width, self.width * hidden_mult) for _ in range(depth)])
        self.norm = nn.LayerNorm(self.width)
        self.head = nn.Linear(self.width, num_classes)

    def config(self) -> dict:
        return {"in_dim": self.in_dim, "num_classes": self.num_classes, "depth": self.depth,
                "hidden_mult": self.hidden_mult, "width": self.width}

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, K]``."""
        if emb.shape[-1] != self.in_dim:
            raise ValueError(f"familiarity net expects {self.in_dim}-dim embeddings, got shape {tuple(emb.shape)}")
        x = self.proj(emb * math.sqrt(self.in_dim))
        return self.head(self.norm(self.blocks(x)))


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of ``softmax(logits)`` per row (paper eq. 9); max is ln K."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


class FamiliarityRouter(nn.Module):
    """Familiarity net + entropy threshold: decides per query whether the edit neuron is attached (eq. 10)."""

    kind = "entropy"  # the score it thresholds (``megedit.components.nearest_router`` is the other kind)

    def __init__(self, net: FamiliarityNet, threshold: float):
        super().__init__()
        self.net = net
        self.threshold = float(threshold)

    @torch.no_grad()
    def entropy(self, emb: torch.Tensor, batch_size: int = 4096) -> torch.Tensor:
        """Entropy ``[B]`` (nats) of the net's output for embeddings ``[B, H]``."""
        param = next(self.net.parameters())
        out = [entropy_from_logits(self.net(emb[i:i + batch_size].to(param.device, param.dtype)))
               for i in range(0, emb.shape[0], batch_size)]
        return torch.cat(out) if out else torch.empty(0, device=param.device)

    @torch.no_grad()
    def is_familiar(self, emb: torch.Tensor) -> torch.Tensor:
        """Bool ``[B]``: True where entropy < threshold (the query is an edit or a paraphrase of one)."""
        return self.entropy(emb) < self.threshold

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.is_familiar(emb)
