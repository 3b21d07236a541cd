"""Benchmark: the FT baseline's epoch on the layer split against a full-model epoch, same edits, same run.

Full = what ``finetune_mlp`` did before: every step runs the whole LM over the whole sequence (all logits)
and checks reliability with the full model's teacher forcing. Split = ``megedit.baselines.ft`` today: the
layers below the edit layer run once per edit, each step runs the edit layer and those above it, the LM
head only where a target token is predicted. Both start from the same MLP, see the edits in the same order
with the same Adam settings; the table compares seconds per epoch, the losses and the reliability reached.

    python bench/ft.py --prepare_dir runs/smollm2-counterfact-1024/prepare --n 128 --epochs 2
"""

from __future__ import annotations

import argparse
import os
import random
import time
from pathlib import Path

import torch
from collect_bench import prepared_lm

from megedit.artifacts import atomic_write_json
from megedit.baselines import ft
from megedit.layer_split import LayerSplit
from megedit.loading import edit_mlp
from megedit.scoring import target_batch, teacher_forced


def full_epoch(lm, tokenizer, opt, prompts, targets, order, batch_size) -> float:
    """The reference: one epoch with full forwards (the pre-split ``finetune_mlp`` loop)."""
    total, device = 0.0, next(lm.parameters()).device
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        b = {k: v.to(device) for k, v in target_batch(tokenizer, [prompts[i] for i in idx],
                                                       [targets[i] for i in idx]).items()}
        logits = lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"], position_ids=b["position_ids"],
                    use_cache=False).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), b["labels"][:, 1:].flatten(),
                                                 ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item() * len(idx)
    return total / len(order)


def run(kind: str, lm, tokenizer, spec, prompts, targets, args) -> dict:
    """Train ``args.epochs`` epochs one way from the original MLP; seconds, losses, reliability; MLP restored."""
    mlp = edit_mlp(lm, spec)
    original = {k: v.detach().clone() for k, v in mlp.state_dict().items()}
    try:
        for p in mlp.parameters():
            p.requires_grad_(True)
        started = time.perf_counter()
        losses, reliability = _train(kind, lm, tokenizer, spec, prompts, targets, args,
                                     torch.optim.Adam(mlp.parameters(), lr=args.lr))
        seconds = time.perf_counter() - started
    finally:
        for p in mlp.parameters():
            p.requires_grad_(False)
        mlp.load_state_dict(original)
    return {"seconds": round(seconds, 2), "seconds_per_epoch": round(seconds / args.epochs, 2),
            "losses": [round(x, 5) for x in losses], "reliability": [round(x, 4) for x in reliability]}


def _train(kind, lm, tokenizer, spec, prompts, targets, args, opt) -> tuple[list[float], list[float]]:
    device = next(lm.parameters()).device
    order, rng = list(range(len(prompts))), random.Random(args.seed)
    split = LayerSplit(lm, spec)
    edits = ft._lower_cache(split, tokenizer, prompts, targets, args.batch_size, device) if kind == "split" else None
    losses, reliability = [], []
    for _ in range(args.epochs):
        rng.shuffle(order)
        if kind == "split":
            losses.append(ft._epoch(split, opt, [edits[i] for i in order], args.batch_size, device))
            reliability.append(ft._reliability(split, edits, args.batch_size, device))
        else:
            losses.append(full_epoch(lm, tokenizer, opt, prompts, targets, order, args.batch_size))
            with torch.no_grad():
                exact = teacher_forced(lm, tokenizer, None, prompts, targets, batch_size=args.batch_size)["exact"]
            reliability.append(float(exact.float().mean()))
    return losses, reliability


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prepare_dir", required=True)
    ap.add_argument("--n", type=int, default=128, help="edits (the first n of the run)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-3, help="Adam, as configs/stages/evaluate.yaml ft_lr")
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "ft.json"))
    args = ap.parse_args(argv)
    prepared, lm, tokenizer, _ = prepared_lm(args.prepare_dir)
    spec, records = prepared.spec, prepared.edits[:args.n]
    prompts = [spec.format_prompt(r.prompt, r.prompt_kind) for r in records]
    targets = [r.target_new for r in records]
    load_before = [round(x, 2) for x in os.getloadavg()]
    rows = {kind: run(kind, lm, tokenizer, spec, prompts, targets, args) for kind in ("full", "split")}
    result = {"command": "python bench/ft.py " + " ".join(argv or []), "args": vars(args), "n": len(records),
              "threads": torch.get_num_threads(), "load_average_before": load_before,
              "load_average_after": [round(x, 2) for x in os.getloadavg()], "rows": rows,
              "speedup": round(rows["full"]["seconds"] / rows["split"]["seconds"], 2)}
    print(f"{'FT epoch':<8}{'s/epoch':>10}  losses / reliability per epoch")
    for kind, r in rows.items():
        print(f"{kind:<8}{r['seconds_per_epoch']:>10.1f}  {r['losses']} / {r['reliability']}")
    print(f"split is {result['speedup']}x faster (n={len(records)}, load {load_before} -> {result['load_average_after']})")
    atomic_write_json(Path(args.out), result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
