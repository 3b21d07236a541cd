"""A killed prepare resumes: each batch's pre-edit answers are appended to a log as soon as they exist.

``<out_dir>/answers/rank-<r>.jsonl`` holds a header line (what the answers depend on: the model's weights,
the answer length, the batch size) and then one line per batch, ``{"answers": {prompt text: token ids}}``,
flushed and fsynced, so a kill loses at most the batch being written (a torn last line is ignored). A restart
reads every rank's log with the same header and generates only the batches with a prompt it does not hold; a
log with another header is moved aside (``rank-<r>.stale-<time>.jsonl``), never deleted. The prepare module
deletes the folder once its manifest is written.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

LOG_DIR = "answers"


def _row(line: str) -> dict | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row if isinstance(row, dict) else None


class AnswerLog:
    """The answers already generated (``known``) and an ``append`` for new ones, for one rank."""

    def __init__(self, out_dir: str | Path, header: dict, rank: int = 0):
        self.dir = Path(out_dir) / LOG_DIR
        self.header = {"header": header}
        self.path = self.dir / f"rank-{rank}.jsonl"
        self.known: dict[str, list[int]] = {}
        for path in sorted(self.dir.glob("rank-*.jsonl")) if self.dir.is_dir() else []:
            self._read(path, move_if_stale=path == self.path)  # each rank moves only its own log: no races

    def _read(self, path: Path, move_if_stale: bool) -> None:
        lines = path.read_text(encoding="utf-8").splitlines()
        if not lines or _row(lines[0]) != self.header:
            if move_if_stale:
                stale = path.with_name(f"{path.stem}.stale-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
                path.rename(stale)
                print(f"prepare: {path} holds answers of another model or setting: moved to {stale}")
            return
        for line in lines[1:]:
            row = _row(line)
            if row is not None and isinstance(row.get("answers"), dict):
                self.known.update(row["answers"])

    def append(self, answers: dict[str, list[int]]) -> None:
        """Log one batch's answers durably (a kill right after this call keeps them)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.is_file() or self.path.stat().st_size == 0
        with open(self.path, "a+", encoding="utf-8") as f:
            if fresh:
                f.write(json.dumps(self.header) + "\n")
            else:  # a torn last line (a kill mid-write) must not swallow the next one
                f.seek(f.tell() - 1)
                if f.read(1) != "\n":
                    f.write("\n")
            f.write(json.dumps({"answers": answers}, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.known.update(answers)

    def remove(self) -> None:
        """Drop the log: the artifact holds every answer now."""
        shutil.rmtree(self.dir, ignore_errors=True)
