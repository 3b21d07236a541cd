"""Paraphrase-transfer diagnostic for neuron-collection options, on pseudo-edits only.

For each variant, collect one neuron per sampled pseudo-edit (records that are never edited, so
the evaluation paraphrases stay untouched), then apply each neuron to its own record's
paraphrases: how often does greedy decoding still give the target? MeG's Generality is capped
by this, because the generator reproduces the neuron of the nearest edit.

    python bench/transfer.py --prepare_dir runs/smollm2-counterfact-1024/prepare --n 32 \
        --variants prompt_only prefixes4 margin3
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from collect_bench import add_collect_options, collect_options, prepared_lm

from megedit.artifacts import atomic_write_json
from megedit.collect.engine import generate_prefixes
from megedit.collect.transfer import measure_transfer, sample_pseudo

# name -> (CollectOptions overrides, number of LM-sampled context prefixes)
VARIANTS = {
    "prompt_only": ({}, 0),
    "prefixes2": ({}, 2),
    "prefixes4": ({}, 4),
    "margin3": ({"stop_margin": 3.0}, 0),
    "key_mean": ({"key_init": "mean"}, 0),
    "key_subject": ({"key_init": "subject"}, 0),
    "prefixes4_margin3": ({"stop_margin": 3.0}, 4),
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prepare_dir", required=True)
    ap.add_argument("--n", type=int, default=32, help="pseudo-edits to sample")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", nargs="+", default=["prompt_only", "prefixes4", "margin3"], choices=list(VARIANTS))
    add_collect_options(ap, capacity=32)
    ap.add_argument("--out", default="bench/results/transfer.json")
    args = ap.parse_args(argv)

    prepared, lm, tok, neuron = prepared_lm(args.prepare_dir)
    spec = prepared.spec
    records = sample_pseudo(prepared.pseudo_edits, args.n, args.seed)
    base = collect_options(args)
    out = {"model": spec.name, "edit_layer": spec.edit_layer, "n_pseudo_edits": len(records), "variants": {}}
    for name in args.variants:
        overrides, k = VARIANTS[name]
        prefixes = generate_prefixes(lm, tok, k, 10, 0)
        out["variants"][name] = measure_transfer(lm, tok, spec, neuron, records, base, prefixes, **overrides)
        print(f"{name:20s} {json.dumps(out['variants'][name])}", flush=True)
        atomic_write_json(Path(args.out), out)  # after each variant: partial results survive
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
