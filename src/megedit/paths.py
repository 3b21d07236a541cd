"""Where megedit looks for data, caches converted models and keeps its shipped configs."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = Path(os.environ.get("MEGEDIT_CONFIG_DIR", REPO_ROOT / "configs"))


def cache_dir() -> Path:
    """Model conversions and weight hashes live here (``$MEGEDIT_CACHE``, default ``~/.cache/megedit``)."""
    path = Path(os.environ.get("MEGEDIT_CACHE", Path.home() / ".cache" / "megedit"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Resolve the benchmark data directory: the flag wins, then ``$MEGEDIT_DATA_DIR``, then ``../shared/data``."""
    candidates = [explicit, os.environ.get("MEGEDIT_DATA_DIR"), REPO_ROOT.parent / "shared" / "data"]
    for cand in candidates:
        if cand:
            path = Path(cand).expanduser()
            if not path.is_dir():
                raise FileNotFoundError(
                    f"data directory {path} does not exist; pass --data.data_dir or set MEGEDIT_DATA_DIR "
                    "(see README, 'Data', for the public sources)"
                )
            return path
    raise FileNotFoundError("no data directory: pass --data.data_dir or set MEGEDIT_DATA_DIR")
