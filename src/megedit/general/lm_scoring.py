"""The two ways a general-ability item is put to the LM, with an optional MeG neuron per row.

``choice_logprobs``: the log-probability of each option as the continuation of its prompt. Where every
option is one token (MMLU's letters, the GLUE label words on the shipped tokenizers) that is one forward
pass per prompt and a comparison of next-token log-probabilities; otherwise each option's tokens are
scored under teacher forcing and summed.

``generate``: greedy continuations, stopped per row as soon as a stop string appears (or at EOS, or after
``max_new_tokens``), and cut there.

``weights`` is ``[n, D]`` (one neuron per prompt, zero rows add exactly nothing) or None for the plain LM;
the neuron is attached for the whole forward pass and the whole generation, as ``EditedLM`` does.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from megedit.scoring import id_target_batch, left_pad, positions_from_mask


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _by_length(prompts: Sequence[str], batch_size: int):
    """Index batches of similar prompt length (less padding), covering every prompt once."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def _attached(neuron, weights, idx, device):
    """The rows ``idx`` of ``weights`` attached for a ``with`` block (nothing to attach: the plain LM)."""
    if weights is None:
        return contextlib.nullcontext() if neuron is None else neuron.attached(None)
    if neuron is None:
        raise ValueError("neuron weights given but no DynamicNeuron to attach them to")
    return neuron.attached(weights[idx].to(device))


def option_ids(tokenizer, option: str) -> list[int]:
    ids = tokenizer(option, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"option {option!r} tokenises to nothing")
    return ids


@torch.no_grad()
def choice_logprobs(model, tokenizer, neuron, prompts: Sequence[str], options: Sequence[Sequence[str]],
                    weights: torch.Tensor | None = None, batch_size: int = 8) -> list[list[float]]:
    """Per prompt, the summed log-probability of each of its options (tokenised on their own, leading
    space included, after the prompt's tokens)."""
    if len(prompts) != len(options):
        raise ValueError(f"{len(prompts)} prompts but {len(options)} option lists")
    ids = [[option_ids(tokenizer, o) for o in opts] for opts in options]
    if all(len(t) == 1 for opts in ids for t in opts):
        return _next_token_logprobs(model, tokenizer, neuron, prompts, ids, weights, batch_size)
    rows = [(i, t) for i, opts in enumerate(ids) for t in opts]  # one teacher-forced row per (prompt, option)
    flat = _sequence_logprobs(model, tokenizer, neuron, [prompts[i] for i, _ in rows], [t for _, t in rows],
                              None if weights is None else weights[[i for i, _ in rows]], batch_size)
    out, k = [], 0
    for opts in ids:
        out.append(flat[k:k + len(opts)])
        k += len(opts)
    return out


def _next_token_logprobs(model, tokenizer, neuron, prompts, ids, weights, batch_size) -> list[list[float]]:
    device = next(model.parameters()).device
    out: list[list[float] | None] = [None] * len(prompts)
    for idx in _by_length(prompts, batch_size):
        tokens, mask = left_pad([tokenizer(prompts[i])["input_ids"] for i in idx], _pad_id(tokenizer))
        with _attached(neuron, weights, idx, device):
            logits = model(input_ids=tokens.to(device), attention_mask=mask.to(device),
                           position_ids=positions_from_mask(mask).to(device), use_cache=False).logits[:, -1]
        logp = logits.float().log_softmax(-1).cpu()
        for row, i in enumerate(idx):
            out[i] = [float(logp[row, t[0]]) for t in ids[i]]
    return out


def _sequence_logprobs(model, tokenizer, neuron, prompts, targets, weights, batch_size) -> list[float]:
    device = next(model.parameters()).device
    out = [0.0] * len(prompts)
    for idx in _by_length(prompts, batch_size):
        batch = id_target_batch(tokenizer, [prompts[i] for i in idx], [targets[i] for i in idx])
        with _attached(neuron, weights, idx, device):
            logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                           position_ids=batch["position_ids"].to(device), use_cache=False).logits
        # the logit at p - 1 predicts the token at p
        logp = logits[:, :-1].float().log_softmax(-1).cpu()
        token_logp = logp.gather(-1, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
        summed = (token_logp * batch["target_mask"][:, 1:]).sum(-1)
        for row, i in enumerate(idx):
            out[i] = float(summed[row])
    return out


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to its first stop string; searched after any leading whitespace, so a continuation that
    opens with a newline is not cut to nothing by a stop of "\\n"."""
    start = len(text) - len(text.lstrip())
    cuts = [c for c in (text.find(s, start) for s in stops) if c >= 0]
    return text[: min(cuts)] if cuts else text


class _StopStrings(StoppingCriteria):
    """Marks a row finished once its new text holds a stop string (``cut_at_stop`` would cut it)."""

    def __init__(self, tokenizer, prompt_width: int, stops: Sequence[str]):
        self.tokenizer, self.width, self.stops = tokenizer, prompt_width, list(stops)

    def __call__(self, input_ids, scores, **kwargs):
        done = [len(cut_at_stop(t, self.stops)) < len(t)
                for t in self.tokenizer.batch_decode(input_ids[:, self.width:], skip_special_tokens=True)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def generate(model, tokenizer, neuron, prompts: Sequence[str], weights: torch.Tensor | None = None,
             max_new_tokens: int = 256, stops: Sequence[str] = (), batch_size: int = 8) -> list[str]:
    """Greedy continuations (special tokens dropped), each cut at its first stop string."""
    device = next(model.parameters()).device
    pad = _pad_id(tokenizer)
    out: list[str | None] = [None] * len(prompts)
    for idx in _by_length(prompts, batch_size):
        tokens, mask = left_pad([tokenizer(prompts[i])["input_ids"] for i in idx], pad)
        criteria = StoppingCriteriaList([_StopStrings(tokenizer, tokens.shape[1], stops)]) if stops else None
        with _attached(neuron, weights, idx, device):
            gen = model.generate(input_ids=tokens.to(device), attention_mask=mask.to(device),
                                 max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
                                 eos_token_id=tokenizer.eos_token_id, stopping_criteria=criteria)
        texts = tokenizer.batch_decode(gen[:, tokens.shape[1]:].cpu(), skip_special_tokens=True)
        for i, t in zip(idx, texts):
            out[i] = cut_at_stop(t, stops)
    return out
