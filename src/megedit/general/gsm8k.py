"""GSM8K (test split, 1,319 problems): the paper's zero-shot chain-of-thought prompt (Table 23, its GPT-J
form; GSM8K has no few-shot split here), greedy decoding, and exact match of the last number written."""

from __future__ import annotations

import re
from pathlib import Path

from megedit.data.readers import DataFormatError
from megedit.general.files import read_jsonl, text
from megedit.general.items import Item

FILE = "general/gsm8k/test.jsonl"
PROMPT = "Question: {question}\nAnswer: Let's think step by step."
STOPS = ("\nQuestion:", "\n\n\n")  # the model starting a new problem, or running dry
_FINAL = re.compile(r"####\s*(\S+)\s*$")


def reference_number(path: Path, n: int, solution: str) -> str:
    """The number after the solution's final ``#### `` (commas dropped)."""
    match = _FINAL.search(solution.strip())
    if not match:
        raise DataFormatError(path, "does not end with '#### <number>'", record=n, field="answer")
    return match.group(1).replace(",", "")


def load(data_dir: Path) -> list[Item]:
    path = Path(data_dir) / FILE
    items = []
    for n, rec in read_jsonl(path):
        question = text(path, n, rec, "question")
        gold = reference_number(path, n, text(path, n, rec, "answer"))
        items.append(Item("gsm8k", str(n), query=question, body=PROMPT.format(question=question), gold=gold,
                          answer_format="last_number", stops=STOPS))
    return items
