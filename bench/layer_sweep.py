"""Which layer should get the dynamic neuron? Collection success, steps, speed and paraphrase transfer per layer.

Runs on pseudo-edits of a prepare artifact (never the evaluation paraphrases), with the collect benches'
recipe (bench/collect_options.py), once per layer. MeG (App. A.4) finds reliability varies strongly with the layer.

    python bench/layer_sweep.py --prepare_dir runs/smollm2-counterfact-1024/prepare --layers 3 6 9 12 15 18 21 24 27
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from collect_bench import add_collect_options, collect_options

from megedit.artifacts import atomic_write_json
from megedit.collect.engine import generate_prefixes
from megedit.collect.transfer import measure_transfer, sample_pseudo
from megedit.components.neuron import DynamicNeuron
from megedit.loading import load_lm
from megedit.prepare.artifact import load_prepared


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepare_dir", required=True)
    ap.add_argument("--layers", type=int, nargs="+", required=True)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n_prefixes", type=int, default=0)
    add_collect_options(ap, capacity=32)
    ap.add_argument("--out", default="bench/results/layer_sweep.json")
    args = ap.parse_args(argv)

    prepared = load_prepared(args.prepare_dir)
    lm, tok = load_lm(prepared.spec)
    records = sample_pseudo(prepared.pseudo_edits, args.n, args.seed)
    prefixes = generate_prefixes(lm, tok, args.n_prefixes, 10, 0)
    base = collect_options(args)
    out = {"model": prepared.spec.name, "n_pseudo_edits": len(records), "n_prefixes": args.n_prefixes, "layers": {}}
    print(f"{'layer':>5} {'success':>8} {'steps':>6} {'edits/s':>8} {'transfer':>9} {'tok_acc':>8}")
    for layer in args.layers:
        spec = dataclasses.replace(prepared.spec, edit_layer=layer)
        neuron = DynamicNeuron(lm, spec)
        try:
            row = measure_transfer(lm, tok, spec, neuron, records, base, prefixes)
        finally:
            neuron.remove()
        row["edits_per_second"] = round(len(records) / max(row["collect_seconds"], 1e-9), 3)
        out["layers"][layer] = row
        print(f"{layer:>5} {row['prompt_success']:>8.3f} {row['steps_mean']:>6.1f} {row['edits_per_second']:>8.3f} "
              f"{row['paraphrase_exact']:>9.3f} {row['paraphrase_token_acc']:>8.3f}", flush=True)
        atomic_write_json(Path(args.out), out)
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
