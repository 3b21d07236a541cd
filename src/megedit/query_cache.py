"""Score the same (prompt, target) pairs under many neuron sets, paying for the layers below the edit layer once.

The neuron sits in the edit layer's MLP, so everything below it is the same whichever neuron is attached. The
diffusion stage scores fixed queries again and again (every validation, each candidate value scale, the final
report), so ``CachedQueries`` keeps each batch's edit-layer input (``LayerSplit.lower``) and every scoring runs only
the edit layer, the layers above it and the LM head at the target positions. The answers are those of
``scoring.teacher_forced`` (token accuracy, and exact = greedy exact match); a test compares them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from megedit.layer_split import LayerSplit
from megedit.registry import ModelSpec
from megedit.scoring import attach_neuron, batch_indices, greedy_prefix, id_target_batch, target_ids


@dataclass
class _Batch:
    rows: list[int]        # query indices, in this batch's order
    hidden: Tensor         # [B, T, d] input of the edit layer
    mask: Tensor           # [B, T] attention mask
    pos: Tensor            # [B, T] position ids
    pred: tuple[Tensor, Tensor]  # (row, position) of each logit that predicts a target token
    labels: Tensor         # [n_target_tokens] the tokens those logits should predict
    token_row: Tensor      # [n_target_tokens] batch row of each target token
    lengths: Tensor        # [B] target tokens per row (a target at column 0 has no logit: never exact)


class CachedQueries:
    """Fixed queries, scored by ``score(neuron, weights)`` with one neuron row per query."""

    def __init__(self, model: torch.nn.Module, tokenizer, spec: ModelSpec, prompts: Sequence[str],
                 targets: Sequence[str] | None = None, batch_size: int = 32,
                 target_tokens: Sequence[Sequence[int]] | None = None, split: LayerSplit | None = None):
        """Targets as text (``targets``, tokenised as ``scoring.target_ids``) or as token ids (``target_tokens``,
        e.g. a pre-edit answer); batches as ``scoring.teacher_forced`` makes them, so the numbers are the same.
        ``split``: a ``LayerSplit`` of ``model`` to reuse (its first use runs every layer once)."""
        if (targets is None) == (target_tokens is None):
            raise ValueError("give either targets (text) or target_tokens (ids)")
        ids = [target_ids(tokenizer, t) for t in targets] if targets is not None else [list(t) for t in target_tokens]
        if len(prompts) != len(ids):
            raise ValueError(f"{len(prompts)} prompts but {len(ids)} targets")
        self.n = len(prompts)
        self.split = split if split is not None else LayerSplit(model, spec)
        self.device = next(model.parameters()).device
        self.target_ids = ids
        order = sorted(range(self.n), key=lambda i: len(prompts[i]) + len(ids[i]))
        self.batches = [self._lower(tokenizer, prompts, ids, rows) for rows in batch_indices(self.n, batch_size, order)]

    def _lower(self, tokenizer, prompts, ids, rows: list[int]) -> _Batch:
        b = id_target_batch(tokenizer, [prompts[i] for i in rows], [ids[i] for i in rows])
        mask, pos = b["attention_mask"].to(self.device), b["position_ids"].to(self.device)
        hidden, _ = self.split.lower(b["input_ids"].to(self.device), mask, pos)
        # The logit at position p - 1 predicts the token at p.
        target = b["target_mask"][:, 1:]
        row, col = target.nonzero(as_tuple=True)
        return _Batch(rows, hidden, mask, pos, (row.to(self.device), col.to(self.device)),
                      b["input_ids"][:, 1:][target].to(self.device), row.to(self.device), b["target_lengths"])

    @torch.no_grad()
    def score(self, neuron, weights: Tensor | None, greedy: bool = False) -> dict:
        """Per query, in the order given: ``token_acc`` and ``exact`` (as ``scoring.teacher_forced``), and with
        ``greedy`` each query's greedy tokens up to its first wrong one (as ``teacher_forced_ids``)."""
        if weights is not None and weights.shape[0] != self.n:
            raise ValueError(f"{self.n} queries but {weights.shape[0]} neuron rows")
        acc = torch.zeros(self.n)
        exact = torch.zeros(self.n, dtype=torch.bool)
        tokens: list[list[int] | None] = [None] * self.n
        for b in self.batches:
            w = None if weights is None else weights[b.rows].to(self.device)
            with attach_neuron(neuron, w):
                final = self.split.upper(b.hidden, b.mask, b.pos)
            pred = self.split.head(final[b.pred]).argmax(-1)
            hit = (pred == b.labels).float()
            n_rows = len(b.rows)
            hits = torch.zeros(n_rows, device=self.device).index_add(0, b.token_row, hit).cpu()
            acc[b.rows] = hits / b.lengths.float()
            exact[b.rows] = hits == b.lengths
            if greedy:  # target tokens are in row order, so each row's argmaxes are one contiguous run
                scored = torch.zeros(n_rows, dtype=torch.long).index_add(0, b.token_row.cpu(),
                                                                         torch.ones_like(b.token_row.cpu()))
                for i, row_pred in zip(b.rows, pred.cpu().split(scored.tolist())):
                    tokens[i] = greedy_prefix(row_pred.tolist(), self.target_ids[i])
        out = {"token_acc": acc, "exact": exact}
        if greedy:
            out["greedy"] = tokens
        return out
