"""Where generated neurons fall short, and what a sampling-time knob buys: greedy exact match of the
neuron generated from a query's embedding, on the query, against the collected neuron of its edit.

    python bench/generated_neurons.py --run runs/smollm2-counterfact-1024 [--value-scales 1 1.25 1.5 2] [--steps 10 50]

Two item sets, scored the same way:
* ``pseudo``: the collect stage's pseudo edits (records that are never edited; the generator learnt
  their neurons from their prompts) asked through their prompts and their paraphrases. A knob is
  chosen here, never on the evaluation data.
* ``eval`` (``--eval``): a seeded sample of the run's edits, prompts (Reliability) and evaluation
  paraphrases (Generality), to confirm what ``pseudo`` says.

Knobs: DDIM steps, and ``value_scale`` (the generated neuron's value vector times a factor: a mode-seeking
sample of an under-fit generator is pulled toward the mean neuron, so its output is too weak to flip the
answer). The collected neuron at scale 1 is the reference (what retrieval would attach). Prints a table,
writes JSON (default ``bench/results/generated_neurons-<run>.json``).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from neuron_recipe import rate  # the rate with its n and 95% Wilson interval


def items(prepared, collect_dir: Path, n_eval: int, seed: int, with_eval: bool) -> dict[str, dict]:
    """``{set: {"texts", "kinds", "targets", "rows", "groups", "neurons"}}``: each query, its edit's collected
    neuron, and whether it is the edit's own prompt or a paraphrase."""
    from megedit.collect.artifact import load_pseudo_neurons, load_collected

    out = {}
    got = load_pseudo_neurons(collect_dir)
    if got is not None:
        ids, weights, success = got
        by_id = {r.id: r for r in prepared.pseudo_edits}
        recs = [(by_id[i], weights[k]) for k, i in enumerate(ids) if success[k]]
        out["pseudo"] = _expand(recs)
    if with_eval:
        weights, success, _ = load_collected(collect_dir)
        order = torch.randperm(len(prepared.edits), generator=torch.Generator().manual_seed(seed)).tolist()
        recs = [(prepared.edits[i], weights[i]) for i in order if success[i]][:n_eval]
        out["eval"] = _expand(recs)
    return out


def _expand(recs) -> dict:
    texts, kinds, targets, groups, neurons = [], [], [], [], []
    for rec, w in recs:
        for group, text in [("prompt", rec.prompt), *(("paraphrase", p) for p in rec.paraphrases)]:
            texts.append(text)
            kinds.append(rec.prompt_kind)
            targets.append(rec.target_new)
            groups.append(group)
            neurons.append(w)
    return {"texts": texts, "kinds": kinds, "targets": targets, "groups": groups, "neurons": torch.stack(neurons),
            "n_records": len(recs)}


GROUPS = ("prompt", "paraphrase")  # which text of its record a query is


def rates(ok: torch.Tensor, groups: list[str]) -> dict:
    return {g: rate([bool(o) for o, x in zip(ok, groups) if x == g]) for g in GROUPS}


def _hm(row: dict) -> float:
    p, q = row["prompt"]["rate"], row["paraphrase"]["rate"]
    return 2 * p * q / (p + q) if p + q > 0 else 0.0


@dataclass
class Run:
    """A trained run as its benches read it: the diffusion manifest and the upstream folders it names, the
    prepared data, the LM with a dynamic neuron, the encoder and the generator."""
    manifest: dict
    upstream: dict[str, Path]
    prepared: object
    lm: object
    tokenizer: object
    neuron: object
    encoder: object
    generator: object


def load_run(run_dir: Path) -> Run:
    """Everything a run's bench needs, found from its diffusion manifest (upstream folders may lie elsewhere,
    e.g. an experiment run that links the base run's stages)."""
    from megedit.artifacts import read_manifest
    from megedit.components.neuron import DynamicNeuron
    from megedit.diffusion.artifact import load_generator
    from megedit.encoder.artifact import load_encoder
    from megedit.loading import load_lm
    from megedit.prepare.artifact import load_prepared

    manifest = read_manifest(run_dir / "diffusion", "diffusion")
    up = {k: Path(v["dir"]) for k, v in manifest["inputs"]["upstream"].items()}
    prepared = load_prepared(up["prepare"])
    lm, tok = load_lm(prepared.spec)
    return Run(manifest, up, prepared, lm, tok, DynamicNeuron(lm, prepared.spec), load_encoder(up["encoder"]),
               load_generator(run_dir / "diffusion"))


def score_set(run: Run, s: dict, steps_list: list[int], value_scales: list[float], seed: int) -> list[dict]:
    """Rates of the collected neurons (the reference), then of the generated ones at each step count and scale."""
    from megedit.components.neuron import scale_value
    from megedit.scoring import greedy_match

    spec = run.prepared.spec
    prompts = [spec.format_prompt(t, k) for t, k in zip(s["texts"], s["kinds"])]
    cond = run.encoder.embed(s["texts"])

    def scored(weights) -> dict:
        return rates(greedy_match(run.lm, run.tokenizer, run.neuron, prompts, s["targets"], weights), s["groups"])

    rows = [{"neuron": "collected", "steps": None, "value_scale": 1.0, **scored(s["neurons"])}]
    for steps in steps_list:
        generated = run.generator.sample(cond, steps=steps, seed=seed)
        for factor in value_scales:
            rows.append({"neuron": "generated", "steps": steps, "value_scale": factor,
                         **scored(scale_value(generated, spec, factor))})
    return rows


def print_table(title: str, rows: list[dict], columns: dict[str, Callable[[dict], object]]) -> None:
    """``rows`` as a Markdown table: the ``columns`` (header -> cell of a row), then the prompt and paraphrase
    rates with their 95% intervals."""
    heads = [*columns, "prompt", "paraphrase"]
    print(f"\n{title}\n| {' | '.join(heads)} |\n|{'---|' * len(heads)}")
    for r in rows:
        cells = [*(cell(r) for cell in columns.values()), *(f"{r[g]['rate']} {r[g]['ci95']}" for g in GROUPS)]
        print("| " + " | ".join(str(c) for c in cells) + " |", flush=True)


def write_result(result: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, type=Path, help="a run folder with collect/ and diffusion/")
    ap.add_argument("--value-scales", type=float, nargs="+", default=[1.0, 1.25, 1.5, 2.0])
    ap.add_argument("--steps", type=int, nargs="+", default=[50])
    ap.add_argument("--eval", action="store_true", help="also score a sample of the run's edits (confirmation only)")
    ap.add_argument("--n-eval", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from megedit.diffusion.generator import choose_value_scale

    run = load_run(args.run)
    sets = items(run.prepared, run.upstream["collect"], args.n_eval, args.seed, args.eval)
    result = {"run": str(args.run), "diffusion_manifest_created": run.manifest["created"], "sets": {}}
    for name, s in sets.items():
        t0 = time.time()
        rows = score_set(run, s, args.steps, args.value_scales, args.seed)
        table = [{"value_scale": r["value_scale"], "harmonic_mean": _hm(r)} for r in rows if r["steps"] == args.steps[0]]
        result["sets"][name] = {"n_records": s["n_records"], "seconds": round(time.time() - t0, 1), "rows": rows,
                                "stage_rule_picks": choose_value_scale(table) if table else None}
        print_table(f"{name} ({s['n_records']} records)", rows, {"neuron": lambda r: r["neuron"],
                                                                "steps": lambda r: r["steps"] or "-",
                                                                "value scale": lambda r: r["value_scale"]})
    write_result(result, args.out or Path("bench/results") / f"generated_neurons-{args.run.name}.json")
    return result


if __name__ == "__main__":
    main()
