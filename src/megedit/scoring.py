"""Metric helpers shared by collection, diffusion validation and evaluation.

``prompts`` are the strings the LM sees (already ``spec.format_prompt``-ed); targets are
tokenised as ``tokenizer(" " + target, add_special_tokens=False)``, the convention of the
prepare stage. ``weights`` is ``[n, D]`` (one neuron per prompt) or None for the unedited LM;
every helper batches internally and restores the input order.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def target_ids(tokenizer, target: str) -> list[int]:
    ids = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"target {target!r} tokenises to nothing")
    return ids


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad token lists; returns ``(input_ids, attention_mask)``."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s):] = torch.as_tensor(list(s), dtype=torch.long)
            mask[i, width - len(s):] = 1
    return ids, mask


def positions_from_mask(mask: Tensor) -> Tensor:
    """Position ids that start at 0 on each row's first real token, as ``generate`` builds them."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def target_batch(tokenizer, prompts: Sequence[str], targets: Sequence[str]) -> dict:
    """Left-padded ``prompt + target`` batch for teacher forcing (targets as text; see ``id_target_batch``)."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    return id_target_batch(tokenizer, prompts, [target_ids(tokenizer, t) for t in targets])


def id_target_batch(tokenizer, prompts: Sequence[str], targets: Sequence[Sequence[int]]) -> dict:
    """Left-padded ``prompt + target`` batch for teacher forcing, targets given as token ids.

    Returns ``input_ids``, ``attention_mask``, ``position_ids`` ``[B, T]``, ``target_mask`` ``[B, T]``
    (True where the token is a target token), ``labels`` (target ids there, -100 elsewhere) and
    ``target_lengths``. The logit that predicts the token at position ``p`` sits at ``p - 1``.
    The last target token is kept in ``input_ids`` so the batch also serves a plain forward.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    if not prompts:
        raise ValueError("target_batch needs at least one prompt")
    if any(len(t) == 0 for t in targets):
        raise ValueError("every target needs at least one token")
    seqs = [list(tokenizer(p)["input_ids"]) + list(t) for p, t in zip(prompts, targets)]
    lengths = [len(t) for t in targets]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids, mask = left_pad(seqs, pad)
    width = ids.shape[1]
    target_mask = torch.zeros_like(ids, dtype=torch.bool)
    for i, n in enumerate(lengths):
        target_mask[i, width - n:] = True
    labels = torch.where(target_mask, ids, torch.full_like(ids, -100))
    return {"input_ids": ids, "attention_mask": mask, "position_ids": positions_from_mask(mask),
            "target_mask": target_mask, "labels": labels, "target_lengths": torch.tensor(lengths)}


def batch_indices(n: int, batch_size: int, order: list[int]):
    """Consecutive slices of ``order`` (row indices, e.g. sorted by length) of at most ``batch_size``."""
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def _rows(weights: Tensor | None, idx: list[int]) -> Tensor | None:
    return None if weights is None else weights[idx]


def _check(prompts, weights):
    if weights is not None and weights.shape[0] != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {weights.shape[0]} neuron rows")


def attach_neuron(neuron, weights):
    """A context with ``weights`` on the attached ``DynamicNeuron`` (none: the plain LM; weights then refused)."""
    if neuron is None:
        if weights is not None:
            raise ValueError("weights given but no DynamicNeuron attached to the model")
        import contextlib
        return contextlib.nullcontext()
    return neuron.attached(weights)


def teacher_forced(model, tokenizer, neuron, prompts: Sequence[str], targets: Sequence[str],
                   weights: Tensor | None = None, batch_size: int = 32) -> dict:
    """Per row: ``token_acc`` (fraction of target tokens that are the argmax) and ``exact`` (all of them)."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    return teacher_forced_ids(model, tokenizer, neuron, prompts, [target_ids(tokenizer, t) for t in targets],
                              weights, batch_size)


@torch.no_grad()
def teacher_forced_ids(model, tokenizer, neuron, prompts: Sequence[str], targets: Sequence[Sequence[int]],
                       weights: Tensor | None = None, batch_size: int = 32) -> dict:
    """``teacher_forced`` on targets given as token ids (e.g. a pre-edit answer, which is tokens, not text).

    ``exact`` is also greedy exact match of the target's length: greedy decoding reproduces the target iff
    each target token is the argmax given the target's own prefix, which is what teacher forcing computes
    (so the evaluate stage needs no generation for its ``target_length`` protocol). ``greedy`` holds each
    row's greedy tokens up to its first wrong one (``greedy_prefix``)."""
    _check(prompts, weights)
    n = len(prompts)
    acc = torch.zeros(n)
    exact = torch.zeros(n, dtype=torch.bool)
    greedy: list[list[int] | None] = [None] * n
    order = sorted(range(n), key=lambda i: len(prompts[i]) + len(targets[i]))
    device = next(model.parameters()).device
    for idx in batch_indices(n, batch_size, order):
        batch = id_target_batch(tokenizer, [prompts[i] for i in idx], [targets[i] for i in idx])
        w = _rows(weights, idx)
        with attach_neuron(neuron, None if w is None else w.to(device)):
            logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                           position_ids=batch["position_ids"].to(device), use_cache=False).logits
        pred = logits[:, :-1].argmax(-1).cpu()
        hit = (pred == batch["input_ids"][:, 1:]) & batch["target_mask"][:, 1:]
        n_hit = hit.sum(1)
        lengths = batch["target_lengths"]
        acc[idx] = (n_hit.float() / lengths.float())
        exact[idx] = n_hit == lengths
        mask = batch["target_mask"][:, 1:]
        for row, i in enumerate(idx):
            greedy[i] = greedy_prefix(pred[row][mask[row]].tolist(), list(targets[i]))
    return {"token_acc": acc, "exact": exact, "greedy": greedy}


def exact_match(model, tokenizer, neuron, prompts: Sequence[str], targets: Sequence[str],
                weights: Tensor | None = None, batch_size: int = 32) -> Tensor:
    """``greedy_match`` from one teacher-forced pass instead of decoding: the same answer (see
    ``teacher_forced_ids``; a test compares them with neurons attached) at the cost of one forward."""
    return teacher_forced(model, tokenizer, neuron, prompts, targets, weights, batch_size)["exact"]


def greedy_prefix(argmax: list[int], target: list[int]) -> list[int]:
    """What greedy decoding of the target's length produces, as far as teacher forcing determines it: the same
    tokens while they equal the target (the prefixes agree, so the argmaxes do), up to and including the
    first wrong one; after that greedy decoding conditions on its own token, which is not computed here."""
    for k, (got, want) in enumerate(zip(argmax, target)):
        if got != want:
            return argmax[:k + 1]
    return argmax


@torch.no_grad()
def greedy_tokens(model, tokenizer, neuron, prompts, weights, max_new_tokens: list[int] | int, batch_size: int):
    """Greedy continuations, not cut at EOS; ``max_new_tokens`` per prompt or shared."""
    _check(prompts, weights)
    n = len(prompts)
    limits = [max_new_tokens] * n if isinstance(max_new_tokens, int) else list(max_new_tokens)
    order = sorted(range(n), key=lambda i: len(prompts[i]))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out: list[list[int] | None] = [None] * n
    for idx in batch_indices(n, batch_size, order):
        ids, mask = left_pad([tokenizer(prompts[i])["input_ids"] for i in idx], pad)
        w = _rows(weights, idx)
        with attach_neuron(neuron, None if w is None else w.to(device)):
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max(limits[i] for i in idx), do_sample=False, num_beams=1,
                                 pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        new = gen[:, ids.shape[1]:].cpu().tolist()
        for i, toks in zip(idx, new):
            out[i] = toks[: limits[i]]
    return out


def greedy_generate(model, tokenizer, neuron, prompts: Sequence[str], weights: Tensor | None = None,
                    max_new_tokens: int | list[int] = 20, batch_size: int = 32) -> list[list[int]]:
    """New token ids of greedy decoding, cut at (and without) the first EOS; ``max_new_tokens`` per prompt or shared."""
    eos = tokenizer.eos_token_id
    raw = greedy_tokens(model, tokenizer, neuron, prompts, weights, max_new_tokens, batch_size)
    return [toks[: toks.index(eos)] if eos in toks else toks for toks in raw]


def greedy_match(model, tokenizer, neuron, prompts: Sequence[str], targets: Sequence[str],
                 weights: Tensor | None = None, batch_size: int = 32) -> Tensor:
    """True where greedy decoding of the target's length reproduces the target tokens exactly, by decoding
    (``exact_match`` gets the same answer from one forward; this is the independent check)."""
    if len(prompts) != len(targets):
        raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
    want = [target_ids(tokenizer, t) for t in targets]
    raw = greedy_tokens(model, tokenizer, neuron, prompts, weights, [len(t) for t in want], batch_size)
    return torch.tensor([got == t for got, t in zip(raw, want)], dtype=torch.bool)
