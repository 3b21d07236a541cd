"""Removed edits: ``removed.json`` of a run version, which ``EditedLM`` honours.

A removed edit stays in the version's files (its prompt, neuron, router label and generator training rows):
only the answer path changes. ``EditedLM`` refuses to route to it (docs/incremental.md, "Removal"): a query
the router calls familiar whose most similar edit prompt (encoder cosine, over every edit) is a removed edit
runs on the unedited LM. Keeping the edit's prompt is what catches its paraphrases too: the router and the
generator still know them, and it is the nearest-edit test that sends them away.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from megedit.artifacts import ArtifactError, atomic_write_json

REMOVED = "removed.json"
FORMAT = "megedit-removed/1"


@dataclass(frozen=True)
class Removal:
    id: str  # the edit's id (``prepare/edits.jsonl``)
    removed_at: str  # UTC, ISO 8601
    version: int  # the version that removed it
    reason: str | None = None


def read_removed(version_dir: str | Path) -> list[Removal]:
    """The removals recorded in a version folder (none for a run folder or a version without the file)."""
    path = Path(version_dir) / REMOVED
    if not path.is_file():
        return []
    raw = json.loads(path.read_text())
    if raw.get("format") != FORMAT or not isinstance(raw.get("removed"), list):
        raise ArtifactError(f"{path}: expected {{'format': '{FORMAT}', 'removed': [...]}}")
    try:
        return [Removal(**r) for r in raw["removed"]]
    except TypeError as exc:
        raise ArtifactError(f"{path}: a removal record is malformed ({exc})") from None


def write_removed(folder: str | Path, removals: list[Removal]) -> None:
    atomic_write_json(Path(folder) / REMOVED, {"format": FORMAT, "removed": [asdict(r) for r in removals]})
