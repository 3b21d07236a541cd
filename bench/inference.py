"""Inference benchmark: the plain LM against the full MeG path on the same queries, in one run.

    python bench/inference.py --run runs/smollm2-counterfact-1024 [--n 64] [--out bench/results/inference.json]

Queries are a mix of edit prompts, their paraphrases and their locality prompts (n of each). Both paths
answer greedily with up to 20 new tokens. Reports queries/s, the MeG overhead in % of the plain LM's
time, and the time per component (encoder, router, sampler, LM), as a table and as JSON.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from megedit.artifacts import atomic_write_json


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True)
    p.add_argument("--n", type=int, default=64, help="queries per group (edit prompts, paraphrases, locality)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=2, help="timed passes over the queries (best is reported)")
    p.add_argument("--out", default="bench/results/inference.json")
    args = p.parse_args(argv)

    from megedit.edited_model import EditedLM
    from megedit.scoring import greedy_generate

    lm = EditedLM.load(args.run, steps=args.steps)
    edits = lm.prepared.edits[: args.n]
    groups = {"edit": [(e.prompt, e.prompt_kind) for e in edits],
              "paraphrase": [(e.paraphrases[0], e.prompt_kind) for e in edits],
              "locality": [(e.locality[0].prompt, e.locality[0].kind) for e in edits]}
    queries = [q for g in groups.values() for q in g]
    texts = [q for q, _ in queries]
    prompts = [lm.spec.format_prompt(q, k) for q, k in queries]
    bs = args.batch_size

    def plain():
        for i in range(0, len(prompts), bs):
            greedy_generate(lm.lm, lm.tokenizer, lm.neuron, prompts[i:i + bs], None, max_new_tokens=20, batch_size=bs)

    def meg():
        parts = {"encoder": 0.0, "router": 0.0, "sampler": 0.0, "lm": 0.0}
        for i in range(0, len(prompts), bs):
            routing = lm.route(texts[i:i + bs])
            for k, v in routing.timings.items():
                parts[k] += v
            t0 = time.perf_counter()
            greedy_generate(lm.lm, lm.tokenizer, lm.neuron, prompts[i:i + bs], lm._lm_weights(routing),
                            max_new_tokens=20, batch_size=bs)
            parts["lm"] += time.perf_counter() - t0
        return parts

    plain()  # warm-up (allocations, first-call overheads) for both paths
    meg()
    plain_s, meg_s, parts_best = float("inf"), float("inf"), None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        plain()
        plain_s = min(plain_s, time.perf_counter() - t0)
        t0 = time.perf_counter()
        parts = meg()
        total = time.perf_counter() - t0
        if total < meg_s:
            meg_s, parts_best = total, parts
    n = len(prompts)
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()},
        "run": args.run, "queries": n, "batch_size": bs, "ddim_steps": args.steps, "max_new_tokens": 20,
        "plain_lm": {"seconds": round(plain_s, 3), "qps": round(n / plain_s, 2)},
        "meg": {"seconds": round(meg_s, 3), "qps": round(n / meg_s, 2),
                "components_seconds": {k: round(v, 3) for k, v in parts_best.items()}},
        "overhead_percent": round(100.0 * (meg_s - plain_s) / plain_s, 2),
        "routed_familiar": {g: None for g in groups},
    }
    routing = lm.route(texts)
    start = 0
    for g, items in groups.items():
        result["routed_familiar"][g] = round(100.0 * routing.familiar[start:start + len(items)].float().mean().item(), 1)
        start += len(items)
    out = Path(args.out)
    atomic_write_json(out, result)
    print(f"{'path':<10} {'seconds':>9} {'queries/s':>10}")
    print(f"{'plain LM':<10} {plain_s:>9.2f} {n / plain_s:>10.2f}")
    print(f"{'MeG':<10} {meg_s:>9.2f} {n / meg_s:>10.2f}")
    print(f"MeG overhead: {result['overhead_percent']:.1f}% of the plain LM's time ({n} queries, DDIM {args.steps})")
    print("MeG components (s): " + ", ".join(f"{k} {v:.2f}" for k, v in parts_best.items()))
    print(f"routed familiar (%): {result['routed_familiar']}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
