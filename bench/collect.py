"""Benchmark: naive one-edit-at-a-time neuron collection vs the batched collect engine, same edits, same run.

Naive = what one writes first: for each edit, its own Adam, a full forward of the whole LM over
the whole sequence (all logits) per step, early stop on the same teacher-forced test.
Batched = ``megedit.collect.engine`` (lower layers cached, LM head at target positions only,
``capacity`` edits side by side with per-row Adam and refill).
Both start from the same initial neuron and are verified with real greedy decoding.

    python bench/collect.py --prepare_dir runs/smollm2-counterfact-1024/prepare --n 64
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from collect_bench import add_collect_options, collect_options, prepared_lm

from megedit.artifacts import atomic_write_json
from megedit.collect.engine import CollectItem, CollectOptions, NeuronCollector, collect
from megedit.scoring import greedy_match, target_batch


class PeakRSS:
    """Peak resident memory while the block runs (sampled), in MiB."""

    def __enter__(self):
        self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    @staticmethod
    def _rss() -> float:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _poll(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())


def passes(logits: torch.Tensor, labels: torch.Tensor, margin: float) -> bool:
    """The engine's stopping test: every target token is the argmax, by more than ``margin`` logits if > 0."""
    target = logits.gather(1, labels[:, None])[:, 0]
    runner_up = logits.scatter(1, labels[:, None], float("-inf")).max(1).values
    return bool((target - runner_up > margin).all()) if margin > 0 else bool((logits.argmax(-1) == labels).all())


def naive_collect(model, tokenizer, spec, neuron, items, opts: CollectOptions):
    """One edit at a time, full forward, torch Adam: the baseline."""
    # The same starting neuron as the engine (last prompt token's MLP input / |.|^2, value 0).
    inits = NeuronCollector(model, tokenizer, spec, opts, neuron=neuron).initial_weights(items)
    results = []
    for it, init in zip(items, inits):
        batch = target_batch(tokenizer, it.views, [it.target] * len(it.views))
        w = init.clone()[None].requires_grad_(True)
        adam = torch.optim.Adam([w], lr=opts.lr, betas=opts.betas, eps=opts.eps)
        labels = batch["input_ids"][:, 1:]
        tmask = batch["target_mask"][:, 1:]
        success, steps = False, 0
        while True:
            with neuron.attached(w):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               position_ids=batch["position_ids"], use_cache=False).logits[:, :-1]
            nll = F.cross_entropy(logits[tmask], labels[tmask])
            success = passes(logits[tmask], labels[tmask], opts.stop_margin)
            if success or steps >= opts.max_steps:
                break
            adam.zero_grad()
            nll.backward()
            adam.step()
            steps += 1
        results.append((w.detach()[0].clone(), success, steps))
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepare_dir", required=True)
    ap.add_argument("--n", type=int, default=64, help="edits (the first n of the prepare artifact)")
    add_collect_options(ap, capacity=64)
    ap.add_argument("--recipe", choices=("bench", "stage"), default="bench",
                    help="bench: the options above (the committed collect.json); stage: the collect stage's own "
                         "CollectOptions() (lr 0.2, <= 100 steps, stop margin 3), --capacity kept")
    ap.add_argument("--out", default="bench/results/collect.json")
    args = ap.parse_args(argv)

    prepared, model, tok, neuron = prepared_lm(args.prepare_dir)
    spec = prepared.spec
    edits = prepared.edits[: args.n]
    items = [CollectItem(i, [spec.format_prompt(e.prompt, e.prompt_kind)], e.target_new) for i, e in enumerate(edits)]
    prompts, targets = [it.views[0] for it in items], [it.target for it in items]
    opts = collect_options(args) if args.recipe == "bench" else CollectOptions(capacity=args.capacity)
    torch.set_num_threads(torch.get_num_threads())

    rows, load_before = {}, list(os.getloadavg())
    for name in ("batched", "naive"):
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            if name == "naive":
                out = naive_collect(model, tok, spec, neuron, items, opts)
                W = torch.stack([w for w, _, _ in out])
                tf_ok = torch.tensor([s for _, s, _ in out])
                steps = [k for _, _, k in out]
            else:
                res = collect(model, tok, spec, items, opts, neuron=neuron)
                W = torch.stack([r.weights for r in res])
                tf_ok = torch.tensor([r.success for r in res])
                steps = [r.steps for r in res]
            seconds = time.perf_counter() - t0
        verified = greedy_match(model, tok, neuron, prompts, targets, W, batch_size=64) & tf_ok
        rows[name] = {"seconds": round(seconds, 2), "edits_per_second": round(len(items) / seconds, 3),
                      "success_rate": round(float(verified.float().mean()), 4),
                      "steps_mean": round(sum(steps) / len(steps), 2), "peak_rss_mib": round(mem.peak, 1)}
        print(f"{name:8s} {rows[name]}", flush=True)
    ratio = rows["batched"]["edits_per_second"] / rows["naive"]["edits_per_second"]
    result = {"command": "python bench/collect.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "model": spec.name, "edit_layer": spec.edit_layer, "n_edits": len(items), "recipe": args.recipe,
              "capacity": opts.capacity, "lr": opts.lr, "max_steps": opts.max_steps, "stop_margin": opts.stop_margin,
              "threads": torch.get_num_threads(), "load_average_before": load_before,
              "load_average_after": list(os.getloadavg()),
              "naive": rows["naive"], "batched": rows["batched"], "speedup": round(ratio, 2)}
    print(f"speedup (edits/s batched / naive): {ratio:.2f}x")
    atomic_write_json(Path(args.out), result)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
