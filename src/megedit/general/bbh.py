"""BIG-Bench Hard (27 task files, 6,511 items): 3-shot with the task's published exemplars
(``cot-prompts/<task>.txt``), greedy decoding, exact match of the answer.

``answer_only`` (default, the BBH paper's answer-only prompting): each exemplar is "Q: ...\\nA: <answer>" and
the answer is the first line generated. ``cot`` (the MeG paper's setting, via chain-of-thought-hub): the
exemplars keep their reasoning, the prompt ends "A: Let's think step by step." and the answer is what
follows the last "the answer is"; it needs a few hundred new tokens per item.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from megedit.data.readers import DataFormatError
from megedit.general.files import require_file, text
from megedit.general.items import Item

DIR = "general/bbh"
PROMPTINGS = ("answer_only", "cot")
COT_CUE = "Let's think step by step."
_SO = re.compile(r"So the answer is (.+?)\.?\s*$", re.S)


def parse_exemplars(path: Path) -> tuple[str, list[tuple[str, str, str]]]:
    """A cot-prompts file: (task description, [(question, reasoning after "A: ", final answer)])."""
    raw = require_file(path).read_text(encoding="utf-8")
    _, sep, body = raw.partition("-----\n")
    description, sep2, rest = body.partition("\n\nQ: ")
    if not sep or not sep2:
        raise DataFormatError(path, "expected a canary line, '-----', a task description and 'Q: ' exemplars")
    shots = []
    for k, block in enumerate(("Q: " + rest).strip().split("\n\nQ: ")):
        question, sep, reasoning = block.removeprefix("Q: ").partition("\nA: ")
        final = _SO.search(reasoning)
        if not sep or not final:
            raise DataFormatError(path, "needs 'Q: ...', 'A: ...' and 'So the answer is ...'", record=k)
        shots.append((question, reasoning.strip(), final.group(1).strip()))
    return description.strip(), shots


def _examples(path: Path) -> list[tuple[str, str]]:
    try:
        data = json.loads(require_file(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataFormatError(path, f"not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, dict) or not isinstance(data.get("examples"), list):
        raise DataFormatError(path, "expected an object with an 'examples' list", field="examples")
    return [(text(path, n, ex, "input"), text(path, n, ex, "target").strip())
            for n, ex in enumerate(data["examples"])]


def load(data_dir: Path, prompting: str = "answer_only") -> list[Item]:
    if prompting not in PROMPTINGS:
        raise ValueError(f"BBH prompting must be one of {PROMPTINGS}, got {prompting!r}")
    root = Path(data_dir) / DIR
    tasks = sorted(p.stem for p in root.glob("*.json"))
    if not tasks:
        raise FileNotFoundError(f"{root}: no <task>.json files (see ../shared/data/README.md)")
    items = []
    for task in tasks:
        description, exemplars = parse_exemplars(root / "cot-prompts" / f"{task}.txt")
        if prompting == "cot":
            shots = tuple(f"Q: {q}\nA: {reasoning}\n\n" for q, reasoning, _ in exemplars)
        else:
            shots = tuple(f"Q: {q}\nA: {answer}\n\n" for q, _, answer in exemplars)
        cue = f" {COT_CUE}" if prompting == "cot" else ""
        for n, (question, target) in enumerate(_examples(root / f"{task}.json")):
            items.append(Item("bbh", f"{task}/{n}", query=question, body=f"Q: {question}\nA:{cue}", gold=target,
                              answer_format="answer_is" if prompting == "cot" else "first_line",
                              header=f"{description}\n\n", shots=shots, group=task,
                              stops=("\n",) if prompting == "answer_only" else ("\nQ:",)))
    return items
