"""The peers' edited weights (FT, MEMIT, AlphaEdit) for a run: read from a saved file where one exists,
else computed with the evaluate stage's own editors (``megedit.evaluate.peers.edit_all``) and saved.

A peer file (``megedit.evaluate.artifact``) is ``<method>.safetensors``. It is looked for in
``<run>/evaluate-peers/peers/`` and ``<run>/evaluate/peers/`` (where the evaluate stage leaves the weights it
scored: ``make peers``, or an evaluate run with the peers), then in this stage's
own ``peers/`` cache. Computing them edits the same records the evaluate stage edits (its ``limit``, FT
and statistics settings, read from its manifest when it has run; its code defaults otherwise), so the
general-ability numbers belong to the same edited models as the editing metrics.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Sequence

import torch

from megedit.artifacts import finished_manifest
from megedit.evaluate.artifact import EVALUATE_FOLDERS, load_peer_weights, peer_file, save_peer_weights

PEER_OPTIONS = ("ft_epochs", "ft_lr", "ft_batch_size", "ft_target_reliability", "seed", "peer_stats_texts")


def evaluate_options(run_dir: str | Path) -> tuple[dict, int | None]:
    """The evaluate stage's peer settings and edit ``limit``: from the manifest of ``evaluate-peers/`` or else
    ``evaluate/`` where one has run, else the
    code defaults of ``EvaluateModule`` / ``EvaluateDataModule``."""
    from megedit.evaluate.evaluate_datamodule import EvaluateDataModule
    from megedit.evaluate.evaluate_module import EvaluateModule

    defaults = {k: p.default for k, p in inspect.signature(EvaluateModule.__init__).parameters.items()}
    options = {k: defaults[k] for k in PEER_OPTIONS}
    limit = inspect.signature(EvaluateDataModule.__init__).parameters["limit"].default
    manifest = next((m for f in EVALUATE_FOLDERS if (m := finished_manifest(Path(run_dir) / f)) is not None), None)
    if manifest is not None:
        config = manifest.get("config", {})
        options |= {k: v for k, v in config.get("model", {}).items() if k in PEER_OPTIONS}
        limit = config.get("data", {}).get("limit", limit)
    return options, limit


def compute_peer_weights(methods: Sequence[str], edited, run_dir: str | Path) -> dict:
    """``{method: PeerEdit}`` for ``methods`` on the run's edits, as the evaluate stage would edit them."""
    from megedit.evaluate.peers import edit_all

    options, limit = evaluate_options(run_dir)
    records = edited.prepared.edits[:limit] if limit else edited.prepared.edits
    stats_texts = options.pop("peer_stats_texts")
    return edit_all(list(methods), edited.lm, edited.tokenizer, edited.spec, records,
                    weights_sha256=edited.prepared.lineage.get("model_weights_sha256"),
                    stats_overrides={"n_texts": stats_texts} if stats_texts else None, progress=True, **options)


def peer_weights(methods: Sequence[str], edited, run_dir: str | Path, search: Sequence[str | Path],
                 cache_dir: str | Path) -> dict[str, tuple[dict[str, torch.Tensor], Path]]:
    """``{method: (weights, the file they came from)}``: each method's file from the first folder of
    ``search`` that has one; the rest computed at once (MEMIT and AlphaEdit share their targets) and saved
    into ``cache_dir``."""
    lineage = edited.prepared.lineage
    n_edits = _n_edits(edited, run_dir)
    found: dict[str, tuple[dict, Path]] = {}
    for method in methods:
        for folder in search:
            path = peer_file(folder, method)
            if path.is_file():
                found[method] = (load_peer_weights(path, method, lineage, n_edits), path)
                print(f"general: {method} weights from {path}")
                break
    missing = [m for m in methods if m not in found]
    if missing:
        print(f"general: computing the {', '.join(missing)} edits of {n_edits} edits (no saved weights in "
              f"{[str(s) for s in search]})")
        for method, edit in compute_peer_weights(missing, edited, run_dir).items():
            path = peer_file(cache_dir, method)
            save_peer_weights(path, method, edit.weights, lineage, n_edits, edit.account | {"seconds": edit.seconds})
            found[method] = (edit.weights, path)
    return {m: found[m] for m in methods}


def _n_edits(edited, run_dir) -> int:
    _, limit = evaluate_options(run_dir)
    n = len(edited.prepared.edits)
    return min(n, limit) if limit else n
