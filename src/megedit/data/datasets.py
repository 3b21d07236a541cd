"""Dataset presets (``configs/datasets/<name>.yaml``): which files, in which order, in which format."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megedit.data.readers import read_file
from megedit.data.records import EditRecord, ParaphraseGroup
from megedit.paths import CONFIG_DIR


@dataclass
class FileEntry:
    path: str  # relative to the data directory, or absolute
    format: str = "auto"  # or one of megedit.data.readers.FORMATS, to override detection
    on_invalid: str = "error"  # "drop": skip malformed records, each reported with its error


@dataclass
class DatasetConfig:
    name: str
    files: list[FileEntry]
    paraphrase_files: list[FileEntry] = field(default_factory=list)
    dedupe: str = "subject"  # duplicate policy (megedit.data.splits.DEDUPE_POLICIES): subject | atoms


def load_dataset_config(name_or_path: str, config_dir: Path = CONFIG_DIR) -> DatasetConfig:
    path = Path(name_or_path)
    if not path.suffix:
        path = config_dir / "datasets" / f"{name_or_path}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (config_dir / "datasets").glob("*.yaml"))
        raise FileNotFoundError(f"dataset {name_or_path!r}: no config {path}; known datasets: {', '.join(known)}")
    raw = yaml.safe_load(path.read_text())
    for key in ("name", "files"):
        if key not in raw:
            raise ValueError(f"{path}: field '{key}' is missing")
    from megedit.data.splits import DEDUPE_POLICIES

    dedupe = raw.get("dedupe", "subject")
    if dedupe not in DEDUPE_POLICIES:
        raise ValueError(f"{path}: field 'dedupe': expected one of {', '.join(DEDUPE_POLICIES)}, got {dedupe!r}")
    return DatasetConfig(name=raw["name"], files=[FileEntry(**f) for f in raw["files"]],
                         paraphrase_files=[FileEntry(**f) for f in raw.get("paraphrase_files") or []], dedupe=dedupe)


def read_dataset(cfg: DatasetConfig, data_dir: Path, invalid: dict | None = None
                 ) -> tuple[list[EditRecord], list[ParaphraseGroup], dict[str, Path]]:
    """All records and paraphrase groups of a preset, plus the resolved input files (for the manifest).

    Records dropped under ``on_invalid: drop`` land in ``invalid[file] = [(index, message), ...]``.
    """
    records, groups, files = [], [], {}
    invalid = {} if invalid is None else invalid
    for entry, sink in [(e, records) for e in cfg.files] + [(e, groups) for e in cfg.paraphrase_files]:
        path = Path(entry.path) if Path(entry.path).is_absolute() else data_dir / entry.path
        bad: list = []
        fmt, items = read_file(path, entry.format, display_name=entry.path, on_invalid=entry.on_invalid, invalid=bad)
        if bad:
            invalid[entry.path] = bad
        if sink is records and fmt == "paraphrase_groups":
            raise ValueError(f"{entry.path}: a paraphrase corpus is listed under 'files'; move it to 'paraphrase_files'")
        if sink is groups and fmt != "paraphrase_groups":
            raise ValueError(f"{entry.path}: listed under 'paraphrase_files' but reads as {fmt}")
        sink.extend(items)
        files[entry.path] = path
    return records, groups, files
