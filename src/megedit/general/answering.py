"""Answer a batch of items of one benchmark with one LM configuration and judge each answer: a row per item."""

from __future__ import annotations

from typing import Sequence

import torch

from megedit.general.answers import extract, is_correct
from megedit.general.items import Item
from megedit.general.lm_scoring import choice_logprobs, generate


def fit_prompt(tokenizer, item: Item, max_tokens: int | None) -> tuple[str, int]:
    """``(prompt, exemplars kept)``: all exemplars where the prompt fits ``max_tokens``, else as many as fit
    (the original MMLU evaluation drops exemplars the same way; the test question is always kept)."""
    n = len(item.shots)
    while n > 0 and max_tokens is not None and len(tokenizer(item.prompt(n))["input_ids"]) > max_tokens:
        n -= 1
    return item.prompt(n), n


def answer_items(lm, tokenizer, neuron, items: Sequence[Item], prompts: Sequence[str],
                 weights: torch.Tensor | None, max_new_tokens: int, batch_size: int) -> list[dict]:
    """Per item: ``prediction`` (the chosen option, or the answer read from the continuation; None where
    none was found), ``correct`` and ``output`` (the options' log-probabilities, or the continuation)."""
    if len({it.benchmark for it in items}) > 1:
        raise ValueError("answer_items takes the items of one benchmark at a time")
    if not items:
        return []
    if items[0].choices:
        logps = choice_logprobs(lm, tokenizer, neuron, prompts, [it.choices for it in items], weights, batch_size)
        rows = []
        for it, lp in zip(items, logps):
            pick = it.choices[max(range(len(lp)), key=lp.__getitem__)]
            rows.append({"prediction": pick, "correct": pick == it.gold, "output": [round(x, 4) for x in lp]})
        return rows
    texts = generate(lm, tokenizer, neuron, prompts, weights, max_new_tokens, items[0].stops, batch_size)
    rows = []
    for it, text in zip(items, texts):
        answer = extract(it.answer_format, text)
        rows.append({"prediction": answer, "correct": is_correct(it.answer_format, answer, it.gold), "output": text})
    return rows
