"""``megedit edits list``: a run's versions, what each changed, and how many edits it serves."""

from __future__ import annotations

from pathlib import Path

from megedit.artifacts import read_jsonl, read_manifest
from megedit.edits.removed import read_removed
from megedit.edits.versions import latest_version, read_record, stage_owner, version_dirs
from megedit.prepare.artifact import FILES


def version_rows(run: str | Path) -> list[dict]:
    """One row per version, 0 (the run as built) first: its number, parent, kind, creation time, edits,
    removed edits and a one-line summary of the change."""
    run = Path(run)
    base = read_manifest(run / "prepare", stage="prepare", verify=False)
    rows = [{"version": 0, "parent": None, "kind": "build", "created": base["created"],
             "n_edits": len(read_jsonl(run / "prepare" / FILES["edits"])), "n_removed": 0, "change": "the run"}]
    for n, folder in sorted(version_dirs(run).items()):
        rec = read_record(folder)
        change = rec.get("change", {})
        if rec["kind"] == "add":
            what = f"+{len(change.get('added', []))} (replacing {len(change.get('replaced', {}))})"
        else:
            what = f"-{len(change.get('removed', []))}" + (f": {change['reason']}" if change.get("reason") else "")
        rows.append({"version": n, "parent": rec["parent"], "kind": rec["kind"], "created": rec["created"],
                     "n_edits": rec["n_edits"], "n_removed": len(read_removed(folder)), "change": what,
                     "seconds": rec.get("seconds", {}).get("total"), "prepare": str(stage_owner(folder, "prepare"))})
    return rows


def table(run: str | Path) -> str:
    rows = version_rows(run)
    latest = latest_version(run)
    lines = ["| version | parent | kind | created (UTC) | edits | removed | change | seconds |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mark = " (served)" if r["version"] == latest else ""
        lines.append(f"| {r['version']}{mark} | {'' if r['parent'] is None else r['parent']} | {r['kind']} | "
                     f"{r['created']} | {r['n_edits']} | {r['n_removed']} | {r['change']} | {r.get('seconds') or ''} |")
    return "\n".join(lines)
