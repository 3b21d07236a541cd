"""Run versions on disk, and how a new one is written atomically.

``RUN/`` as the pipeline made it is version 0. ``megedit edits add`` and ``remove`` write version ``n`` as

    RUN/versions/<n>/
      version.json    {version, parent, kind, created, change, n_edits, n_removed, stages, seconds, ...}
      prepare/ familiarity/ collect/ diffusion/    a folder the change wrote, or a relative symlink to the
                                                   version that wrote it (``../3/prepare``, ``../../collect``)
      encoder         always a symlink to ``../../encoder``: no version retrains the encoder
      removed.json    the removed edits (``megedit.edits.removed``), when there are any

so a version folder reads like a run folder: ``EditedLM.load``, ``megedit ask`` and the evaluate stage take
it as they take ``RUN``. A version is built in ``RUN/versions/.staging-<n>/`` and renamed into place last;
``version.json`` is inside it before the rename, so a folder ``<n>`` is always complete, and a killed command
leaves only a staging folder, removed by the next writer, while the previous version goes on serving.
Writers take ``RUN/versions/.lock`` (one at a time); readers need no lock.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from megedit.artifacts import ArtifactError, atomic_write_json

VERSIONS = "versions"
RECORD = "version.json"
STAGING_PREFIX = ".staging-"
LOCK = ".lock"
# What a version holds: the served stages and the collected neurons the generator learnt from.
VERSION_STAGES = ("prepare", "encoder", "familiarity", "collect", "diffusion")


def now_utc() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def version_dirs(run: str | Path) -> dict[int, Path]:
    """``{n: folder}`` of the run's complete versions n >= 1 (staging folders are not versions)."""
    root = Path(run) / VERSIONS
    if not root.is_dir():
        return {}
    return {int(p.name): p for p in root.iterdir() if p.name.isdigit() and (p / RECORD).is_file()}


def latest_version(run: str | Path) -> int:
    return max(version_dirs(run), default=0)


def read_record(version_dir: str | Path) -> dict | None:
    """A version's ``version.json``, or None for version 0 (a run folder)."""
    path = Path(version_dir) / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def run_of(folder: str | Path) -> Path:
    """The run a folder belongs to: itself, or the run above ``RUN/versions/<n>``."""
    folder = Path(folder)
    return folder.parent.parent if read_record(folder) is not None else folder


def resolve_version(run: str | Path, version: int | None = None) -> tuple[Path, int]:
    """``(folder, n)`` of a run's version ``version`` (None: the latest complete one). ``run`` may also be a
    version folder itself, which then is the answer (asking it for another version is an error)."""
    run = Path(run)
    record = read_record(run)
    if record is not None:
        if version is not None and version != record["version"]:
            raise ArtifactError(f"{run} is version {record['version']} of {run_of(run)}; ask the run for version "
                                f"{version}")
        return run, int(record["version"])
    versions = version_dirs(run)
    n = max(versions, default=0) if version is None else int(version)
    if n == 0:
        return run, 0
    if n not in versions:
        known = ", ".join(str(v) for v in [0, *sorted(versions)])
        raise ArtifactError(f"{run}: no version {n} (versions: {known})")
    return versions[n], n


def stage_owner(version_dir: Path, stage: str) -> Path:
    """The folder that holds ``stage`` for a version: its own, or the one its symlink names (one level:
    a version always links to the folder that owns the files, never to another link)."""
    path = version_dir / stage
    if read_record(version_dir) is not None and path.is_symlink():
        return Path(os.path.normpath(version_dir / os.readlink(path)))
    return path


@dataclass
class Staging:
    """A version being written: ``dir`` becomes ``RUN/versions/<version>`` when the block ends cleanly."""

    run: Path
    version: int
    parent: int
    parent_dir: Path
    dir: Path

    def link(self, stage: str, owner: Path) -> None:
        """Reuse ``owner`` (a stage folder of an earlier version) as this version's ``stage``."""
        (self.dir / stage).symlink_to(os.path.relpath(owner, self.dir), target_is_directory=True)

    def link_unchanged(self, stages=VERSION_STAGES) -> None:
        """Link every stage of ``stages`` this version did not write to its parent's owner."""
        for stage in stages:
            if not (self.dir / stage).exists():
                self.link(stage, stage_owner(self.parent_dir, stage))


@contextlib.contextmanager
def run_lock(run: Path) -> Iterator[None]:
    """Exclusive writer lock of a run's versions; a second writer fails at once rather than waiting."""
    root = run / VERSIONS
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LOCK, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ArtifactError(f"{run}: another `megedit edits` command is writing a version; try again when it "
                                "has finished") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def writing_version(run: str | Path) -> Iterator[Staging]:
    """Stage the next version of ``run`` (whose parent is the latest complete one) and publish it atomically
    when the block ends; on an error (or a kill) the previous version stays the latest."""
    run = Path(run)
    if read_record(run) is not None:
        raise ArtifactError(f"{run} is a version folder; give its run, {run_of(run)}")
    if not (run / "prepare").is_dir():
        raise ArtifactError(f"{run}: not a run folder (no prepare/)")
    with run_lock(run):
        root = run / VERSIONS
        for stale in root.glob(f"{STAGING_PREFIX}*"):  # what a killed writer left; the lock says none is alive
            shutil.rmtree(stale, ignore_errors=True)
        parent = latest_version(run)
        parent_dir, _ = resolve_version(run, parent)
        staging = Staging(run, parent + 1, parent, parent_dir, root / f"{STAGING_PREFIX}{parent + 1}")
        staging.dir.mkdir()
        try:
            yield staging
            if not (staging.dir / RECORD).is_file():
                raise ArtifactError(f"{staging.dir}: the version was staged without its {RECORD}")
            os.rename(staging.dir, root / str(staging.version))
            fd = os.open(root, os.O_RDONLY)
            try:
                os.fsync(fd)  # the rename itself reaches the disk
            finally:
                os.close(fd)
        finally:
            if staging.dir.exists():
                shutil.rmtree(staging.dir, ignore_errors=True)


def write_record(staging: Staging, record: dict) -> dict:
    """``version.json`` of a staged version: ``record`` plus its number, parent and creation time."""
    full = {"version": staging.version, "parent": staging.parent, "created": now_utc(), **record}
    atomic_write_json(staging.dir / RECORD, full)
    return full
