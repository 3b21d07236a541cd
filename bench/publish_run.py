"""Copy one finished run's results into ``bench/results/runs/`` so they can be committed.

    python bench/publish_run.py runs/smollm2-counterfact-1024 --command "make all ..." --machine "2 cores, ..."

Writes ``<run-name>.json`` (the evaluate stage's ``results.json``), ``.md`` and ``.png`` (its table and
plot) and ``<run-name>.stages.json``: the command, the machine, the commit, each stage's finish time and
wall time (from the manifests), and the collect and diffusion stages' own diagnostics (prompt success,
paraphrase transfer of the collected neurons, generated against collected reliability and pseudo
generality). Nothing is computed here: every number is read from the run's artifacts.
"""

from __future__ import annotations

import argparse
import json
import shutil
from datetime import datetime
from pathlib import Path

from megedit.artifacts import finished_manifest, git_commit
from megedit.collect.artifact import read_report as collect_report
from megedit.diffusion.artifact import read_report as diffusion_report
from megedit.evaluate.artifact import report_files, results_file
from megedit.graph import ORDER as STAGES

OUT_DIR = Path(__file__).resolve().parent / "results" / "runs"


def _manifest(folder: Path) -> dict:
    return finished_manifest(folder) or {}


def _report(read, folder: Path) -> dict:
    """A stage's own report, or {} where the stage has not written one."""
    try:
        return read(folder)
    except FileNotFoundError:
        return {}


def stage_times(run: Path) -> dict:
    """Each stage's manifest time (UTC) and the wall time since the stage that finished before it."""
    created = {s: _manifest(run / s).get("created") for s in STAGES}
    done = sorted((datetime.fromisoformat(c), s) for s, c in created.items() if c)
    times, previous = {}, None
    for t, stage in done:
        times[stage] = {"finished_utc": created[stage],
                        "seconds_after_previous": None if previous is None else round((t - previous).total_seconds())}
        previous = t
    return times


def collect_summary(run: Path) -> dict:
    report = _report(collect_report, run / "collect")
    keep = ("success_rate", "reached_margin_rate", "steps_mean", "edits_per_second", "stage_wall_seconds")
    out = {k: report[k] for k in keep if k in report}
    transfer = report.get("transfer") or {}
    out["transfer"] = {name: {k: v for k, v in row.items() if not isinstance(v, (list, dict))}
                       for name, row in transfer.items() if isinstance(row, dict)}
    out["transfer"]["n_pseudo_edits"] = transfer.get("n_pseudo_edits")
    out["options"] = _manifest(run / "collect").get("config", {}).get("model", {}).get("options")
    return out


def diffusion_summary(run: Path) -> dict:
    report = _report(diffusion_report, run / "diffusion")
    config = _manifest(run / "diffusion").get("config", {})
    data = config.get("data", {})
    return {"generated_vs_collected": report.get("generated_vs_collected"),
            "pseudo_generality": report.get("pseudo_generality"),
            "epochs": report.get("epochs"), "wall_seconds_train": report.get("wall_seconds_train"),
            "paraphrase_shifts": data.get("paraphrase_shifts"), "shift_prob": data.get("shift_prob"),
            "preset": config.get("model", {}).get("preset")}


def publish(run: Path, command: str, machine: str, out_dir: Path = OUT_DIR, evaluate_dir: str = "evaluate",
            name: str | None = None, commit: str | None = None) -> list[Path]:
    evaluate = run / evaluate_dir
    name = name or run.name
    if not results_file(evaluate).is_file():
        raise SystemExit(f"{evaluate}: no results.json; has the evaluate stage finished?")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for src in report_files(evaluate):
        dst = out_dir / f"{name}{src.suffix}"
        shutil.copyfile(src, dst)
        written.append(dst)
    commit = commit or git_commit()
    stages = {"run": run.name, "evaluate_dir": evaluate_dir, "commit": commit, "command": command, "machine": machine,
              "stages": stage_times(run), "collect": collect_summary(run), "diffusion": diffusion_summary(run)}
    dst = out_dir / f"{name}.stages.json"
    dst.write_text(json.dumps(stages, indent=1) + "\n")
    return written + [dst]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="the run folder (holds prepare/ ... evaluate/)")
    parser.add_argument("--command", required=True, help="the exact command that made the run")
    parser.add_argument("--machine", required=True, help="machine and load while it ran")
    parser.add_argument("--out_dir", type=Path, default=OUT_DIR)
    parser.add_argument("--evaluate", default="evaluate", help="the run's evaluate folder to publish")
    parser.add_argument("--name", default=None, help="output name (default: the run folder's name)")
    parser.add_argument("--commit", default=None, help="the commit that made the run (default: HEAD here)")
    args = parser.parse_args(argv)
    for path in publish(args.run, args.command, args.machine, args.out_dir, args.evaluate, args.name, args.commit):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
