"""FT baseline (as in the paper): fine-tune the MLP of the edit layer on all edits at once.

Only that MLP's parameters train (teacher-forced NLL of the target tokens); everything else is
frozen. Like the paper's FT it trains until it has learnt the edits: after each epoch it measures the
edits' reliability (every target token the argmax under teacher forcing, which is what greedy decoding of
the target's length returns) and stops once that reaches ``target_reliability``, or at the epoch budget.
The tuned MLP is returned as a state dict and the LM is restored, so MeG and FT are evaluated on the same
loaded model by swapping the MLP in and out (``swapped_mlp``).

Why it is fast: the layers below the edit layer never change, so their output for every edit is computed
once (``LayerSplit.lower``) and each step runs only the edit layer and those above it, with the LM head
only where a target token is predicted.
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from megedit.layer_split import LayerSplit
from megedit.loading import edit_mlp
from megedit.registry import ModelSpec
from megedit.scoring import positions_from_mask, target_batch


@dataclass
class _Edit:
    hidden: Tensor  # [T, d] input of the edit layer for prompt + target (no padding)
    ids: Tensor  # [T] token ids of prompt + target
    n_target: int


@dataclass
class _Batch:
    hidden: Tensor  # [B, W, d] left-padded
    mask: Tensor
    positions: Tensor
    pred_rows: Tensor  # one entry per target token: its row, the position whose logit predicts it, its id
    pred_pos: Tensor
    labels: Tensor
    n_target: Tensor  # [B]


def _lower_cache(split: LayerSplit, tokenizer, prompts: Sequence[str], targets: Sequence[str],
                 batch_size: int, device) -> list[_Edit]:
    """Every edit's edit-layer input, computed once (the layers below never change during FT)."""
    out = []
    for start in range(0, len(prompts), batch_size):
        b = target_batch(tokenizer, prompts[start:start + batch_size], targets[start:start + batch_size])
        hidden, _ = split.lower(b["input_ids"].to(device), b["attention_mask"].to(device),
                                b["position_ids"].to(device))
        for row in range(hidden.shape[0]):
            real = b["attention_mask"][row].bool()
            edit = _Edit(hidden[row][real.to(device)], b["input_ids"][row][real], int(b["target_lengths"][row]))
            if edit.n_target >= len(edit.ids):  # no prompt token before the target: nothing predicts its first token
                raise ValueError(f"FT edit {start + row}: prompt {prompts[start + row]!r} has no tokens")
            out.append(edit)
    return out


def _batch(edits: Sequence[_Edit], device) -> _Batch:
    """Left-pad cached edits into one batch, with the positions whose logits predict target tokens."""
    width = max(len(e.ids) for e in edits)
    hidden = edits[0].hidden.new_zeros(len(edits), width, edits[0].hidden.shape[-1])
    mask = torch.zeros(len(edits), width, dtype=torch.long)
    rows, pos, labels = [], [], []
    for r, e in enumerate(edits):
        t = len(e.ids)
        hidden[r, width - t:] = e.hidden
        mask[r, width - t:] = 1
        for j in range(width - e.n_target, width):
            rows.append(r)
            pos.append(j - 1)
            labels.append(int(e.ids[t - width + j]))
    as_long = lambda x: torch.as_tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return _Batch(hidden, mask.to(device), positions_from_mask(mask).to(device), as_long(rows), as_long(pos),
                  as_long(labels), as_long([e.n_target for e in edits]))


def _target_logits(split: LayerSplit, b: _Batch) -> Tensor:
    final = split.upper(b.hidden, b.mask, b.positions)
    return split.head(final[b.pred_rows, b.pred_pos]).float()


@torch.no_grad()
def _reliability(split: LayerSplit, edits: Sequence[_Edit], batch_size: int, device) -> float:
    """Share of edits whose every target token is the argmax under teacher forcing."""
    exact = 0
    for start in range(0, len(edits), batch_size):
        b = _batch(edits[start:start + batch_size], device)
        hit = (_target_logits(split, b).argmax(-1) == b.labels).float()
        per_row = torch.zeros(len(b.n_target), device=hit.device).index_add_(0, b.pred_rows, hit)
        exact += int((per_row == b.n_target).sum())
    return exact / max(len(edits), 1)


def finetune_mlp(lm, tokenizer, spec: ModelSpec, prompts: Sequence[str], targets: Sequence[str], epochs: int = 30,
                 lr: float = 2e-3, batch_size: int = 32, seed: int = 0, target_reliability: float | None = 0.95,
                 progress: bool = True) -> dict:
    """Returns ``{"state": tuned MLP state dict, "losses": per-epoch mean loss, "reliability": per-epoch exact
    match on the edits (when a target is set), "epochs": epochs run, "reached": whether the target was met}``;
    the LM is left unchanged. ``epochs`` is the budget; ``target_reliability=None`` always runs all of it."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    if not prompts:
        raise ValueError("FT needs at least one edit")
    mlp = edit_mlp(lm, spec)
    original = {k: v.detach().clone() for k, v in mlp.state_dict().items()}
    params = list(mlp.parameters())
    device = params[0].device
    split = LayerSplit(lm, spec)
    edits = _lower_cache(split, tokenizer, prompts, targets, batch_size, device)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    order, rng = list(range(len(edits))), random.Random(seed)
    losses, reliability = [], []
    try:
        bar = tqdm(range(epochs), desc="FT baseline", unit="epoch", disable=not progress)
        for _ in bar:
            rng.shuffle(order)
            losses.append(_epoch(split, opt, [edits[i] for i in order], batch_size, device))
            if target_reliability is not None:
                reliability.append(round(_reliability(split, edits, batch_size, device), 4))
            bar.set_postfix(loss=f"{losses[-1]:.4f}", **({"rel": reliability[-1]} if reliability else {}))
            if reliability and reliability[-1] >= target_reliability:
                break
        tuned = {k: v.detach().clone() for k, v in mlp.state_dict().items()}
    finally:
        for p in params:
            p.requires_grad_(False)
        mlp.load_state_dict(original)
    reached = bool(reliability) and reliability[-1] >= target_reliability
    return {"state": tuned, "losses": losses, "reliability": reliability, "epochs": len(losses), "reached": reached}


def _epoch(split: LayerSplit, opt, edits: Sequence[_Edit], batch_size: int, device) -> float:
    """One pass over ``edits`` in this order; its loss: each batch's token-mean NLL, weighted by the batch's edits."""
    total = 0.0
    for start in range(0, len(edits), batch_size):
        chunk = edits[start:start + batch_size]
        b = _batch(chunk, device)
        loss = torch.nn.functional.cross_entropy(_target_logits(split, b), b.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item() * len(chunk)
    return total / max(len(edits), 1)


@contextlib.contextmanager
def swapped_mlp(lm, spec: ModelSpec, state: dict):
    """Temporarily load ``state`` into the edit layer's MLP."""
    mlp = edit_mlp(lm, spec)
    original = {k: v.detach().clone() for k, v in mlp.state_dict().items()}
    mlp.load_state_dict(state)
    try:
        yield
    finally:
        mlp.load_state_dict(original)


def named_mlp_weights(lm, spec: ModelSpec, state: dict) -> dict:
    """The tuned MLP state as the LM's parameter names (what ``memit.swapped_weights`` loads)."""
    mlp = edit_mlp(lm, spec)
    prefix = next(name for name, module in lm.named_modules() if module is mlp)
    params = dict(mlp.named_parameters())
    return {f"{prefix}.{k}": v for k, v in state.items() if k in params}
