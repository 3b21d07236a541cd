"""MMLU (test split, 57 subjects): the original 5-shot format (the subject's dev questions as exemplars,
Hendrycks et al.), and the letter among " A".." D" with the highest next-token log-probability."""

from __future__ import annotations

from pathlib import Path

from megedit.data.readers import DataFormatError
from megedit.general.files import read_table, text
from megedit.general.items import Item

DIR = "general/mmlu"
COLUMNS = ("question", "choice0", "choice1", "choice2", "choice3", "answer")
LETTERS = ("A", "B", "C", "D")
HEADER = "The following are multiple choice questions (with answers) about {subject}.\n\n"


def question_block(row: dict) -> str:
    """A question and its four lettered options, ending with "Answer:"."""
    options = "".join(f"\n{letter}. {row[f'choice{i}']}" for i, letter in enumerate(LETTERS))
    return f"{row['question'].strip()}{options}\nAnswer:"


def _rows(path: Path) -> list[tuple[dict, str]]:
    """Each row with its correct letter, checked."""
    out = []
    for n, row in read_table(path, COLUMNS):
        text(path, n, row, "question")
        if row["answer"].strip() not in ("0", "1", "2", "3"):
            raise DataFormatError(path, f"expected 0-3, got {row['answer']!r}", record=n, field="answer")
        out.append((row, LETTERS[int(row["answer"])]))
    return out


def load(data_dir: Path) -> list[Item]:
    root = Path(data_dir) / DIR
    tests = sorted((root / "test").glob("*_test.csv"))
    if not tests:
        raise FileNotFoundError(f"{root / 'test'}: no <subject>_test.csv files (see ../shared/data/README.md)")
    items = []
    for test_file in tests:
        subject = test_file.name[: -len("_test.csv")]
        shots = tuple(f"{question_block(row)} {letter}\n\n" for row, letter in _rows(root / "dev" / f"{subject}_dev.csv"))
        header = HEADER.format(subject=subject.replace("_", " "))
        for n, (row, letter) in enumerate(_rows(test_file)):
            items.append(Item("mmlu", f"{subject}/{n}", query=row["question"].strip(), body=question_block(row),
                              gold=f" {letter}", choices=tuple(f" {x}" for x in LETTERS), header=header,
                              shots=shots, group=subject))
    return items
