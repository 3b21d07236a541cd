"""Stage outputs: atomic writes, manifests with input hashes, and refusal of mismatched inputs.

Every stage writes its files through ``atomic_*`` (temp file in the same folder, then
``os.replace``), then a ``manifest.json`` recording the run's *lineage* (model, weights hash,
dataset, N, seed), its config, the sha256 of every input and output, and the manifests of
the upstream stages it read. A later stage calls ``read_manifest`` (which re-hashes the
outputs) and ``check_lineage`` so that it never mixes artifacts of different runs.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator

import megedit

MANIFEST = "manifest.json"
_stage_started: float | None = None  # set by the stage CLI, so a manifest knows what its stage cost


def mark_stage_start() -> None:
    """Start the clock of the stage this process runs (``write_manifest`` records what it has cost since)."""
    global _stage_started
    import time

    _stage_started = time.time()


def _process_start() -> float:
    """When this process started (epoch seconds), from /proc; now where /proc is missing."""
    import time

    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, ValueError, IndexError):
        return time.time()


def stage_resources() -> dict:
    """What the stage has cost so far: wall and CPU seconds since it started (the process's start when no
    stage was marked), the process's peak resident memory, its torch threads, and the machine's load."""
    import resource
    import sys
    import time

    started = _stage_started if _stage_started is not None else _process_start()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    torch = sys.modules.get("torch")
    return {"wall_seconds": round(time.time() - started, 1),
            "cpu_seconds_process": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_mib_process": round(usage.ru_maxrss / 1024, 1),  # ru_maxrss is in KiB on Linux
            "torch_threads": torch.get_num_threads() if torch is not None else None,
            "cpu_count": os.cpu_count(), "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()]}


class ArtifactError(RuntimeError):
    """An input artifact is missing, incomplete, corrupted or from another run."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling path (file or folder); it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.unlink(tmp)  # callers create a file or a folder there themselves
    tmp = Path(tmp)
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def atomic_write_jsonl(path: str | Path, rows) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_summary_files(out_dir: str | Path, names: tuple[str, str, str, str], summary: dict, rows: list[dict],
                        table: str, chart) -> None:
    """A scoring stage's results (evaluate, general), each file atomically: ``names`` are those of the summary
    (JSON), its rows (JSONL, one per scored item), its table (Markdown, ``table``) and its chart (drawn by
    ``chart(path)``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary_name, rows_name, table_name, chart_name = names
    atomic_write_json(out / summary_name, summary)
    atomic_write_jsonl(out / rows_name, rows)
    atomic_write_text(out / table_name, table)
    chart(out / chart_name)


def read_jsonl(path: str | Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ArtifactError(f"{path}: invalid JSON at line {lineno}, column {exc.colno}: {exc.msg}") from None
    return rows


def write_manifest(out_dir: str | Path, stage: str, lineage: dict, config: dict, outputs: list[str],
                   input_files: dict[str, str | Path] | None = None,
                   upstream: dict[str, str | Path] | None = None, extra: dict | None = None) -> dict:
    """Write ``manifest.json`` last, so its presence means the stage finished. It also records what the
    stage cost (``resources``: wall seconds since the stage started, the process's CPU seconds and peak
    memory, the machine's load), read by ``bench/pipeline.py``; under DDP these are rank 0's."""
    out_dir = Path(out_dir)
    manifest = {
        "stage": stage,
        "megedit_version": megedit.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "lineage": lineage,
        "lineage_id": sha256_json(lineage)[:16],
        "config": config,
        "inputs": {
            "files": {str(k): {"path": str(v), "sha256": sha256_file(v)} for k, v in (input_files or {}).items()},
            "upstream": {name: {"dir": str(d), "manifest_sha256": sha256_file(Path(d) / MANIFEST)}
                         for name, d in (upstream or {}).items()},
        },
        "outputs": {name: sha256_file(out_dir / name) for name in outputs},
        "resources": stage_resources(),
    }
    if extra:
        manifest.update(extra)
    atomic_write_json(out_dir / MANIFEST, manifest)
    return manifest


def read_manifest(artifact_dir: str | Path, stage: str | None = None, verify: bool = True) -> dict:
    """Load an upstream manifest; check its stage and that its outputs are the files it hashed."""
    artifact_dir = Path(artifact_dir)
    path = artifact_dir / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{artifact_dir}: no {MANIFEST}; the stage that writes it has not finished there")
    manifest = json.loads(path.read_text())
    if stage and manifest.get("stage") != stage:
        raise ArtifactError(f"{path}: expected a '{stage}' artifact, found stage {manifest.get('stage')!r}")
    if verify:
        for name, digest in manifest.get("outputs", {}).items():
            file = artifact_dir / name
            if not file.is_file():
                raise ArtifactError(f"{artifact_dir}: output {name} listed in the manifest is missing")
            if sha256_file(file) != digest:
                raise ArtifactError(f"{artifact_dir}: output {name} does not match its sha256 in the manifest "
                                    "(changed after the stage wrote it?)")
    return manifest


def finished_manifest(artifact_dir: str | Path) -> dict | None:
    """The manifest of a finished stage as written (not re-hashed: for what it records, such as its config or
    resources), or None where the stage has not finished there."""
    path = Path(artifact_dir) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def check_lineage(manifests: dict[str, dict]) -> dict:
    """All inputs of a stage must come from the same run (model, weights, dataset, N, seed)."""
    items = list(manifests.items())
    name0, ref = items[0]
    for name, m in items[1:]:
        if m["lineage"] != ref["lineage"]:
            diff = {k: (ref["lineage"].get(k), m["lineage"].get(k))
                    for k in set(ref["lineage"]) | set(m["lineage"]) if ref["lineage"].get(k) != m["lineage"].get(k)}
            raise ArtifactError(f"inputs '{name0}' and '{name}' come from different runs: {diff}")
    return ref["lineage"]


ANCESTORS = "ancestors"  # manifest key: sha256 of the manifests of the earlier versions an artifact extends


def check_upstream(manifest: dict, name: str, upstream_dir: str | Path, where: str,
                   accept_ancestors: bool = False) -> None:
    """``manifest`` was built from the ``name`` artifact: refuse a different ``upstream_dir``.

    With ``accept_ancestors`` an artifact built from an earlier version of ``upstream_dir`` passes too: a
    run version's prepare artifact (``megedit edits add``) lists the manifests it extends under
    ``ancestors``, and the encoder, which learns only from pseudo data that a version never adds to, stays
    valid for every later version of its prepare artifact.
    """
    recorded = manifest.get("inputs", {}).get("upstream", {}).get(name)
    if recorded is None:
        raise ArtifactError(f"{where}: its manifest records no '{name}' input")
    path = Path(upstream_dir) / MANIFEST
    actual = sha256_file(path)
    if accept_ancestors and recorded["manifest_sha256"] != actual and path.is_file():
        if recorded["manifest_sha256"] in json.loads(path.read_text()).get(ANCESTORS, []):
            return
    if recorded["manifest_sha256"] != actual:
        raise ArtifactError(f"{where} was built from the '{name}' artifact at {recorded['dir']}, not from "
                            f"{upstream_dir} (manifest hashes differ); re-run it or point at the matching run")


def git_commit(short: bool = True) -> str | None:
    """The commit of the checkout megedit runs from (benchmarks record it beside their numbers); None outside a
    git checkout (an installed wheel) or without git."""
    cmd = ["git", "rev-parse", *(["--short"] if short else []), "HEAD"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None
