"""Does a neuron need its generated key? Greedy exact match when the key is taken from the query itself.

    python bench/query_key.py --run runs/smollm2-zsre-1024 [--eval]

A collected neuron's key starts as the edit prompt's own MLP input at its last token (``h / |h|^2``, so it
fires with pre-activation 1 there) and moves a few optimiser steps. A paraphrase's last-token input differs,
so the edit prompt's key fires on it less. This bench replaces a neuron's key by the *query's* own direction,
``k = a * h_q / |h_q|^2`` (pre-activation ``a`` at the query's last token), and keeps its value:

* ``collected``: the edit's collected neuron, as retrieval attaches it (reference);
* ``collected value, query key``: ``a`` = the collected key's pre-activation on its own edit prompt;
* ``generated``: the generator's neuron at the run's value scale (what MeG attaches);
* ``generated value, query key``: ``a`` = the generated key's pre-activation on the query;
* ``collected key, generated value`` and ``generated key, collected value``: which half the generator
  gets wrong.

Sets: the collect stage's pseudo edits (never evaluated; prompts and paraphrases) and with ``--eval`` a
seeded sample of the run's edits (confirmation only). Prints a table, writes JSON
(default ``bench/results/query_key-<run>.json``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from generated_neurons import items, load_run, print_table, rates, write_result
from neuron_recipe import rate  # noqa: F401  (rates() reports n and a 95% interval through it)


@torch.no_grad()
def last_token_inputs(lm, tok, spec, prompts: list[str], batch_size: int = 32) -> torch.Tensor:
    """The edit layer's MLP input at each prompt's last token ``[N, d]`` (left padding: position -1)."""
    from megedit.loading import edit_mlp
    from megedit.scoring import left_pad, positions_from_mask

    mlp, got = edit_mlp(lm, spec), []
    handle = mlp.register_forward_pre_hook(lambda _m, args: got.append(args[0][:, -1].float()))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    try:
        for i in range(0, len(prompts), batch_size):
            ids, mask = left_pad([tok(p)["input_ids"] for p in prompts[i:i + batch_size]], pad)
            lm(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=False)
    finally:
        handle.remove()
    return torch.cat(got)


def with_query_key(neurons: torch.Tensor, h_query: torch.Tensor, pre_activation: torch.Tensor, spec) -> torch.Tensor:
    """The neurons with key ``a * h / |h|^2`` (``a`` per row), value and bias kept."""
    from megedit.components.neuron import join_neuron, split_neuron

    _, bias, value = split_neuron(neurons, spec)
    key = h_query * (pre_activation / h_query.pow(2).sum(-1).clamp_min(1e-12))[:, None]
    return join_neuron(key, value, bias, spec)


def swap_value(keys_from: torch.Tensor, values_from: torch.Tensor, spec) -> torch.Tensor:
    """Key (and bias) of ``keys_from``, value of ``values_from``."""
    from megedit.components.neuron import join_neuron, split_neuron

    key, bias, _ = split_neuron(keys_from, spec)
    return join_neuron(key, split_neuron(values_from, spec)[2], bias, spec)


def variants_of(run, s: dict, prompts: list[str], steps: int, seed: int) -> tuple[dict, dict]:
    """The neurons each row of the table scores on set ``s``, and the mean pre-activations of the query keys."""
    from megedit.components.neuron import scale_value, split_neuron

    spec, gen = run.prepared.spec, run.generator
    h_query = last_token_inputs(run.lm, run.tokenizer, spec, prompts)
    own = [i for i, g in enumerate(s["groups"]) if g == "prompt"]
    # each row's edit prompt: rows of one record are contiguous, its prompt first
    owner = torch.tensor([max(j for j in own if j <= i) for i in range(len(prompts))])
    a_collected = (h_query[owner] * split_neuron(s["neurons"], spec)[0]).sum(-1)
    generated = scale_value(gen.sample(run.encoder.embed(s["texts"]), steps=steps, seed=seed), spec, gen.value_scale)
    a_generated = (h_query * split_neuron(generated, spec)[0]).sum(-1)
    variants = {"collected": s["neurons"],
                "collected value, query key": with_query_key(s["neurons"], h_query, a_collected, spec),
                "generated": generated,
                "generated value, query key": with_query_key(generated, h_query, a_generated, spec),
                # which half does the generator get wrong? swap one half for the collected one
                "collected key, generated value": swap_value(s["neurons"], generated, spec),
                "generated key, collected value": swap_value(generated, s["neurons"], spec)}
    return variants, {"collected_mean": round(float(a_collected.mean()), 3),
                      "generated_mean": round(float(a_generated.mean()), 3)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, type=Path)
    ap.add_argument("--eval", action="store_true")
    ap.add_argument("--n-eval", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from megedit.scoring import greedy_match

    run = load_run(args.run)
    spec = run.prepared.spec
    result = {"run": str(args.run), "value_scale": run.generator.value_scale, "steps": args.steps, "sets": {}}
    for name, s in items(run.prepared, run.upstream["collect"], args.n_eval, args.seed, args.eval).items():
        t0 = time.time()
        prompts = [spec.format_prompt(t, k) for t, k in zip(s["texts"], s["kinds"])]
        variants, pre_activation = variants_of(run, s, prompts, args.steps, args.seed)
        rows = [{"neuron": label, **rates(greedy_match(run.lm, run.tokenizer, run.neuron, prompts, s["targets"],
                                                       weights), s["groups"])}
                for label, weights in variants.items()]
        result["sets"][name] = {"n_records": s["n_records"], "seconds": round(time.time() - t0, 1), "rows": rows,
                                "pre_activation": pre_activation}
        print_table(f"{name} ({s['n_records']} records)", rows, {"neuron": lambda r: r["neuron"]})
    write_result(result, args.out or Path("bench/results") / f"query_key-{args.run.name}.json")
    return result


if __name__ == "__main__":
    main()
