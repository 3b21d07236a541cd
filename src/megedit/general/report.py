"""Readable outputs of the general stage: a table shaped like the paper's Table 3 and a bar chart."""

from __future__ import annotations

from pathlib import Path

from megedit.artifacts import atomic_path, atomic_write_text
from megedit.general.benchmarks import TITLES

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = _benchmarks(summary) + ["average"]
    res = summary["results"]
    width = 0.8 / max(len(res), 1)
    fig, ax = plt.subplots(figsize=(9, 4))
    for k, (variant, cells) in enumerate(res.items()):
        vals = [(cells[b]["accuracy"] if b != "average" else cells[b]) or 0.0 for b in names]
        ax.bar([i + k * width for i in range(len(names))], vals, width, label=LABELS.get(variant, variant))
    ax.set_xticks([i + width * (len(res) - 1) / 2 for i in range(len(names))])
    ax.set_xticklabels([TITLES.get(b, "Average") for b in names])
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    lin = summary["lineage"]
    ax.set_title(f"General ability: {lin['model']} / {lin['dataset']} / N={summary['n_edits']}")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def write_reports(out: Path, summary: dict) -> None:
    atomic_write_text(out / "results.md", results_table(summary))
    bar_chart(summary, out / "results.png")
