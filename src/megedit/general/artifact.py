"""The general artifact, as the general stage writes it (a probe of a finished run: no later stage reads it).

``<out_dir>/``
  ``results.json``      {lineage, n_edits, settings, results (per variant and benchmark: accuracy, correct, n,
                        ci95, changed_vs_base, MeG's routed; the average), peers, costs_this_process}
  ``results.md``, ``results.png``  the table shaped like the paper's Table 3 and its bar chart
                        (``megedit.general.report``)
  ``per_item.jsonl``    one row per (variant, item): key, benchmark, group, gold, prediction, correct, output,
                        n_shots, MeG's routed and entropy
  ``items/``            ``<variant>.jsonl``: every row as it was scored, with its fingerprint
                        (``megedit.general.item_cache``), so a rerun scores only what is new
  ``peers/``            the peers' weights edited here (``megedit.general.peer_weights``)
  ``manifest.json``     stage "general", upstream: the run's served stages, input files: the benchmarks and
                        the peers' weights
"""

from __future__ import annotations

import json
from pathlib import Path

from megedit.artifacts import write_summary_files

RESULTS = "results.json"
TABLE = "results.md"
CHART = "results.png"
PER_ITEM = "per_item.jsonl"
OUTPUTS = [RESULTS, TABLE, CHART, PER_ITEM]  # the manifest's (items/ and peers/ are caches, not outputs)
ITEMS_FOLDER = "items"
PEERS_FOLDER = "peers"


def write_results(out_dir: str | Path, summary: dict, rows: list[dict]) -> None:
    """``results.json``, ``per_item.jsonl`` and the report made from the summary (table and chart)."""
    from megedit.general.report import bar_chart, results_table

    write_summary_files(out_dir, (RESULTS, PER_ITEM, TABLE, CHART), summary, rows, results_table(summary),
                        lambda path: bar_chart(summary, path))


def read_results(out_dir: str | Path) -> dict:
    """``results.json`` of a general folder."""
    path = Path(out_dir) / RESULTS
    if not path.is_file():
        raise FileNotFoundError(f"{out_dir}: no {RESULTS} (run the general stage there first)")
    return json.loads(path.read_text())


def read_table(out_dir: str | Path) -> str:
    """``results.md`` of a general folder: what the stage prints when it is done."""
    return (Path(out_dir) / TABLE).read_text()
