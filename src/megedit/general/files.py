"""Reading the shared benchmark files with errors that name the file, the record and the field.

Every benchmark reader goes through these, so a missing file says where the data was expected and a
malformed record says which one and what was wrong (``DataFormatError``, as the edit readers raise)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Iterator

from megedit.data.readers import DataFormatError

WHERE = "see ../shared/data/README.md, 'General-ability benchmarks', or set MEGEDIT_DATA_DIR / --data.data_dir"


def require_file(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: benchmark file not found ({WHERE})")
    return path


def read_jsonl(path: Path) -> Iterator[tuple[int, dict]]:
    """``(record number from 0, record)`` per non-empty line; a line that is no JSON object raises."""
    with open(require_file(path), encoding="utf-8") as f:
        n = 0
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(path, f"line {lineno} is not JSON ({exc.msg})", record=n) from None
            if not isinstance(record, dict):
                raise DataFormatError(path, f"line {lineno} is a {type(record).__name__}, not an object", record=n)
            yield n, record
            n += 1


def read_table(path: Path, columns: tuple[str, ...], delimiter: str = ",") -> Iterator[tuple[int, dict]]:
    """``(row number from 0, row)`` of a CSV/TSV file whose header must hold ``columns``."""
    with open(require_file(path), encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise DataFormatError(path, f"header {reader.fieldnames} lacks the columns {missing}")
        for n, row in enumerate(reader):
            if None in row or any(row[c] is None for c in columns):  # too many or too few cells
                raise DataFormatError(path, f"row has a different number of cells than the header "
                                            f"({len(reader.fieldnames)})", record=n)
            yield n, row


def text(path: Path, n: int, record: dict, field: str) -> str:
    """A required non-empty string field."""
    if field not in record:
        raise DataFormatError(path, "missing", record=n, field=field)
    value = record[field]
    if not isinstance(value, str) or not value.strip():
        got = "null" if value is None else f"{type(value).__name__} {value!r:.60}"
        raise DataFormatError(path, f"expected non-empty text, got {got}", record=n, field=field)
    return value


def one_of(path: Path, n: int, record: dict, field: str, allowed: dict):
    """A field whose value must be a key of ``allowed``; returns what it maps to."""
    value = record.get(field)
    if value not in allowed:
        raise DataFormatError(path, f"expected one of {list(allowed)}, got {value!r}", record=n, field=field)
    return allowed[value]
