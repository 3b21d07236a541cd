"""The base LM's pre-edit answers: which prompts of an edit get one, how they are generated, and how they
land in the edit rows of ``edits.jsonl``.

Shared by the prepare stage (every edit of a benchmark split) and ``megedit edits add`` (the new edits of a
run version), so both record Locality's reference the same way.
"""

from __future__ import annotations

from typing import Sequence

import torch

from megedit.data.records import EditRecord


def answer_requests(records: Sequence[EditRecord], format_prompt) -> list[dict]:
    """Every prompt whose pre-edit answer is needed, keyed by (edit index, field, position)."""
    reqs = []
    for i, rec in enumerate(records):
        reqs.append({"edit": i, "field": "prompt", "pos": 0, "text": format_prompt(rec.prompt, rec.prompt_kind)})
        reqs += [{"edit": i, "field": "paraphrases", "pos": j, "text": format_prompt(p, rec.prompt_kind)}
                 for j, p in enumerate(rec.paraphrases)]
        reqs += [{"edit": i, "field": "locality", "pos": j, "text": format_prompt(p.prompt, p.kind)}
                 for j, p in enumerate(rec.locality)]
    for k, r in enumerate(reqs):
        r["key"] = k
    return reqs


def collate_requests(tokenizer, batch: list[dict]) -> dict:
    enc = tokenizer([b["text"] for b in batch], return_tensors="pt", padding=True)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "keys": [b["key"] for b in batch],
            "texts": [b["text"] for b in batch]}


@torch.no_grad()
def greedy_answers(lm, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   max_new_tokens: int) -> list[list[int]]:
    """The greedy continuation of each (left-padded) prompt, cut before its first EOS."""
    out = lm.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                      do_sample=False, pad_token_id=tokenizer.pad_token_id)
    eos = tokenizer.eos_token_id
    return [toks[: toks.index(eos)] if eos in toks else toks for toks in out[:, input_ids.shape[1]:].tolist()]


def edit_rows(records: Sequence[EditRecord], requests: list[dict], answers: dict[int, list[int]],
              tokenizer) -> list[dict]:
    """``edits.jsonl`` rows: each record with its pre-edit answers ``{prompt, paraphrases[], locality[]}``
    (tokens and text) and ``base_correct`` (the base LM already starts its answer with the new target)."""
    missing = [r["key"] for r in requests if r["key"] not in answers]
    if missing:
        raise RuntimeError(f"{len(missing)} prompts got no pre-edit answer (first keys {missing[:5]})")
    rows = [{**rec.to_dict(), "pre_edit": {"prompt": None, "paraphrases": [None] * len(rec.paraphrases),
                                           "locality": [None] * len(rec.locality)}} for rec in records]
    for r in requests:
        toks = answers[r["key"]]
        slot = rows[r["edit"]]["pre_edit"]
        entry = {"tokens": toks, "text": tokenizer.decode(toks, skip_special_tokens=True)}
        if r["field"] == "prompt":
            slot["prompt"] = entry
        else:
            slot[r["field"]][r["pos"]] = entry
    for row in rows:
        target = tokenizer(" " + row["target_new"], add_special_tokens=False)["input_ids"]
        row["base_correct"] = row["pre_edit"]["prompt"]["tokens"][: len(target)] == target
    return rows


def answer_edits(lm, tokenizer, records: Sequence[EditRecord], format_prompt, max_new_tokens: int = 20,
                 batch_size: int = 32) -> list[dict]:
    """``edit_rows`` for ``records``, answered in one process (the stage answers through a Lightning loop)."""
    requests = answer_requests(records, format_prompt)
    order = sorted(requests, key=lambda r: len(r["text"]))  # little padding; keys restore the order
    device = next(lm.parameters()).device
    answers: dict[int, list[int]] = {}
    for start in range(0, len(order), batch_size):
        batch = collate_requests(tokenizer, order[start:start + batch_size])
        got = greedy_answers(lm, tokenizer, batch["input_ids"].to(device), batch["attention_mask"].to(device),
                             max_new_tokens)
        answers.update(zip(batch["keys"], got))
    return edit_rows(records, requests, answers, tokenizer)
