"""Inference overhead: the plain LM against the full MeG path on the same queries, in one run.

    python bench/inference.py --run runs/smollm2-counterfact-1024 [--n 256] [--batch-sizes 1 8 32] [--steps 50 10]

Queries: ``n`` in all, half routed (edit prompts and their first paraphrase, a quarter each) and half not
(locality prompts), shuffled with a fixed seed so every batch mixes routed and unrouted rows, as a server's
would. Both paths answer greedily with up to ``--max-new-tokens`` new tokens. Per batch size and DDIM step
count: queries/s of each path, MeG's overhead in % of the plain LM's time, and MeG's time per component
(encoder, router, sampler, LM with the neurons attached). Each timing is the best of ``--repeats`` passes
(after a warm-up pass), so a busy machine's noise is reduced, not removed: the JSON records the load average.
Writes JSON (default ``bench/results/inference.json``), a Markdown table next to it and prints the table.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch

from megedit.artifacts import atomic_write_json, atomic_write_text


def queries(lm, n: int, seed: int) -> tuple[list[str], list[str], list[str]]:
    """``(texts, prompts, groups)``: n/4 edit prompts, n/4 paraphrases, n/2 locality prompts, shuffled."""
    edits = lm.prepared.edits
    quarter = n // 4
    if len(edits) < 2 * quarter:
        raise SystemExit(f"the run has {len(edits)} edits; --n {n} needs {2 * quarter}")
    rows = [(e.prompt, e.prompt_kind, "edit") for e in edits[:quarter]]
    rows += [(e.paraphrases[0], e.prompt_kind, "paraphrase") for e in edits[:quarter] if e.paraphrases]
    rows += [(loc.prompt, loc.kind, "locality") for e in edits[: 2 * quarter] for loc in e.locality[:1]]
    random.Random(seed).shuffle(rows)
    return [r[0] for r in rows], [lm.spec.format_prompt(r[0], r[1]) for r in rows], [r[2] for r in rows]


def time_plain(lm, prompts: list[str], bs: int, max_new: int) -> float:
    from megedit.scoring import greedy_generate

    t0 = time.perf_counter()
    for i in range(0, len(prompts), bs):
        greedy_generate(lm.lm, lm.tokenizer, lm.neuron, prompts[i:i + bs], None, max_new_tokens=max_new,
                        batch_size=bs)
    return time.perf_counter() - t0


def time_meg(lm, texts: list[str], prompts: list[str], bs: int, max_new: int) -> tuple[float, dict]:
    from megedit.scoring import greedy_generate

    parts = {"encoder": 0.0, "router": 0.0, "sampler": 0.0, "lm": 0.0}
    t0 = time.perf_counter()
    for i in range(0, len(prompts), bs):
        routing = lm.route(texts[i:i + bs])
        for k, v in routing.timings.items():
            parts[k] += v
        t1 = time.perf_counter()
        greedy_generate(lm.lm, lm.tokenizer, lm.neuron, prompts[i:i + bs], lm._lm_weights(routing),
                        max_new_tokens=max_new, batch_size=bs)
        parts["lm"] += time.perf_counter() - t1
    return time.perf_counter() - t0, parts


def best(fn, repeats: int):
    """The fastest of ``repeats`` calls (after one warm-up call), with what that call returned."""
    fn()
    results = [fn() for _ in range(repeats)]
    return min(results, key=lambda r: r[0] if isinstance(r, tuple) else r)


def measure(lm, texts, prompts, batch_sizes, steps_list, max_new, repeats) -> list[dict]:
    rows = []
    for bs in batch_sizes:
        plain_s = best(lambda: time_plain(lm, prompts, bs, max_new), repeats)
        for steps in steps_list:
            lm.steps = steps
            meg_s, parts = best(lambda: time_meg(lm, texts, prompts, bs, max_new), repeats)
            row = {"batch_size": bs, "ddim_steps": steps, "plain_seconds": round(plain_s, 3),
                   "plain_qps": round(len(prompts) / plain_s, 2), "meg_seconds": round(meg_s, 3),
                   "meg_qps": round(len(prompts) / meg_s, 2),
                   "overhead_percent": round(100.0 * (meg_s - plain_s) / plain_s, 2),
                   "components_seconds": {k: round(v, 3) for k, v in parts.items()}}
            rows.append(row)
            print(_line(row), flush=True)
    return rows


HEADER = ("| batch | DDIM steps | plain q/s | MeG q/s | overhead % | encoder s | router s | sampler s | LM s |\n"
          "|---|---|---|---|---|---|---|---|---|")


def _line(r: dict) -> str:
    c = r["components_seconds"]
    return (f"| {r['batch_size']} | {r['ddim_steps']} | {r['plain_qps']:.2f} | {r['meg_qps']:.2f} | "
            f"{r['overhead_percent']:+.1f} | {c['encoder']:.2f} | {c['router']:.3f} | {c['sampler']:.2f} | {c['lm']:.2f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("--n", type=int, default=256, help="queries in all (half routed, half not)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--steps", type=int, nargs="+", default=[50, 10], help="DDIM step counts to compare")
    p.add_argument("--max-new-tokens", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2, help="timed passes per cell (the best is reported)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench/results/inference.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from megedit.edited_model import EditedLM

    lm = EditedLM.load(args.run)
    texts, prompts, groups = queries(lm, args.n, args.seed)
    load_before = os.getloadavg()
    print(HEADER)
    rows = measure(lm, texts, prompts, args.batch_sizes, args.steps, args.max_new_tokens, args.repeats)
    routing = lm.route(texts)
    routed = {g: round(100.0 * sum(bool(f) for f, gg in zip(routing.familiar, groups) if gg == g)
                       / max(1, groups.count(g)), 1) for g in ("edit", "paraphrase", "locality")}
    result = {"command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": args.threads,
                          "cuda": torch.cuda.is_available(), "load_average_before": [round(x, 2) for x in load_before],
                          "load_average_after": [round(x, 2) for x in os.getloadavg()]},
              "run": args.run, "queries": len(prompts), "groups": {g: groups.count(g) for g in set(groups)},
              "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "routed_familiar_percent": routed,
              "rows": rows}
    out = Path(args.out)
    atomic_write_json(out, result)
    table = "\n".join([HEADER, *(_line(r) for r in rows)])
    atomic_write_text(out.with_suffix(".md"), f"# Inference overhead\n\n`{result['command']}`\n\n{table}\n\n"
                      f"Routed familiar (%): {routed}. Load average before/after: {result['machine']}.\n")
    print(f"routed familiar (%): {routed}; wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
