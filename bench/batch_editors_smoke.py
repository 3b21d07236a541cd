"""Smoke test of the MEMIT / AlphaEdit baselines on a real model: do N CounterFact edits take?

Edits the first N records of the EasyEdit CounterFact edit split at once and reports, before and after,
teacher-forced exact match of `` {target_new}`` on the edit prompts (Reliability) and their paraphrases
(Generality), and how many locality prompts keep their pre-edit greedy answer (Locality, first
``--loc-tokens`` tokens). The E[kkᵀ] statistics use a small token budget (``--tokens``) and go to
``--cache`` (a scratch folder by default, so a smoke budget never sits in $MEGEDIT_CACHE).

    OMP_NUM_THREADS=1 .venv/bin/python bench/batch_editors_smoke.py --method memit --n 8 --set mom2_weight=1000
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import torch
import yaml

from megedit.baselines.alphaedit import alphaedit_weights
from megedit.baselines.layer_stats import key_second_moments, options_from_spec
from megedit.baselines.memit import memit_weights, requests_from_records, swapped_weights
from megedit.data.readers import read_file
from megedit.loading import load_lm
from megedit.paths import data_dir
from megedit.registry import load_model_spec, memit_spec_from_dict
from megedit.scoring import greedy_tokens, teacher_forced


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--method", choices=["memit", "alphaedit"], default="memit")
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=20000, help="statistics token budget")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="override fields of the model's memit section, e.g. context_prefixes=0 mom2_weight=1000")
    ap.add_argument("--loc-tokens", type=int, default=3)
    ap.add_argument("--cache", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    spec = load_model_spec(args.model)
    raw = {**spec.memit.to_dict(), **{k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in args.set)}}
    hp = memit_spec_from_dict(raw, spec.num_layers, spec.mlp, where="--set")
    lm, tok = load_lm(spec)
    _, records = read_file(data_dir(args.data_dir) / "counterfact/easyedit/counterfact-edit.json")
    records = records[: args.n]
    requests = requests_from_records(records, spec)
    fmt = lambda text, kind: spec.format_prompt(text, kind)  # noqa: E731
    prompts = [r.prompt for r in requests]
    targets = [r.target for r in requests]
    para = [(fmt(p, r.prompt_kind), r.target_new) for r in records for p in r.paraphrases]
    loc = [fmt(p.prompt, p.kind) for r in records for p in r.locality]

    def measure():
        rel = teacher_forced(lm, tok, None, prompts, targets)["exact"].float().mean().item()
        gen = (teacher_forced(lm, tok, None, [p for p, _ in para], [t for _, t in para])["exact"].float().mean().item()
               if para else None)
        return rel, gen

    t0 = time.time()
    pre_loc = greedy_tokens(lm, tok, None, loc, None, args.loc_tokens, 16) if loc else []
    before = measure()
    cache = args.cache or tempfile.mkdtemp(prefix="megedit-stats-")
    t1 = time.time()
    stats = key_second_moments(lm, tok, spec, hp.layers, options_from_spec(hp, max_tokens=args.tokens),
                               data_dir=args.data_dir, cache_root=cache)
    t_stats = time.time() - t1
    edit = memit_weights if args.method == "memit" else alphaedit_weights
    t2 = time.time()
    res = edit(lm, tok, spec, requests, hparams=hp, stats=stats)
    t_edit = time.time() - t2
    with swapped_weights(lm, res.weights):
        after = measure()
        loc_kept = (sum(a == b for a, b in zip(pre_loc, greedy_tokens(lm, tok, None, loc, None, args.loc_tokens, 16)))
                    / len(loc) if loc else None)
    d = res.diagnostics
    report = {
        "model": spec.name, "method": args.method, "n_edits": len(requests), "layers": list(hp.layers),
        "memit": {k: v for k, v in hp.to_dict().items() if k != "layers" and not k.startswith("mom2_n")},
        "stats_tokens": stats.manifests[hp.layers[0]]["result"]["tokens"], "stats_s": round(t_stats, 1),
        "edit_s": round(t_edit, 1), "total_s": round(time.time() - t0, 1),
        "rel_tf_exact": {"before": before[0], "after": after[0]},
        "gen_tf_exact": {"before": before[1], "after": after[1], "n": len(para)},
        "loc_greedy_kept": loc_kept, "n_loc": len(loc),
        "z_prob_mean": sum(torch.exp(-torch.tensor(d["z_nll"])).tolist()) / len(requests),
        "z_steps": d["z_steps"], "delta_ratio": [round(x, 3) for x in d["delta_ratio"]],
        "subject_not_found": d["subject_not_found"], "z_error_after": d["z_error_after"],
        "per_layer": d["per_layer"], "null_space_dim": d.get("null_space_dim"),
        "prefixes": d["context_prefixes"],
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
