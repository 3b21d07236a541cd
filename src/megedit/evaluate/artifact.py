"""The evaluate artifact, as the evaluate stage writes it and reports, benches and the general stage read it.

``<out_dir>/``
  ``results.json``        {lineage, metric_meta, results (per variant: the six metrics, Score, locality by
                          kind), timings_seconds, method_seconds, peers, skipped}
  ``results.md``, ``results.png``  the table and the bar chart of ``results.json`` (``megedit.evaluate.report``)
  ``per_example.jsonl``   one row per (variant, item): query, target, familiar, entropy, tf, ag, answer
  ``peers/``              the peers' edited weights (below)
  ``manifest.json``       stage "evaluate", upstream: the run's stages it read

A peer file ``<out_dir>/peers/<method>.safetensors`` holds only the tensors the method changed (FT, MEMIT,
AlphaEdit), by parameter name, with metadata ``method``, ``lineage_id`` (the run's, as in its manifests),
``n_edits``, ``options_id`` (the settings that made it) and ``account`` (what the method did, its seconds).
The evaluate stage reuses a file whose metadata all match instead of editing again (a killed evaluation
resumes without redoing its peers); the general stage scores the same weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megedit.artifacts import ArtifactError, atomic_path, sha256_json, write_summary_files

RESULTS = "results.json"
TABLE = "results.md"
CHART = "results.png"
PER_EXAMPLE = "per_example.jsonl"
OUTPUTS = [RESULTS, TABLE, CHART, PER_EXAMPLE]  # the manifest's (the peer files are a cache, not outputs)
PEERS_FOLDER = "peers"
# Where a run's evaluations live: `make peers` scores the peers in the first, `make all` MeG in the second.
EVALUATE_FOLDERS = ("evaluate-peers", "evaluate")


def write_results(out_dir: str | Path, summary: dict, rows: list[dict]) -> None:
    """``results.json``, ``per_example.jsonl`` and the report made from the summary (table and chart)."""
    from megedit.evaluate.report import bar_chart, results_table

    write_summary_files(out_dir, (RESULTS, PER_EXAMPLE, TABLE, CHART), summary, rows, results_table(summary),
                        lambda path: bar_chart(summary, path))


def results_file(path: str | Path) -> Path:
    """``results.json`` of an evaluate folder (or the file itself, given one)."""
    path = Path(path)
    return path / RESULTS if path.is_dir() else path


def read_results(path: str | Path) -> dict:
    """The summary an evaluate run wrote: ``path`` is its folder or its ``results.json``."""
    f = results_file(path)
    if not f.is_file():
        raise FileNotFoundError(f"{path}: no {RESULTS} (run the evaluate stage there first)")
    return json.loads(f.read_text())


def report_files(out_dir: str | Path) -> list[Path]:
    """The evaluate run's shareable files that exist: results.json, .md and .png."""
    return [p for p in (Path(out_dir) / name for name in (RESULTS, TABLE, CHART)) if p.is_file()]


def peers_dir(evaluate_dir: str | Path) -> Path:
    """Where an evaluate folder keeps the peers' edited weights (``<run>/evaluate/peers`` in a run)."""
    return Path(evaluate_dir) / PEERS_FOLDER


def peer_file(folder: str | Path, method: str) -> Path:
    return Path(folder) / f"{method}.safetensors"


def options_id(options: dict) -> str:
    return sha256_json(options)[:16]


def save_peer_weights(path: str | Path, method: str, weights: dict[str, torch.Tensor], lineage: dict,
                      n_edits: int, account: dict | None = None, options: dict | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {name: t.detach().cpu().contiguous() for name, t in weights.items()}
    meta = {"method": method, "lineage_id": sha256_json(lineage)[:16], "n_edits": str(n_edits),
            "options_id": options_id(options or {}), "account": json.dumps(account or {}, default=str)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def read_peer_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}, (f.metadata() or {})


def load_peer_weights(path: str | Path, method: str, lineage: dict, n_edits: int,
                      options: dict | None = None) -> dict[str, torch.Tensor]:
    """The tensors of a peer file, refused where it is another method's, another run's or another edit
    count's (and, where ``options`` are given, made with other settings)."""
    path = Path(path)
    tensors, meta = read_peer_file(path)
    expected = {"method": method, "lineage_id": sha256_json(lineage)[:16], "n_edits": str(n_edits)}
    if options is not None:
        expected["options_id"] = options_id(options)
    wrong = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
    if wrong:
        raise ArtifactError(f"{path}: not the {method} weights of this run's {n_edits} edits "
                            f"(metadata found vs expected: {wrong}); delete it or point elsewhere")
    if not tensors:
        raise ArtifactError(f"{path}: holds no tensors")
    return tensors


def peer_account(path: str | Path) -> dict:
    """What the method did when it made this file (its ``account``, with ``seconds``)."""
    return json.loads(read_peer_file(path)[1].get("account", "{}"))
