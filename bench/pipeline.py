"""What each stage of a run costs, and how that grows with N: a table, JSON and a plot of cost per edit.

    python bench/pipeline.py runs/smollm2-counterfact-256 runs/smollm2-counterfact-1024 [--out bench/results/pipeline]

Reads only the finished runs' manifests. A manifest written by this version records its stage's
``resources`` (wall seconds since the stage started, the process's CPU seconds and peak memory, the
machine's load; ``megedit.artifacts.stage_resources``). For older manifests the wall time is estimated
from the ``created`` times: a stage run by ``make`` starts when its last input finished, so its wall time
is its own ``created`` minus its inputs' latest (marked ``estimated``; a stage run later by hand is
overestimated; one whose input was rerun after it has no estimate: ``unknown``, and the run's total is then a
lower bound, marked ``≥``). Run folders linked from a base run (``EXP=``) are skipped.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
from pathlib import Path

from megedit.artifacts import finished_manifest, read_manifest
from megedit.graph import INPUTS, ORDER


def _created(manifest: dict) -> dt.datetime:
    return dt.datetime.fromisoformat(manifest["created"])


def stage_costs(run: Path) -> dict:
    """``{stage: {wall_seconds, estimated, cpu_seconds, peak_rss_mib, load}}`` for every finished stage."""
    manifests = {s: m for s in ORDER if not (run / s).is_symlink() and (m := finished_manifest(run / s)) is not None}
    out = {}
    for stage, m in manifests.items():
        res = m.get("resources")
        if res:
            out[stage] = {"wall_seconds": res["wall_seconds"], "estimated": False,
                          "cpu_seconds": res.get("cpu_seconds_process"), "peak_rss_mib": res.get("peak_rss_mib_process"),
                          "load": res.get("load_average_1_5_15")}
            continue
        inputs = [_created(m) for i in INPUTS[stage] if (m := finished_manifest(run / i)) is not None]
        if inputs:
            seconds = round((_created(m) - max(inputs)).total_seconds(), 1)
            # An input rerun by hand after this stage finished leaves no estimate: unknown, not 0.
            out[stage] = {"wall_seconds": seconds if seconds > 0 else None, "estimated": True,
                          "cpu_seconds": None, "peak_rss_mib": None, "load": None}
    return out


def run_summary(run: Path) -> dict:
    prep = read_manifest(run / "prepare", verify=False)
    costs = stage_costs(run)
    n = prep["lineage"]["n_edits"]
    known = {s: c["wall_seconds"] for s, c in costs.items() if c["wall_seconds"] is not None}
    return {"run": run.name, "n_edits": n, "dataset": prep["lineage"]["dataset"], "model": prep["lineage"]["model"],
            "stages": costs, "total_wall_seconds": round(sum(known.values()), 1),
            "complete": all(s in known for s in ORDER),
            "seconds_per_edit": {s: round(w / n, 3) for s, w in known.items()}}


def markdown(rows: list[dict]) -> str:
    head = "| run | N | " + " | ".join(ORDER) + " | total | total s/edit |"
    lines = [head, "|" + "---|" * (len(ORDER) + 4)]
    for r in rows:
        cells = []
        for s in ORDER:
            c = r["stages"].get(s)
            if c is None:
                cells.append("—")
            elif c["wall_seconds"] is None:
                cells.append("unknown")
            else:
                cells.append(f"{c['wall_seconds'] / 60:.1f} min{'*' if c['estimated'] else ''}")
        at_least = "" if r["complete"] else "≥ "  # a stage missing or unknown: the total is a lower bound
        lines.append(f"| {r['run']} | {r['n_edits']} | " + " | ".join(cells)
                     + f" | {at_least}{r['total_wall_seconds'] / 60:.1f} min"
                     + f" | {at_least}{r['total_wall_seconds'] / r['n_edits']:.2f} |")
    lines.append("\n`*` estimated from the manifests' creation times (a stage run by `make` right after its inputs); "
                 "unknown: an input was rerun after the stage; ≥: the total misses a stage.")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for stage in ORDER:
        pts = sorted((r["n_edits"], r["seconds_per_edit"][stage]) for r in rows if stage in r["seconds_per_edit"])
        if pts:
            ax.plot(*zip(*pts), marker="o", label=stage)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("edits (N)")
    ax.set_ylabel("wall seconds per edit")
    ax.set_title("Stage cost per edit against N")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, default=Path("bench/results/pipeline"),
                        help="writes <out>.json, <out>.md and <out>.png")
    args = parser.parse_args(argv)
    rows = sorted((run_summary(r) for r in args.runs if finished_manifest(r / "prepare") is not None),
                  key=lambda r: (r["dataset"], r["n_edits"]))
    if not rows:
        parser.error("none of the runs has a finished prepare stage")
    table = markdown(rows)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"runs": rows}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text(table + "\n")
    plot(rows, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
