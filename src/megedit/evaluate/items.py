"""Evaluation items and how each is scored: the one definition shared by the evaluate stage and the
benchmarks that score a subset of a run's edits (``bench/incremental.py``).

An item is a dict ``{edit, group, pos, query, kind, target[, pre_tokens, locality_kind, aliases]}``: an edit's
prompt (group ``reliability``), a paraphrase (``generality``), a locality prompt (``locality``, judged against
the base LM's pre-edit answer) or a multi-hop question (``multi_hop``, MQuAKE: judged on a free answer against
the new answer and its aliases). ``restoration_items`` judges an edit's *own* prompt and paraphrases against their
pre-edit answers: what an edit that was removed must give again.
"""

from __future__ import annotations

from typing import Sequence

import torch

from megedit.data.locality_kinds import locality_kind
from megedit.evaluate.metrics import SHORT, harmonic_mean, metric_names
from megedit.scoring import greedy_tokens, target_ids, teacher_forced_ids

AG_PROTOCOLS = {
    "target_length": "greedy decoding of exactly the target's token count; correct iff every token matches "
                     "(locality: the first L pre-edit tokens, L = token count of the locality answer, else of the "
                     "edit target); decided in the teacher-forced pass, which gives the same answer: greedy decoding "
                     "reproduces the target iff each target token is the argmax after the target's own prefix",
    "official": "up to 20 new tokens, decoded, lower-cased and stripped; reliability/generality correct iff the "
                "answer starts with the target, locality correct iff it equals the pre-edit answer",
}


def edit_items(prepared, indices: Sequence[int]) -> list[dict]:
    """Every evaluation item of the edits at ``indices`` (Reliability, Generality, Locality, Multi-hop), in
    order. An edit with several atoms (MQuAKE) gives one reliability item per atom and its atoms'
    paraphrases as generality items, each toward that atom's target."""
    items = []
    for i in indices:
        rec, pre = prepared.edits[i], prepared.pre_edit[i]
        atoms = rec.all_atoms()
        items += [{"edit": i, "group": "reliability", "pos": j, "query": a.prompt, "kind": rec.prompt_kind,
                   "target": a.target_new} for j, a in enumerate(atoms)]
        items += [{"edit": i, "group": "generality", "pos": j, "query": p, "kind": rec.prompt_kind, "target": t}
                  for j, (p, t) in enumerate((p, a.target_new) for a in atoms for p in a.paraphrases)]
        items += [{"edit": i, "group": "locality", "pos": j, "query": loc.prompt, "kind": loc.kind,
                   "target": loc.answer or rec.target_new, "pre_tokens": pre["locality"][j]["tokens"],
                   "locality_kind": locality_kind(rec, loc)}
                  for j, loc in enumerate(rec.locality)]
        items += multi_hop_items(rec, i)
    return items


def multi_hop_items(rec, index: int) -> list[dict]:
    """An edit's multi-hop questions (group ``multi_hop``): right when the greedy answer starts with the new
    answer or one of its aliases (``answer_matches``), whatever the AG protocol."""
    return [{"edit": index, "group": "multi_hop", "pos": j, "query": q.prompt, "kind": q.kind, "target": q.answer,
             "aliases": list(q.aliases)} for j, q in enumerate(rec.multi_hop) if q.answer]


def restoration_items(prepared, indices: Sequence[int]) -> list[dict]:
    """An edit's own prompt and paraphrases, judged like locality prompts against the base LM's pre-edit
    answers to them (over the length of the original answer, else of the new target)."""
    items = []
    for i in indices:
        rec, pre = prepared.edits[i], prepared.pre_edit[i]
        length_of = rec.target_true or rec.target_new
        items.append({"edit": i, "group": "locality", "pos": 0, "query": rec.prompt, "kind": rec.prompt_kind,
                      "target": length_of, "pre_tokens": pre["prompt"]["tokens"], "locality_kind": "own_prompt"})
        items += [{"edit": i, "group": "locality", "pos": j + 1, "query": p, "kind": rec.prompt_kind,
                   "target": length_of, "pre_tokens": pre["paraphrases"][j]["tokens"],
                   "locality_kind": "own_paraphrase"} for j, p in enumerate(rec.paraphrases)]
    return items


def reference_tokens(tokenizer, items: Sequence[dict]) -> list[list[int]]:
    """What each item must produce: the target's tokens, or for a locality item the pre-edit answer over the
    target's length (an empty pre-edit answer means "stop": EOS)."""
    out = []
    for it in items:
        want = target_ids(tokenizer, it["target"])
        if it["group"] != "locality":
            out.append(want)
        else:
            pre = it["pre_tokens"]
            out.append(pre[: max(1, min(len(want), len(pre)))] if pre else [tokenizer.eos_token_id])
    return out


def teacher_forced_scores(lm, tokenizer, neuron, prompts: Sequence[str], targets: Sequence[Sequence[int]],
                          weights: torch.Tensor | None) -> dict:
    """Teacher forcing on explicit target token ids (one batch): token accuracy, exact match, greedy tokens."""
    return teacher_forced_ids(lm, tokenizer, neuron, prompts, targets, weights, batch_size=len(prompts))


FREE_ANSWER_TOKENS = 20  # the official protocol's answer length; multi-hop answers are always read so


def answer_matches(tokenizer, tokens: Sequence[int], item: dict) -> bool:
    """A free greedy answer, decoded, lower-cased and stripped: a locality item's must equal the pre-edit
    answer; a multi-hop item's must start with the target or one of its ``aliases`` (MQuAKE's new answers) as
    whole words; any other's must start with the target (the official protocol)."""
    answer = tokenizer.decode(tokens, skip_special_tokens=True).strip().lower()
    if item["group"] == "locality":
        return answer == tokenizer.decode(item["pre_tokens"], skip_special_tokens=True).strip().lower()
    if item["group"] != "multi_hop":
        return answer.startswith(item["target"].strip().lower())
    return any(starts_with_words(answer, a) for a in [item["target"], *item.get("aliases", [])])


def starts_with_words(answer: str, accepted: str) -> bool:
    """``answer`` (lower-cased) starts with ``accepted`` as whole words: "ar." and "ar" match the alias "ar",
    "arab" does not."""
    want = accepted.strip().lower()
    return bool(want) and answer.startswith(want) and (len(answer) == len(want) or not answer[len(want)].isalnum())


def greedy_scores(lm, tokenizer, neuron, prompts: Sequence[str], items: Sequence[dict], forced: dict,
                  weights: torch.Tensor | None, ag_protocol: str = "target_length") -> tuple[torch.Tensor, list[list[int]]]:
    """(correct [n] as floats, greedy tokens) under the AG protocol (``AG_PROTOCOLS``); ``forced`` is
    ``teacher_forced_scores``' result on the same items. Multi-hop items are always judged on a free answer
    (``answer_matches``), as MQuAKE does."""
    if ag_protocol == "target_length":
        # greedy exact match of the target's length is teacher forcing's exact match (scoring.teacher_forced_ids)
        hits, gen = forced["exact"].float().clone(), list(forced["greedy"])
        free = [k for k, it in enumerate(items) if it["group"] == "multi_hop"]
    else:
        hits, gen, free = torch.zeros(len(items)), [[] for _ in items], list(range(len(items)))
    if not free:
        return hits, gen
    rows = None if weights is None else weights[free]
    got = greedy_tokens(lm, tokenizer, neuron, [prompts[k] for k in free], rows, FREE_ANSWER_TOKENS, len(free))
    eos = tokenizer.eos_token_id
    for k, g in zip(free, got):
        gen[k] = g[: g.index(eos)] if eos in g else g
        hits[k] = float(answer_matches(tokenizer, gen[k], items[k]))
    return hits, gen


@torch.no_grad()
def score_meg(edited, items: Sequence[dict], batch_size: int = 32, ag_protocol: str = "target_length") -> list[dict]:
    """The ``meg`` variant of the evaluate stage on ``items``: route each batch through ``edited`` (an
    ``EditedLM``), then TF and AG per item. One row per item: the item plus ``tf``, ``ag``, ``familiar``."""
    rows = []
    for start in range(0, len(items), batch_size):
        batch = list(items[start:start + batch_size])
        routing = edited.route([it["query"] for it in batch])
        weights = routing.weights if bool(routing.familiar.any()) else None
        prompts = [edited.spec.format_prompt(it["query"], it["kind"]) for it in batch]
        targets = reference_tokens(edited.tokenizer, batch)
        forced = teacher_forced_scores(edited.lm, edited.tokenizer, edited.neuron, prompts, targets, weights)
        ag, _ = greedy_scores(edited.lm, edited.tokenizer, edited.neuron, prompts, batch, forced, weights, ag_protocol)
        rows += [{**it, "tf": float(forced["token_acc"][k]), "ag": bool(ag[k]), "familiar": bool(routing.familiar[k])}
                 for k, it in enumerate(batch)]
    return rows


def summarise_rows(rows: Sequence[dict]) -> dict:
    """``{rel_tf, rel_ag, gen_tf, gen_ag, loc_tf, loc_ag, score, familiar: {rel, gen, loc}, n}`` in percent
    (None for a group without items; the Score only when all six exist), as the evaluate stage reports them."""
    out: dict = {"familiar": {}, "n": {}}
    for group, short in SHORT.items():
        part = [r for r in rows if r["group"] == group]
        out["n"][short] = len(part)
        for mode in ("tf", "ag"):
            out[f"{short}_{mode}"] = round(100.0 * sum(float(r[mode]) for r in part) / len(part), 2) if part else None
        out["familiar"][short] = round(100.0 * sum(r["familiar"] for r in part) / len(part), 2) if part else None
    six = [out[name] for name in metric_names()]
    out["score"] = round(harmonic_mean(six), 2) if None not in six else None
    return out
