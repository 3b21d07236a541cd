"""Readable outputs of the general stage: a table shaped like the paper's Table 3 and a bar chart
(``megedit.general.artifact`` writes them)."""

from __future__ import annotations

from pathlib import Path

from megedit.general.benchmarks import TITLES
from megedit.plots import grouped_bars

LABELS = {"base": "Before edit (base LM)", "meg": "MeG", "ft": "FT", "memit": "MEMIT", "alphaedit": "AlphaEdit"}


def _benchmarks(summary: dict) -> list[str]:
    return list(summary["settings"]["items"])


def _pct(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def results_table(summary: dict) -> str:
    lin, st, res = summary["lineage"], summary["settings"], summary["results"]
    names = _benchmarks(summary)
    lines = [f"# General ability: {lin['model']} / {lin['dataset']} / N={summary['n_edits']}", "",
             "Accuracy (%) on the same items for every row.", "",
             "| Variant | " + " | ".join(TITLES[b] for b in names) + " | Average |",
             "|---|" + "---|" * (len(names) + 1)]
    for variant, cells in res.items():
        lines.append(f"| {LABELS.get(variant, variant)} | " + " | ".join(_pct(cells[b]["accuracy"]) for b in names)
                     + f" | **{_pct(cells['average'])}** |")
    changed = [v for v in res if v != "base" and "changed_vs_base" in res[v][names[0]]]
    if changed:
        lines += ["", "Answers that differ from the base LM's (items), and for MeG the items its router sent to a "
                  "generated neuron:", "", "| Variant | " + " | ".join(TITLES[b] for b in names) + " |",
                  "|---|" + "---|" * len(names)]
        for v in changed:
            cells = [f"{res[v][b]['changed_vs_base']}" + (f" (routed {res[v][b]['routed']})" if "routed" in res[v][b]
                                                           else "") for b in names]
            lines.append(f"| {LABELS.get(v, v)} | " + " | ".join(cells) + " |")
    lines += ["", "Items per benchmark: " + ", ".join(f"{TITLES[b]} {st['items'][b]} of {st['of'][b]}" for b in names)
              + f" (seeded subset, seed {st['seed']}; 95% intervals in results.json)."]
    lines += [f"- {TITLES[b]}: {st['protocols'][b]}." for b in names]
    if "meg" in st:
        m = st["meg"]
        lines.append(f"- MeG routes on the {m['route_on']} text; threshold {m['router_threshold']:.4g}; "
                     f"{m['sampler']} {m['steps']} steps.")
    for method, path in summary.get("peers", {}).items():
        lines.append(f"- {LABELS.get(method, method)}: edited weights from `{path}`.")
    return "\n".join(lines) + "\n"


def bar_chart(summary: dict, path: Path) -> None:
    names = _benchmarks(summary) + ["average"]
    series = {LABELS.get(v, v): [(cells[b]["accuracy"] if b != "average" else cells[b]) or 0.0 for b in names]
              for v, cells in summary["results"].items()}
    lin = summary["lineage"]
    grouped_bars(path, series, [TITLES.get(b, "Average") for b in names], ylabel="accuracy (%)", ylim=100,
                 title=f"General ability: {lin['model']} / {lin['dataset']} / N={summary['n_edits']}",
                 legend_loc="upper right", legend_size=8)
