"""Sampler benchmark (the paper's Table 8 in small): time per query and per batch of 64 queries
for DDIM at 10, 50, 100 and 1000 steps, and the reliability of the neurons generated at each,
at sampling temperatures (initial-noise scale) 1 (a standard sample, the baseline) and 0.

Baselines measured in the same run: the collected neurons' reliability on the same edits, and
the time of one greedy LM answer per query (what the generator's cost adds to).

    python bench/sampler.py --diffusion_dir runs/smollm2-counterfact-1024/diffusion [--queries 128]

The prepare, encoder and collect artifacts are the ones recorded in the diffusion manifest.
Prints a table and writes JSON (default ``bench/results/sampler.json``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from megedit.artifacts import atomic_write_json


def _time(fn, repeats: int) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` runs (after one warm-up)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--diffusion_dir", required=True, help="output folder of the diffusion stage")
    ap.add_argument("--steps", type=int, nargs="+", default=[10, 50, 100, 1000])
    ap.add_argument("--samplers", nargs="+", default=["ddim"], choices=["ddim", "ancestral"])
    ap.add_argument("--noise-scales", type=float, nargs="+", default=[1.0, 0.0],
                    help="sampling temperatures (initial-noise scale); 1 is a standard sample, the baseline")
    ap.add_argument("--queries", type=int, default=128, help="edits whose generated neurons are scored")
    ap.add_argument("--batch", type=int, default=64, help="queries per timed batch")
    ap.add_argument("--repeats", type=int, default=3, help="timed repetitions (median)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/sampler.json)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from megedit.artifacts import check_lineage, read_manifest
    from megedit.components.neuron import DynamicNeuron
    from megedit.collect.artifact import read_collected
    from megedit.diffusion.artifact import load_generator
    from megedit.encoder.artifact import load_encoder
    from megedit.loading import load_lm
    from megedit.prepare.artifact import load_prepared
    from megedit.scoring import greedy_generate, greedy_match, teacher_forced

    out_dir = Path(args.diffusion_dir)
    manifest = read_manifest(out_dir, "diffusion")
    up = {k: Path(v["dir"]) for k, v in manifest["inputs"]["upstream"].items()}
    prepared = load_prepared(up["prepare"])
    collect_manifest, collected, _ = read_collected(up["collect"])
    check_lineage({"diffusion": manifest, "prepare": prepared.manifest, "collect": collect_manifest})
    spec = prepared.spec
    device = torch.device(args.device)
    gen = load_generator(out_dir, device=device)
    encoder = load_encoder(up["encoder"])

    n = min(args.queries, len(prepared.edits))
    order = torch.randperm(len(prepared.edits), generator=torch.Generator().manual_seed(args.seed))[:n].tolist()
    edits = [prepared.edits[i] for i in order]
    cond = encoder.embed([e.prompt for e in edits]).to(device)
    prompts = [spec.format_prompt(e.prompt, e.prompt_kind) for e in edits]
    targets = [e.target_new for e in edits]
    model, tokenizer = load_lm(spec)
    model.to(device)
    neuron = DynamicNeuron(model, spec)

    def reliability(weights) -> dict:
        tf = teacher_forced(model, tokenizer, neuron, prompts, targets, weights=weights)["token_acc"].mean()
        ag = greedy_match(model, tokenizer, neuron, prompts, targets, weights=weights).float().mean()
        return {"tf": round(float(tf), 4), "ag": round(float(ag), 4)}

    ref_weights = collected[order].to(device)
    baseline = {"collected": reliability(ref_weights)}
    batch_cond = cond[: args.batch].repeat((args.batch + len(cond) - 1) // len(cond), 1)[: args.batch]
    one = cond[:1]
    baseline["lm_greedy_20_tokens_per_query_s"] = _time(
        lambda: greedy_generate(model, tokenizer, neuron, prompts[:1], weights=ref_weights[:1], max_new_tokens=20),
        args.repeats)

    rows = []
    for sampler, tau, steps in itertools.product(args.samplers, args.noise_scales, args.steps):
        kw = dict(steps=steps, sampler=sampler, seed=args.seed, noise_scale=tau)
        per_query = _time(lambda: gen.sample(one, **kw), args.repeats)
        per_batch = _time(lambda: gen.sample(batch_cond, **kw),
                          max(1, args.repeats - 2 if steps >= 1000 else args.repeats))
        weights = gen.sample(cond, batch_size=args.batch, **kw)
        l2 = (weights - ref_weights).norm(dim=1)
        row = {"sampler": sampler, "noise_scale": tau, "steps": steps, "per_query_s": round(per_query, 5),
               f"per_batch{args.batch}_s": round(per_batch, 4),
               "per_query_in_batch_s": round(per_batch / args.batch, 5),
               "l2_mean": round(float(l2.mean()), 4), "l2_std": round(float(l2.std(unbiased=False)), 4),
               **reliability(weights)}
        row["share_of_query_time"] = round(per_query / (per_query + baseline["lm_greedy_20_tokens_per_query_s"]), 4)
        rows.append(row)
        print(json.dumps(row), flush=True)

    result = {"diffusion_dir": str(out_dir), "queries": n, "batch": args.batch, "device": str(device),
              "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
              "generator": {"preset": gen.preset.to_dict(), "parameters": sum(p.numel() for p in gen.net.parameters())},
              "baseline": baseline, "rows": rows}
    header = f"{'sampler':<10}{'noise':>6}{'steps':>6}{'s/query':>10}{'s/batch' + str(args.batch):>12}{'L2':>8}{'TF':>7}{'AG':>7}"
    print("\n" + header)
    for r in rows:
        print(f"{r['sampler']:<10}{r['noise_scale']:>6.2f}{r['steps']:>6}{r['per_query_s']:>10.4f}{r[f'per_batch{args.batch}_s']:>12.3f}"
              f"{r['l2_mean']:>8.3f}{r['tf']:>7.3f}{r['ag']:>7.3f}")
    print(f"{'collected':<22}{'':>22}{'':>8}{baseline['collected']['tf']:>7.3f}{baseline['collected']['ag']:>7.3f}")
    print(f"LM greedy answer (20 tokens): {baseline['lm_greedy_20_tokens_per_query_s']:.3f} s/query")
    out = Path(args.out) if args.out else Path(__file__).resolve().parent / "results" / "sampler.json"
    atomic_write_json(out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
