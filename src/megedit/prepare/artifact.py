"""The prepare artifact, as every later stage reads it."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megedit.artifacts import atomic_write_json, atomic_write_jsonl, read_jsonl, read_manifest
from megedit.data.records import EditRecord

FILES = {
    "edits": "edits.jsonl",  # EditRecord + pre_edit answers {prompt, paraphrases[], locality[]} + base_correct
    "pseudo_edits": "pseudo_edits.jsonl",  # EditRecords not edited, with paraphrases (subject-disjoint)
    "pseudo_pairs": "pseudo_pairs.jsonl",  # {anchor, positive, group, source}: encoder training pairs
    "pseudo_irrelevant": "pseudo_irrelevant.jsonl",  # {id, subject, prompt, prompt_kind, source}
    "report": "report.json",  # drop counts per file, split counts, timings
}


@dataclass
class Prepared:
    dir: Path
    manifest: dict
    edits: list[EditRecord]
    pre_edit: list[dict]
    pseudo_edits: list[EditRecord]
    pseudo_pairs: list[dict]
    pseudo_irrelevant: list[dict]

    @property
    def lineage(self) -> dict:
        return self.manifest["lineage"]

    @property
    def spec(self):
        """The model spec the run was prepared with (stages after prepare never re-read the registry)."""
        from megedit.registry import spec_from_dict

        return spec_from_dict(self.manifest["model_spec"], where=f"{self.dir}/manifest.json")


def write_prepared(out_dir: str | Path, rows: list[dict], splits, report: dict) -> list[str]:
    """Every file but the manifest: the edits (``rows``, with their pre-edit answers), the split's pseudo data
    and the report; returns their names for the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(out / FILES["edits"], rows)
    atomic_write_jsonl(out / FILES["pseudo_edits"], [r.to_dict() for r in splits.pseudo_edits])
    atomic_write_jsonl(out / FILES["pseudo_pairs"], splits.pseudo_pairs)
    atomic_write_jsonl(out / FILES["pseudo_irrelevant"], splits.pseudo_irrelevant)
    atomic_write_json(out / FILES["report"], report)
    return list(FILES.values())


def load_prepared(path: str | Path) -> Prepared:
    path = Path(path)
    manifest = read_manifest(path, stage="prepare")
    rows = read_jsonl(path / FILES["edits"])
    pre = [r.pop("pre_edit") for r in rows]
    for r in rows:
        r.pop("base_correct", None)
    return Prepared(
        dir=path, manifest=manifest, edits=[EditRecord.from_dict(r) for r in rows], pre_edit=pre,
        pseudo_edits=[EditRecord.from_dict(r) for r in read_jsonl(path / FILES["pseudo_edits"])],
        pseudo_pairs=read_jsonl(path / FILES["pseudo_pairs"]),
        pseudo_irrelevant=read_jsonl(path / FILES["pseudo_irrelevant"]),
    )


def read_report(path: str | Path) -> dict:
    """``report.json`` of a prepare artifact (drop counts, split counts, timings)."""
    return json.loads((Path(path) / FILES["report"]).read_text())
