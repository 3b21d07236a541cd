"""RTE and SST-2 (GLUE dev sets): the paper's zero-shot prompts (Table 23) and the label word with the
higher log-probability as the answer (" True" / " False"; " positive" / " negative")."""

from __future__ import annotations

from pathlib import Path

from megedit.general.files import one_of, read_jsonl, read_table, text
from megedit.general.items import Item

RTE_FILE = "general/rte/val.jsonl"
SST2_FILE = "general/sst2/dev.tsv"
# The paper's GPT-J form; its Phi-2 form wraps the same sentence in Phi-2's "Instruct: ... Output:".
# The hypothesis's final period is dropped, as the prompt adds its own.
RTE_PROMPT = "{premise} entails the {hypothesis}. True or False? answer:"
RTE_LABELS = {"entailment": " True", "not_entailment": " False"}
SST2_PROMPT = ("For each snippet of text, label the sentiment of the text as positive or negative. "
               "The answer should be exact 'positive' or 'negative'.\ntext: {text}\nanswer:")
SST2_LABELS = {"1": " positive", "0": " negative"}


def load_rte(data_dir: Path) -> list[Item]:
    path = Path(data_dir) / RTE_FILE
    items = []
    for n, rec in read_jsonl(path):
        premise, hypothesis = text(path, n, rec, "premise").strip(), text(path, n, rec, "hypothesis").strip()
        gold = one_of(path, n, rec, "label", RTE_LABELS)
        body = RTE_PROMPT.format(premise=premise, hypothesis=hypothesis.rstrip("."))
        items.append(Item("rte", str(n), query=f"{premise} {hypothesis}", body=body, gold=gold,
                          choices=tuple(RTE_LABELS.values())))
    return items


def load_sst2(data_dir: Path) -> list[Item]:
    path = Path(data_dir) / SST2_FILE
    items = []
    for n, row in read_table(path, ("sentence", "label"), delimiter="\t"):
        sentence = text(path, n, row, "sentence").strip()
        gold = one_of(path, n, row, "label", SST2_LABELS)
        items.append(Item("sst2", str(n), query=sentence, body=SST2_PROMPT.format(text=sentence), gold=gold,
                          choices=tuple(SST2_LABELS.values())))
    return items
