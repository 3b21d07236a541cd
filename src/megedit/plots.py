"""Plots shared by the stages' reports."""

from __future__ import annotations

from pathlib import Path

from megedit.artifacts import atomic_path


def grouped_bars(path: Path, series: dict[str, list[float]], ticks: list[str], *, title: str, ylabel: str,
                 ylim: float, legend_loc: str, legend_size: float | None = None) -> None:
    """One group of bars per tick, one bar per series (label -> a value per tick), written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(9, 4))
    for k, (label, vals) in enumerate(series.items()):
        ax.bar([i + k * width for i in range(len(ticks))], vals, width, label=label)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(ticks))])
    ax.set_xticklabels(ticks)
    ax.set_ylim(0, ylim)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc=legend_loc, fontsize=legend_size)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
