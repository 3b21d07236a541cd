"""What the collect benches share: the per-edit options they take on the command line, and the LM they load.

The option defaults are the recipe their committed results were measured with (``bench/results/collect.json``,
``layer_sweep.json``: Adam lr 0.05, 50 steps, no stop margin), so that a re-run reproduces them; the
collect stage's own recipe is ``CollectOptions()`` (why it differs: docs/experiments.md#collection).
"""

from __future__ import annotations

import argparse

from megedit.collect.engine import CollectOptions
from megedit.components.neuron import DynamicNeuron
from megedit.loading import load_lm
from megedit.prepare.artifact import Prepared, load_prepared


def add_collect_options(ap: argparse.ArgumentParser, capacity: int) -> None:
    ap.add_argument("--lr", type=float, default=0.05, help="Adam learning rate, > 0")
    ap.add_argument("--max_steps", type=int, default=50, help="steps per edit, >= 1")
    ap.add_argument("--capacity", type=int, default=capacity, help="edits optimised side by side (speed only)")


def collect_options(args: argparse.Namespace) -> CollectOptions:
    # stop_margin 0: the neuron stops as soon as greedy decoding gives the target, as when these were measured
    return CollectOptions(lr=args.lr, max_steps=args.max_steps, capacity=args.capacity, stop_margin=0.0)


def prepared_lm(prepare_dir) -> tuple[Prepared, object, object, DynamicNeuron]:
    """The prepare artifact, its LM and tokenizer, and a dynamic neuron at the model's edit layer."""
    prepared = load_prepared(prepare_dir)
    lm, tokenizer = load_lm(prepared.spec)
    return prepared, lm, tokenizer, DynamicNeuron(lm, prepared.spec)
