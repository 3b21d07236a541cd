"""A killed prepare resumes: each batch's pre-edit answers are appended to a log as soon as they exist.

``<out_dir>/answers/rank-<r>.jsonl`` holds a header line (what the answers depend on: the model's weights,
tokenizer, precision, device, answer length, batch size and library versions) and then one line per batch,
``{"texts": [...], "answers": [[token ids], ...]}``, ASCII JSON, flushed and fsynced, so a kill loses at most the
batch being written (a torn last line is ignored). A restart reads every rank's log with the same header and
reuses a batch only when its texts, in order, are a logged batch's: the same batch gives the same answers, so
the artifact is the one an uninterrupted run writes. Each rank moves its own log with another header to
``<out_dir>/answers.stale-<time>/`` (kept, never deleted). The prepare module deletes ``answers/`` once its
manifest is written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

LOG_DIR = "answers"
_LOG_NAME = re.compile(r"rank-\d+\.jsonl")


def _row(line: bytes) -> dict | None:
    try:
        row = json.loads(line.decode("ascii"))
    except ValueError:  # a torn line (UnicodeDecodeError is a ValueError too)
        return None
    return row if isinstance(row, dict) else None


class AnswerLog:
    """The batches already answered (``answers_for``) and an ``append`` for new ones, for one rank."""

    def __init__(self, out_dir: str | Path, header: dict, rank: int = 0):
        self.out = Path(out_dir)
        self.dir = self.out / LOG_DIR
        self.header = {"header": header}
        self.path = self.dir / f"rank-{rank}.jsonl"
        self.batches: dict[tuple[str, ...], list[list[int]]] = {}
        logs = sorted(p for p in self.dir.iterdir() if _LOG_NAME.fullmatch(p.name)) if self.dir.is_dir() else []
        for path in logs:
            self._read(path)

    @property
    def n_answers(self) -> int:
        return sum(len(texts) for texts in self.batches)

    def answers_for(self, texts: list[str]) -> list[list[int]] | None:
        """The logged answers of exactly this batch (same texts, same order), else None."""
        return self.batches.get(tuple(texts))

    def _read(self, path: Path) -> None:
        try:
            lines = path.read_bytes().split(b"\n")
        except FileNotFoundError:  # another rank moved its stale log away meanwhile
            return
        if _row(lines[0]) != self.header:
            if path == self.path:  # each rank moves only its own log: no two ranks rename one file
                self._move_aside(path)
            return
        for line in lines[1:]:
            row = _row(line)
            if row is not None and isinstance(row.get("texts"), list) and isinstance(row.get("answers"), list):
                self.batches[tuple(row["texts"])] = row["answers"]

    def _move_aside(self, path: Path) -> None:
        base = self.out / f"{LOG_DIR}.stale-{time.strftime('%Y%m%d-%H%M%S')}"
        stale, n = base, 1
        while (stale / path.name).exists():
            stale, n = base.with_name(f"{base.name}-{n}"), n + 1
        stale.mkdir(parents=True, exist_ok=True)
        path.rename(stale / path.name)
        print(f"prepare: {path} holds answers of another model or setting: moved to {stale}")

    def append(self, texts: list[str], answers: list[list[int]]) -> None:
        """Log one batch's answers durably (a kill right after this call keeps them)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.path, "ab+") as f:
            if f.tell() == 0:
                f.write(json.dumps(self.header).encode("ascii") + b"\n")
            else:  # a torn last line (a kill mid-write) must not swallow the next one
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write(json.dumps({"texts": texts, "answers": answers}).encode("ascii") + b"\n")
            f.flush()
            os.fsync(f.fileno())
        self.batches[tuple(texts)] = answers

    def remove(self) -> None:
        """Drop the log: the artifact holds every answer now (stale logs beside it are kept)."""
        shutil.rmtree(self.dir, ignore_errors=True)
