"""From per-item rows to the numbers of the table: accuracy per (variant, benchmark) with a 95% interval,
the mean over benchmarks, how many answers differ from the base LM's, and how often MeG routed."""

from __future__ import annotations

import math

PROTOCOLS = {
    "bbh": "3-shot with the task's published exemplars (answer-only, or chain of thought with "
           "bbh_prompting: cot); greedy; exact match of the answer (a target '(B)' also as 'B')",
    "gsm8k": "zero-shot chain of thought, 'Question: {q}\\nAnswer: Let's think step by step.' (the paper's "
             "Table 23); greedy; the last number written equals the reference",
    "mmlu": "5-shot with the subject's dev questions (fewer where the prompt exceeds max_prompt_tokens); the "
            "letter among ' A'..' D' with the highest next-token log-probability",
    "rte": "zero-shot '{premise} entails the {hypothesis}. True or False? answer:' (the paper's Table 23); "
           "' True' (entailment) vs ' False' by log-probability",
    "sst2": "zero-shot instruction 'For each snippet of text, label the sentiment ...\\ntext: {text}\\nanswer:' "
            "(the paper's Table 23); ' positive' vs ' negative' by log-probability",
}


def wilson(correct: int, n: int, z: float = 1.96) -> list[float] | None:
    """95% Wilson score interval of a proportion, in percent."""
    if n == 0:
        return None
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(100 * max(0.0, centre - half), 2), round(100 * min(1.0, centre + half), 2)]


def _cell(rows: list[dict], base: dict[str, dict] | None) -> dict:
    n, correct = len(rows), sum(bool(r["correct"]) for r in rows)
    cell = {"accuracy": round(100 * correct / n, 2) if n else None, "correct": correct, "n": n,
            "ci95": wilson(correct, n)}
    if base is not None:
        cell["changed_vs_base"] = sum(r["prediction"] != base[r["key"]]["prediction"] for r in rows)
    if any(r.get("routed") is not None for r in rows):
        cell["routed"] = sum(bool(r.get("routed")) for r in rows)
    return cell


def summarise(rows_by_variant: dict[str, list[dict]], benchmarks: list[str]) -> dict:
    """``{variant: {benchmark: cell, "average": mean accuracy over the benchmarks}}`` (cells from ``_cell``)."""
    base = {r["key"]: r for r in rows_by_variant["base"]} if "base" in rows_by_variant else None
    out = {}
    for variant, rows in rows_by_variant.items():
        cells = {b: _cell([r for r in rows if r["benchmark"] == b], base if variant != "base" else None)
                 for b in benchmarks}
        accs = [c["accuracy"] for c in cells.values() if c["accuracy"] is not None]
        out[variant] = {**cells, "average": round(sum(accs) / len(accs), 2) if accs else None}
    return out
