"""The peers' edited weights (FT, MEMIT, AlphaEdit) for a run: read from a saved file where one exists,
else computed with the evaluate stage's own editors (``megedit.evaluate.peers.edit_all``) and saved.

A peer file is ``<method>.safetensors``: only the tensors the method changed, by parameter name, with
metadata ``method``, ``lineage_id`` (the run's, as in its manifests) and ``n_edits``. It is looked for in
``<run>/evaluate/peers/`` (where the evaluate stage can leave the weights it scored), then in this stage's
own ``peers/`` cache. Computing them edits the same records the evaluate stage edits (its ``limit``, FT
and statistics settings, read from its manifest when it has run; its code defaults otherwise), so the
general-ability numbers belong to the same edited models as the editing metrics.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Sequence

import torch

from megedit.artifacts import ArtifactError, atomic_path, sha256_json

PEER_OPTIONS = ("ft_epochs", "ft_lr", "ft_batch_size", "ft_target_reliability", "seed", "peer_stats_texts")


def peer_file(folder: str | Path, method: str) -> Path:
    return Path(folder) / f"{method}.safetensors"


def save_peer_weights(path: str | Path, method: str, weights: dict[str, torch.Tensor], lineage: dict,
                      n_edits: int, account: dict | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {name: t.detach().cpu().contiguous() for name, t in weights.items()}
    meta = {"method": method, "lineage_id": sha256_json(lineage)[:16], "n_edits": str(n_edits),
            "account": json.dumps(account or {}, default=str)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_peer_weights(path: str | Path, method: str, lineage: dict, n_edits: int) -> dict[str, torch.Tensor]:
    """The tensors of a peer file, refused where it is another method's, another run's or another edit count's."""
    from safetensors import safe_open

    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    expected = {"method": method, "lineage_id": sha256_json(lineage)[:16], "n_edits": str(n_edits)}
    wrong = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
    if wrong:
        raise ArtifactError(f"{path}: not the {method} weights of this run's {n_edits} edits "
                            f"(metadata found vs expected: {wrong}); delete it or point elsewhere")
    if not tensors:
        raise ArtifactError(f"{path}: holds no tensors")
    return tensors


def evaluate_options(run_dir: str | Path) -> tuple[dict, int | None]:
    """The evaluate stage's peer settings and edit ``limit``: from its manifest where it has run, else the
    code defaults of ``EvaluateModule`` / ``EvaluateDataModule``."""
    from megedit.evaluate.evaluate_datamodule import EvaluateDataModule
    from megedit.evaluate.evaluate_module import EvaluateModule

    defaults = {k: p.default for k, p in inspect.signature(EvaluateModule.__init__).parameters.items()}
    options = {k: defaults[k] for k in PEER_OPTIONS}
    limit = inspect.signature(EvaluateDataModule.__init__).parameters["limit"].default
    manifest = Path(run_dir) / "evaluate" / "manifest.json"
    if manifest.is_file():
        config = json.loads(manifest.read_text()).get("config", {})
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
