"""Generator training speed against torch's intra-op thread count (the diffusion stage's ``torch_threads``).

    python bench/generator_threads.py [--threads 1 2] [--hidden 128 256] [--steps 200]

One denoiser training step as the diffusion stage takes it (DiT forward on a batch of noised neurons, MSE,
backward, AdamW) on random tensors of SmolLM2's shapes: a 1728-value neuron (gate and up keys, down value)
and MiniLM's 384-d condition, batch 32. The ``dit-cpu`` preset at each ``--hidden`` (128 is the preset's;
256 is ``EXP=wide-generator-800``). Each row: milliseconds per step (mean of ``--steps`` after 20 warm-up
steps), in one process per setting so every thread count starts from a fresh pool, and the ratio to the
first thread count at the same width. Run it on a quiet machine: the JSON records the load average.
Writes ``bench/results/generator-threads.json`` and a Markdown table next to it, and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from megedit.artifacts import atomic_write_json, atomic_write_text, git_commit

NEURON_DIM, COND_DIM, BATCH = 1728, 384, 32


def time_steps(threads: int, hidden: int, steps: int) -> dict:
    """Run in a child process: the thread pool's size is fixed by the first parallel op."""
    import time

    import torch

    from megedit.components.dit import build_denoiser, resolve_preset

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_denoiser(resolve_preset("dit-cpu", hidden=hidden), NEURON_DIM, COND_DIM)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    x, cond = torch.randn(BATCH, NEURON_DIM), torch.randn(BATCH, COND_DIM)

    def step():
        t = torch.randint(0, 1000, (BATCH,))
        loss = (model(x, t, cond) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(20):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    ms = (time.perf_counter() - start) / steps * 1000
    return {"threads": threads, "hidden": hidden, "parameters": sum(p.numel() for p in model.parameters()),
            "ms_per_step": round(ms, 2)}




def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--hidden", type=int, nargs="+", default=[128, 256])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--out", default="bench/results/generator-threads.json")
    ap.add_argument("--child", nargs=3, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(time_steps(*args.child)))
        return
    load_before = os.getloadavg()
    rows = []
    for hidden in args.hidden:
        for threads in args.threads:
            out = subprocess.run([sys.executable, __file__, "--child", str(threads), str(hidden), str(args.steps)],
                                 check=True, capture_output=True, text=True).stdout
            row = json.loads(out.strip().splitlines()[-1])
            first = next((r for r in rows if r["hidden"] == hidden), row)
            row["time_ratio"] = round(row["ms_per_step"] / first["ms_per_step"], 3)
            rows.append(row)
    command = "python bench/generator_threads.py " + " ".join(sys.argv[1:])
    machine = {"utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
               "platform": platform.platform(), "cpus": os.cpu_count(),
               "load_average_before": [round(v, 2) for v in load_before],
               "load_average_after": [round(v, 2) for v in os.getloadavg()]}
    table = ["| hidden | parameters | threads | ms / step | time vs first thread count |", "|---|---|---|---|---|"]
    table += [f"| {r['hidden']} | {r['parameters'] / 1e6:.2f} M | {r['threads']} | {r['ms_per_step']:.1f} | "
              f"{r['time_ratio']:.2f} |" for r in rows]
    text = (f"# Generator training step against torch threads\n\nCommand: `{command.strip()}`. Batch {BATCH}, "
            f"neuron {NEURON_DIM}, condition {COND_DIM}, mean of {args.steps} steps after 20 warm-up steps. "
            f"Machine: {machine}.\n\n" + "\n".join(table) + "\n")
    atomic_write_json(Path(args.out), {"command": command.strip(), "steps": args.steps, "batch": BATCH,
                                       "rows": rows, "machine": machine})
    atomic_write_text(Path(args.out).with_suffix(".md"), text)
    print(text)


if __name__ == "__main__":
    main()
