"""The collect artifact and its resumable shards.

``<out_dir>/``
  ``neurons.safetensors``  ``weights`` float32 [N, D] (row i = edit i of the prepare artifact's
                           edits.jsonl) and ``success`` uint8 [N] (greedy decoding reproduces the target)
  ``per_edit.jsonl``       {index, id, success, tf_success, steps, loss, min_margin, rank}
  ``pseudo_neurons.safetensors``  the transfer diagnostic's neurons: ``weights`` [M, D] and ``success`` [M]
                           of M pseudo edits (never edited), their ids in the metadata; the diffusion
                           stage learns them too and measures on their paraphrases how well generated
                           neurons generalise against collected ones (only when ``transfer_n`` > 0)
  ``report.json``          success rate, edits/s, wall time, peak memory, paraphrase-transfer diagnostic
  ``manifest.json``        stage "collect", lineage of the prepare run, upstream {"prepare": dir}
  ``shards/``              work files: one atomic safetensors file per finished shard of edits;
                           a restart skips every shard already there (deleted after the merge
                           unless ``keep_shards``)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, safe_open, save_file

from megedit.artifacts import ArtifactError, atomic_path, atomic_write_json, atomic_write_jsonl, read_manifest

FILES = {"neurons": "neurons.safetensors", "per_edit": "per_edit.jsonl", "report": "report.json"}
SHARD_DIR = "shards"
PSEUDO_FILE = "pseudo_neurons.safetensors"


def write_neurons(out_dir: Path, weights: torch.Tensor, success: torch.Tensor, records: list[dict]) -> None:
    """``neurons.safetensors`` (weights float32 [N, D], success uint8 [N]) and ``per_edit.jsonl``."""
    with atomic_path(Path(out_dir) / FILES["neurons"]) as tmp:
        save_file({"weights": weights.contiguous(), "success": success}, str(tmp))
    atomic_write_jsonl(Path(out_dir) / FILES["per_edit"], records)


def write_report(out_dir: Path, report: dict) -> None:
    atomic_write_json(Path(out_dir) / FILES["report"], report)


def written_outputs(out_dir: Path) -> list[str]:
    """The files the manifest lists: the fixed ones, and the pseudo neurons where the diagnostic saved them."""
    return list(FILES.values()) + ([PSEUDO_FILE] if (Path(out_dir) / PSEUDO_FILE).is_file() else [])


def remove_pseudo_neurons(out_dir: Path) -> None:
    (Path(out_dir) / PSEUDO_FILE).unlink(missing_ok=True)


def remove_shards(out_dir: Path) -> None:
    """Drop ``shards/``: the merged artifact holds every neuron now."""
    import shutil

    shutil.rmtree(Path(out_dir) / SHARD_DIR, ignore_errors=True)


def save_pseudo_neurons(out_dir: Path, ids: list[str], weights: torch.Tensor, success: torch.Tensor) -> None:
    with atomic_path(Path(out_dir) / PSEUDO_FILE) as tmp:
        save_file({"weights": weights.float().contiguous(), "success": success.to(torch.uint8)}, str(tmp),
                  metadata={"ids": json.dumps(ids)})


def load_pseudo_neurons(collect_dir: str | Path) -> tuple[list[str], torch.Tensor, torch.Tensor] | None:
    """``(pseudo edit ids, weights [M, D], success bool [M])`` of the transfer diagnostic, or None if absent."""
    path = Path(collect_dir) / PSEUDO_FILE
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        ids = json.loads((f.metadata() or {}).get("ids", "null") or "null")
        weights, success = f.get_tensor("weights"), f.get_tensor("success").bool()
    if not isinstance(ids, list) or len(ids) != weights.shape[0] or success.shape != (weights.shape[0],):
        raise ArtifactError(f"{path}: ids / weights / success do not line up")
    return ids, weights, success


def load_collected(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """``(weights float32 [N, D], success bool [N], manifest)``; checks the manifest and the shapes."""
    path = Path(path)
    manifest = read_manifest(path, stage="collect")
    tensors = load_file(str(path / FILES["neurons"]))
    for name in ("weights", "success"):
        if name not in tensors:
            raise ArtifactError(f"{path / FILES['neurons']}: tensor '{name}' is missing")
    weights, success = tensors["weights"], tensors["success"].bool()
    n, d = manifest["n_edits"], manifest["neuron_dim"]
    if tuple(weights.shape) != (n, d) or tuple(success.shape) != (n,):
        raise ArtifactError(f"{path}: weights {tuple(weights.shape)} / success {tuple(success.shape)} do not match "
                            f"the manifest's N={n}, D={d}")
    return weights, success, manifest


def read_collected(collect_dir: str | Path) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """``(manifest, weights [N, D] float32, success [N] bool)`` of a collect artifact, checked as a generator's
    training data: both tensors there, shapes that line up, every weight finite."""
    collect_dir = Path(collect_dir)
    manifest = read_manifest(collect_dir, stage="collect")
    path = collect_dir / FILES["neurons"]
    if not path.is_file():
        raise ArtifactError(f"{collect_dir}: no {FILES['neurons']}")
    tensors = load_file(str(path))
    for key in ("weights", "success"):
        if key not in tensors:
            raise ArtifactError(f"{path}: tensor '{key}' is missing (found {sorted(tensors)})")
    weights, success = tensors["weights"].float(), tensors["success"].bool()
    if weights.ndim != 2 or success.shape != (weights.shape[0],):
        raise ArtifactError(f"{path}: expected weights [N, D] and success [N], got {tuple(weights.shape)} and "
                            f"{tuple(success.shape)}")
    if not torch.isfinite(weights).all():
        bad = (~torch.isfinite(weights)).any(1).nonzero().flatten()[:5].tolist()
        raise ArtifactError(f"{path}: non-finite neuron weights (rows {bad} ...)")
    return manifest, weights, success


def training_rows(success: torch.Tensor, manifest: dict) -> torch.Tensor:
    """Indices of the rows a generator should learn from: all, or only the successful ones when the
    collect run was configured with ``drop_failed`` (the paper's choice)."""
    if manifest.get("config", {}).get("model", {}).get("drop_failed", True):
        return torch.nonzero(success.bool(), as_tuple=False).flatten()
    return torch.arange(success.shape[0])


def shard_path(out_dir: str | Path, shard: int) -> Path:
    return Path(out_dir) / SHARD_DIR / f"shard-{shard:05d}.safetensors"


def write_shard(out_dir: str | Path, shard: int, tensors: dict[str, torch.Tensor], records: list[dict],
                fingerprint: str) -> None:
    """One file per shard, written atomically: a killed run leaves whole shards or none."""
    path = shard_path(out_dir, shard)
    meta = {"fingerprint": fingerprint, "shard": str(shard), "records": json.dumps(records)}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)


def read_shard(out_dir: str | Path, shard: int, fingerprint: str) -> tuple[dict[str, torch.Tensor], list[dict]] | None:
    """The shard's tensors and records, or None when it was not written yet."""
    path = shard_path(out_dir, shard)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # a torn file cannot happen with atomic writes, but a foreign one can
        raise ArtifactError(f"{path}: unreadable shard ({exc}); delete it to recollect that shard") from None
    if meta.get("fingerprint") != fingerprint:
        raise ArtifactError(f"{path} was collected with another configuration or prepare artifact "
                            f"(fingerprint {meta.get('fingerprint')} != {fingerprint}); use a fresh --model.out_dir "
                            f"or delete {path.parent} to start over")
    return tensors, json.loads(meta["records"])


def read_report(collect_dir: str | Path) -> dict:
    """``report.json`` of a collect artifact (success rate, speed, the transfer diagnostic)."""
    return json.loads((Path(collect_dir) / FILES["report"]).read_text())
