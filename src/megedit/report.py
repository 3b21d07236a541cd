"""``megedit report RUN_DIR/evaluate ...``: gather evaluate results into one table and a scaling plot.

Writes ``report.md`` (every run and variant, grouped by protocol so numbers from different
metric protocols are never put in one column by mistake), ``report.json`` and ``scaling.png``
(Score and the six metrics against N, one line per model/dataset/variant).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from megedit.artifacts import atomic_path, atomic_write_json, atomic_write_text
from megedit.evaluate.artifact import RESULTS, read_results, results_file
from megedit.evaluate.metrics import metric_names
from megedit.evaluate.report import LABELS


def _run_of(results: Path) -> str:
    """The run an evaluate folder's ``results.json`` belongs to (``<run>/evaluate*/results.json``); a results
    file under another name (``bench/results/runs/<run-name>.json``) is a run of its own."""
    results = results.resolve()
    return str(results.parent.parent if results.name == RESULTS else results)


def collect(paths) -> list[dict]:
    """One row per (evaluate folder, variant). A variant that two folders of the same run scored with the same
    protocol, threshold and numbers (MeG in ``evaluate/`` and again beside the peers in ``evaluate-peers/``)
    is kept once, from the first folder given: the table and the scaling plot would otherwise show it twice."""
    rows, seen = [], set()
    for p in paths:
        f, s = results_file(p), read_results(p)
        meta, lin = s["metric_meta"], s["lineage"]
        for variant, r in s["results"].items():
            row = {"run": str(f.parent), "model": lin["model"], "dataset": lin["dataset"], "n": meta["n_edits"],
                   "variant": variant, "protocol": f"{meta['protocol']}/{meta['ag_protocol']}",
                   "threshold": meta.get("router_threshold"), **{k: r[k] for k in metric_names() + ["score"]},
                   "edit_seconds": s.get("method_seconds", {}).get(variant, {}).get("edit")}
            key = (_run_of(f), *(v for k, v in row.items() if k not in ("run", "edit_seconds")))
            if key not in seen:
                seen.add(key)
                rows.append(row)
    return rows


def table(rows) -> str:
    out = []
    by_protocol = defaultdict(list)
    for r in rows:
        by_protocol[r["protocol"]].append(r)
    for protocol, items in by_protocol.items():
        out += [f"## protocol `{protocol}`", "",
                "| run | model | dataset | N | method | Rel AG | Rel TF | Gen AG | Gen TF | Loc AG | Loc TF | Score "
                "| edit wall s |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(items, key=lambda r: (r["model"], r["dataset"], r["n"], r["variant"], r["run"])):
            vals = " | ".join("n/a" if r[k] is None else f"{r[k]:.2f}" for k in
                              ["rel_ag", "rel_tf", "gen_ag", "gen_tf", "loc_ag", "loc_tf", "score"])
            edit = "n/a" if r.get("edit_seconds") is None else f"{r['edit_seconds']:.0f}"
            out.append(f"| {r['run']} | {r['model']} | {r['dataset']} | {r['n']} | "
                       f"{LABELS.get(r['variant'], r['variant'])} | {vals} | {edit} |")
        out.append("")
    return "\n".join(out)


def scaling_plot(rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["score"] + metric_names()
    fig, axes = plt.subplots(1, len(names), figsize=(3 * len(names), 3), sharey=True)
    lines = defaultdict(list)
    for r in rows:
        lines[(r["model"], r["dataset"], r["variant"], r["protocol"])].append(r)
    for (model, dataset, variant, _), items in sorted(lines.items()):
        items.sort(key=lambda r: r["n"])
        for ax, name in zip(axes, names):
            ax.plot([r["n"] for r in items], [r[name] or 0.0 for r in items], marker="o",
                    label=f"{model}/{dataset}/{LABELS.get(variant, variant)}")
    for ax, name in zip(axes, names):
        ax.set_title(name.replace("_", " ").upper())
        ax.set_xscale("log")
        ax.set_xlabel("N edits")
        ax.set_ylim(0, 105)
    axes[0].set_ylabel("%")
    axes[-1].legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="megedit report", description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="evaluate output folders (or their results.json)")
    p.add_argument("--out", default="runs/report", help="folder for report.md, report.json, scaling.png")
    args = p.parse_args(argv)
    rows = collect(args.results)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "report.json", rows)
    atomic_write_text(out / "report.md", table(rows))
    scaling_plot(rows, out / "scaling.png")
    print(table(rows))
    print(f"wrote {out}/report.md, report.json, scaling.png")
    return 0
