"""Paraphrase-transfer diagnostic: does a neuron collected on a prompt also fire on its paraphrases?

Measured on pseudo-edits (records that are never edited), never on the evaluation paraphrases.
MeG's Generality is capped by this number: the generator reproduces the neuron of the
nearest edit, so a paraphrase gets at best the neuron of its own edit.
"""

from __future__ import annotations

import dataclasses
import random
import time

import torch

from megedit.collect.engine import CollectItem, CollectOptions, collect, generate_prefixes, with_prefix
from megedit.scoring import exact_match, teacher_forced


def sample_pseudo(records, n: int, seed: int) -> list:
    pool = [r for r in records if r.paraphrases]
    if not pool:
        raise ValueError("no pseudo-edits with paraphrases to measure transfer on")
    return random.Random(seed).sample(pool, min(n, len(pool)))


def transfer_scores(model, tokenizer, neuron, spec, records, results) -> dict:
    """Greedy exact match and teacher-forced token accuracy on the paraphrases, with each record's own neuron."""
    prompts, targets, rows = [], [], []
    for i, rec in enumerate(records):
        for p in rec.paraphrases:
            prompts.append(spec.format_prompt(p, rec.prompt_kind))
            targets.append(rec.target_new)
            rows.append(i)
    W = torch.stack([r.weights for r in results])[rows]
    ok = torch.tensor([r.success for r in results])
    tf = teacher_forced(model, tokenizer, neuron, prompts, targets, W, batch_size=64)
    exact = tf["exact"]  # greedy exact match from the same pass (scoring.teacher_forced_ids)
    base = exact_match(model, tokenizer, None, prompts, targets, None, batch_size=64)
    return {"prompt_success": round(float(ok.float().mean()), 4),
            "n_paraphrases": len(prompts),
            "paraphrase_exact": round(float(exact.float().mean()), 4),
            "paraphrase_token_acc": round(float(tf["token_acc"].mean()), 4),
            "paraphrase_exact_unedited": round(float(base.float().mean()), 4),
            "steps_mean": round(sum(r.steps for r in results) / len(results), 2)}


def measure_transfer(model, tokenizer, spec, neuron, records, options: CollectOptions, prefixes: list[str],
                     extra_views: list[list[str]] | None = None, keep: list | None = None, **overrides) -> dict:
    """Collect neurons for ``records`` (prompt + ``prefixes`` + ``extra_views[i]`` views) and score them on the
    paraphrases. ``keep``, when given, receives the collected results (one per record, in order)."""
    fmt = spec.format_prompt
    extra_views = extra_views or [[] for _ in records]
    items = [CollectItem(i, [fmt(t, r.prompt_kind) for t in [r.prompt, *(with_prefix(p, r.prompt) for p in prefixes),
                                                              *extra]], r.target_new, r.subject)
             for i, (r, extra) in enumerate(zip(records, extra_views))]
    opts = dataclasses.replace(options, **overrides)
    t0 = time.perf_counter()
    results = collect(model, tokenizer, spec, items, opts, neuron=neuron)
    seconds = time.perf_counter() - t0
    if keep is not None:
        keep.extend(results)
    return {**transfer_scores(model, tokenizer, neuron, spec, records, results),
            "collect_seconds": round(seconds, 1), "n_prefixes": len(prefixes),
            "stop_margin": opts.stop_margin, "key_init": opts.key_init, "stop_rule": opts.stop_rule,
            "n_extra_views": sum(len(v) for v in extra_views)}


__all__ = ["sample_pseudo", "transfer_scores", "measure_transfer", "generate_prefixes"]
