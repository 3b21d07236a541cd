"""``megedit edits remove``: a new run version in which some edits answer as before editing.

Nothing is retrained and no file of the parent is copied: the version links every stage folder of its parent
and adds the edits to its ``removed.json`` (``megedit.edits.removed``), which ``EditedLM`` honours from the
moment the version is published. Removing an edit that is removed already is reported and skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from megedit.artifacts import read_jsonl
from megedit.edits.new_edits import EditsError
from megedit.edits.removed import Removal, read_removed, write_removed
from megedit.edits.versions import now_utc, stage_owner, write_record, writing_version
from megedit.prepare.artifact import FILES


def remove_edits(run: str | Path, ids: Sequence[str], reason: str | None = None) -> dict:
    """Write the next version of ``run`` with ``ids`` removed; returns its ``version.json``."""
    if not ids:
        raise EditsError("no edit id given")
    with writing_version(run) as staging:
        edits = [row["id"] for row in read_jsonl(stage_owner(staging.parent_dir, "prepare") / FILES["edits"])]
        known = set(edits)
        unknown = [i for i in dict.fromkeys(ids) if i not in known]
        if unknown:
            raise EditsError(f"{run}: no edit with id {', '.join(unknown[:5])}{' ...' if len(unknown) > 5 else ''} in "
                             f"version {staging.parent} (ids look like {', '.join(edits[:3])}; "
                             "prepare/edits.jsonl lists them)")
        removals = read_removed(staging.parent_dir)
        already = {r.id for r in removals}
        fresh = [i for i in dict.fromkeys(ids) if i not in already]
        if not fresh:
            raise EditsError(f"{run}: every edit given is removed already (version {staging.parent})")
        when = now_utc()
        removals += [Removal(i, when, staging.version, reason) for i in fresh]
        staging.link_unchanged()
        write_removed(staging.dir, removals)
        record = write_record(staging, {
            "kind": "remove", "change": {"removed": fresh, "already_removed": [i for i in ids if i in already],
                                         "reason": reason},
            "n_edits": len(edits), "n_removed": len(removals),
            "stages": {"own": [], "linked": ["prepare", "encoder", "familiarity", "collect", "diffusion"]}})
    print(f"edits remove: version {record['version']} of {run}: {len(fresh)} edits removed, {len(removals)} of "
          f"{len(edits)} removed in all")
    return record
