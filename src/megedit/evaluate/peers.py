"""The peer editors evaluated beside MeG on the same items: FT, MEMIT and AlphaEdit.

Each writes all of a run's edits into the LM's weights at once. ``edit_weights`` returns the edited
parameters by name, what the method did (FT: the epochs it trained and whether it reached its reliability
target; MEMIT / AlphaEdit: their diagnostics) and its wall time, so the evaluate stage scores every peer the
same way: its weights swapped in (``swapped_weights``), no neuron and no router.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from megedit.baselines.alphaedit import alphaedit_weights
from megedit.baselines.ft import finetune_mlp, named_mlp_weights
from megedit.baselines.memit import EditTargets, edit_targets, memit_weights, requests_from_records
from megedit.registry import MemitSpec, RegistryError, load_model_spec

PEERS = ("ft", "memit", "alphaedit")


@dataclass
class PeerEdit:
    weights: dict[str, torch.Tensor]  # parameter name -> edited tensor
    account: dict  # what the method did, for results.json
    seconds: float


def check_variants(variants: Sequence[str], known: Sequence[str]) -> list[str]:
    """``variants`` as a list, refused (ValueError) when one is not ``known``."""
    unknown = set(variants) - set(known)
    if unknown:
        raise ValueError(f"unknown variants {sorted(unknown)}; choose from {list(known)}")
    return list(variants)


def edit_all(methods: Sequence[str], lm, tokenizer, spec, records: Sequence, **options) -> dict[str, PeerEdit]:
    """``edit_weights`` for each method. MEMIT and AlphaEdit share their target values ``z`` (the same
    optimisation, most of their cost), computed once; each method's ``seconds`` still counts it, as it would
    cost alone, and its account says how long the shared part took."""
    shared = None
    options.setdefault("hparams", memit_settings(spec))
    if "memit" in methods and "alphaedit" in methods:
        t0 = time.time()
        shared = edit_targets(lm, tokenizer, spec, requests_from_records(records, spec), hparams=options["hparams"],
                              progress=options.get("progress", True), weights_sha256=options.get("weights_sha256"))
        shared_seconds = round(time.time() - t0, 1)
    out = {}
    for method in methods:
        targets = shared if method in ("memit", "alphaedit") else None
        out[method] = edit_weights(method, lm, tokenizer, spec, records, targets=targets, **options)
        if targets is not None:
            out[method].seconds = round(out[method].seconds + shared_seconds, 1)
            out[method].account["shared_z_seconds"] = shared_seconds
    return out


def edit_weights(method: str, lm, tokenizer, spec, records: Sequence, *, ft_epochs: int, ft_lr: float,
                 ft_batch_size: int, ft_target_reliability: float | None, seed: int, data_dir=None,
                 weights_sha256: str | None = None, stats_overrides: dict | None = None,
                 targets: EditTargets | None = None, hparams: MemitSpec | None = None,
                 progress: bool = True) -> PeerEdit:
    """Edit ``lm`` (left unchanged) with ``method`` on ``records`` (prepare's ``EditRecord``s).
    ``stats_overrides`` replace fields of MEMIT / AlphaEdit's statistics options (``layer_stats.StatsOptions``);
    ``targets`` are MEMIT / AlphaEdit's precomputed target values for these records (``memit.edit_targets``);
    ``hparams`` their settings (default: ``memit_settings(spec)``)."""
    if method not in PEERS:
        raise ValueError(f"unknown peer method {method!r}; choose from {list(PEERS)}")
    t0 = time.time()
    # the evaluate stage's test loop runs under inference mode; every peer needs gradients
    with torch.inference_mode(False), torch.enable_grad():
        if method == "ft":
            res = finetune_mlp(lm, tokenizer, spec, [spec.format_prompt(r.prompt, r.prompt_kind) for r in records],
                               [r.target_new for r in records], epochs=ft_epochs, lr=ft_lr, batch_size=ft_batch_size,
                               seed=seed, target_reliability=ft_target_reliability, progress=progress)
            weights = named_mlp_weights(lm, spec, res["state"])
            account = {"trained": f"Adam on layer {spec.edit_layer}'s MLP", "lr": ft_lr, "epoch_budget": ft_epochs,
                       "target_reliability": ft_target_reliability, "epochs": res["epochs"],
                       "reached_target": res["reached"], "losses": res["losses"], "reliability": res["reliability"]}
        else:
            editor = memit_weights if method == "memit" else alphaedit_weights
            hparams = hparams or memit_settings(spec)
            res = editor(lm, tokenizer, spec, requests_from_records(records, spec), hparams=hparams, data_dir=data_dir,
                         weights_sha256=weights_sha256, stats_overrides=stats_overrides, targets=targets,
                         progress=progress)
            weights, account = res.weights, _compact(res.diagnostics) | {"settings": hparams.to_dict()}
    return PeerEdit(weights={k: v.detach() for k, v in weights.items()}, account=account,
                    seconds=round(time.time() - t0, 1))


def memit_settings(spec) -> MemitSpec:
    """MEMIT / AlphaEdit settings: the model's registry file as it is now (they are the evaluate stage's, not
    the run's; a run prepared before the ``memit:`` sections existed records none), else the run's spec."""
    try:
        current = load_model_spec(spec.name).memit
    except RegistryError:
        current = None
    if current is None and spec.memit is None:
        raise ValueError(f"model {spec.name}: no MEMIT settings; add a 'memit:' section to "
                         f"configs/models/{spec.name}.yaml (docs/baselines.md)")
    return current or spec.memit


def _compact(diagnostics: dict) -> dict:
    """MEMIT / AlphaEdit diagnostics with each per-edit list (z_nll, z_steps, delta_ratio) as its mean."""
    out = {}
    for key, value in diagnostics.items():
        if isinstance(value, list) and len(value) > 16 and all(isinstance(v, (int, float)) for v in value):
            out[f"{key}_mean"] = round(sum(value) / len(value), 4)
        else:
            out[key] = value
    return out
