"""Per-item results kept as they are scored, so a killed or extended run scores only what is new.

One append-only JSONL file per variant (``items/<variant>.jsonl``). Each row carries the ``fingerprint``
of everything that decides its result (the run, the benchmark's protocol, the variant's settings); a row
whose fingerprint differs from the current one is ignored, never reused, and rows are flushed per batch,
so a kill loses at most the batch in flight (a half-written last line is skipped on reading).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable


class ItemCache:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self._rows: dict[str, dict[tuple[str, str], dict]] = {}  # variant -> (fingerprint, item key) -> row

    def _path(self, variant: str) -> Path:
        return self.folder / f"{variant}.jsonl"

    def _load(self, variant: str) -> dict[tuple[str, str], dict]:
        if variant not in self._rows:
            rows = {}
            path = self._path(variant)
            if path.is_file():
                for line in path.read_text(encoding="utf-8").splitlines():
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:  # the line a kill cut short
                        continue
                    rows[(row["fingerprint"], row["key"])] = row
            self._rows[variant] = rows
        return self._rows[variant]

    def get(self, variant: str, fingerprint: str, key: str) -> dict | None:
        return self._load(variant).get((fingerprint, key))

    def add(self, variant: str, rows: Iterable[dict]) -> None:
        """Keep ``rows`` (each with ``fingerprint`` and ``key``) and append them to the variant's file."""
        rows = list(rows)
        if not rows:
            return
        known = self._load(variant)
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self._path(variant)
        cut_short = path.is_file() and path.stat().st_size and not path.read_bytes().endswith(b"\n")
        with open(path, "a", encoding="utf-8") as f:
            if cut_short:  # end the half-written line, so the first new row starts a line of its own
                f.write("\n")
            for row in rows:
                known[(row["fingerprint"], row["key"])] = row
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
