"""Reading a generated continuation as an answer, and judging it against the reference.

- ``last_number`` (GSM8K): the last number in the text, commas and a trailing period dropped; equal when
  both parse to the same value ("18.00" is "18").
- ``first_line`` (BBH answer-only): the first non-empty line, stripped, a final period dropped.
- ``answer_is`` (BBH chain of thought): what follows the last "the answer is" up to the line's end.
BBH compares the answer with the target exactly; a lettered target "(B)" also accepts "B" and an answer
that starts "(B)" (a model often goes on with the option's text).
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_ANSWER_IS = re.compile(r"the answer is", re.I)
_LETTER = re.compile(r"^\(([A-Z])\)$")


def extract(answer_format: str, continuation: str) -> str | None:
    """The answer the continuation gives, or None where it gives none."""
    if answer_format == "last_number":
        numbers = _NUMBER.findall(continuation)
        return numbers[-1].replace(",", "").rstrip(".") if numbers else None
    if answer_format == "first_line":
        lines = [line.strip() for line in continuation.splitlines() if line.strip()]
        return lines[0].removesuffix(".").strip() if lines else None
    if answer_format == "answer_is":
        parts = _ANSWER_IS.split(continuation)
        lines = parts[-1].lstrip(" :").splitlines() if len(parts) > 1 else []
        return (lines[0].strip().removesuffix(".").strip() or None) if lines else None
    raise ValueError(f"unknown answer format {answer_format!r}")


def _as_number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def is_correct(answer_format: str, answer: str | None, gold: str) -> bool:
    if answer is None:
        return False
    if answer_format == "last_number":
        a, g = _as_number(answer), _as_number(gold)
        return answer == gold if a is None or g is None else abs(a - g) < 1e-9
    if answer == gold:
        return True
    letter = _LETTER.match(gold)
    if letter:  # "(B)" also as "B", "B)" or "(B) the option's text"
        return re.match(rf"^\(?{letter.group(1)}\)?(?:$|[\s.:,])", answer) is not None
    return False
