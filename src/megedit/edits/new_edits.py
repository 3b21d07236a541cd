"""Reading the edits to add, and the duplicate policy against the run's edits.

Files are read exactly as the prepare stage reads a benchmark (``megedit.data.readers.read_file``: the six
formats, detected per file, every field checked; docs/input-checks.md), so a bad record fails with the same
error naming the file, the record, the field and what was expected. The duplicate policy
(docs/incremental.md, "Duplicates") compares an edit's subject and prompt:

* same subject, prompt and new target as an edit of the run, or as an earlier record of the files:
  a duplicate, skipped and reported;
* same subject and prompt as an edit of the run, another target: refused (``DataFormatError`` naming both)
  unless ``replace``, which replaces the run's edit; a *removed* edit is always replaced (it comes back with
  the new target);
* same subject and prompt as an earlier record of the files, another target: refused (the files disagree);
* same subject, another prompt: a new fact about the subject, added. (prepare keeps one edit per subject
  because the benchmarks' splits do; an edit added by hand is a fact someone wants.)

An edit's id (``<file stem>:<case id or index>``) is what ``megedit edits remove`` takes, so a new id that
already names another edit of the run is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from megedit.artifacts import sha256_file
from megedit.data.readers import DataFormatError, read_file
from megedit.data.records import EditRecord


class EditsError(ValueError):
    """A request ``megedit edits`` cannot carry out (nothing to add, unknown edit ids, ...)."""


@dataclass
class AddPlan:
    new: list[EditRecord]  # to add, in file order
    replaced: dict[str, str] = field(default_factory=dict)  # run edit id -> id of the record replacing it
    duplicates: list[dict] = field(default_factory=list)  # {id, file, record, same_as, why}: skipped

    def summary(self) -> dict:
        return {"added": [r.id for r in self.new], "replaced": dict(self.replaced), "duplicates_skipped": self.duplicates,
                "added_without_paraphrase": sum(not r.paraphrases for r in self.new),
                "added_without_locality_prompt": sum(not r.locality for r in self.new)}


def read_new_edits(paths: Sequence[str | Path]) -> tuple[list[EditRecord], dict[str, dict]]:
    """Every record of ``paths`` (format auto-detected per file), and per file its format, record count and
    sha256. Raises ``DataFormatError`` on the first malformed record, as the prepare stage does."""
    if not paths:
        raise EditsError("no file of edits given")
    records, files = [], {}
    for path in paths:
        fmt, recs = read_file(path, "auto", display_name=str(path))
        if fmt == "paraphrase_groups":
            raise DataFormatError(path, "holds paraphrase groups (a corpus for the encoder), not edits")
        records += recs
        files[str(path)] = {"format": fmt, "records": len(recs), "sha256": sha256_file(path)}
    return records, files


def _key(rec: EditRecord) -> tuple[str, str]:
    return rec.subject, rec.prompt


def plan_additions(records: Iterable[EditRecord], run_edits: Sequence[EditRecord], removed: set[str],
                   replace: bool = False) -> AddPlan:
    """Apply the duplicate policy (module docstring) to ``records`` against the run's edits."""
    by_key = {_key(e): e for e in run_edits}
    run_ids = {e.id for e in run_edits}
    plan, seen, new_ids = AddPlan([]), {}, {}
    for rec in records:
        first = seen.get(_key(rec))
        if first is not None:
            if first.target_new != rec.target_new:
                raise DataFormatError(rec.source, f"same subject and prompt as record {first.index} ({first.id}) of "
                                      f"{first.source}, whose target is {first.target_new!r}: the files disagree",
                                      rec.index, rec.id, "target_new")
            plan.duplicates.append(_duplicate(rec, first.id, "repeats an earlier record of the files"))
            continue
        seen[_key(rec)] = rec
        old = by_key.get(_key(rec))
        if old is not None and old.id not in removed:
            if old.target_new == rec.target_new:
                plan.duplicates.append(_duplicate(rec, old.id, "already an edit of the run"))
                continue
            if not replace:
                raise DataFormatError(rec.source, f"the run already edits this subject and prompt, to "
                                      f"{old.target_new!r} (edit {old.id}); pass --replace to replace that edit, or "
                                      "remove it first", rec.index, rec.id, "target_new")
        if old is not None:
            plan.replaced[old.id] = rec.id
        if rec.id in new_ids:
            raise DataFormatError(rec.source, f"id {rec.id} is also the id of record {new_ids[rec.id].index} of "
                                  f"{new_ids[rec.id].source}; ids must be unique (give the records case ids, or "
                                  "rename a file)", rec.index, rec.id)
        if rec.id in run_ids and plan.replaced.get(rec.id) != rec.id:  # only the edit it replaces may share it
            raise DataFormatError(rec.source, f"id {rec.id} already names another edit of the run (edits remove "
                                  "takes ids, so they must be unique): give the record another case id, or rename "
                                  "the file", rec.index, rec.id)
        new_ids[rec.id] = rec
        plan.new.append(rec)
    if not plan.new:
        raise EditsError(f"nothing to add: all {len(plan.duplicates)} records are edits of the run already "
                         f"({', '.join(d['id'] for d in plan.duplicates[:5])}{' ...' if len(plan.duplicates) > 5 else ''})")
    return plan


def _duplicate(rec: EditRecord, same_as: str, why: str) -> dict:
    return {"id": rec.id, "file": rec.source, "record": rec.index, "same_as": same_as, "why": why}
