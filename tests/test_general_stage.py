"""``megedit general`` end to end on the 12-edit run of conftest (``served_run``): the base LM, MeG and FT on
4 items per benchmark."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megedit.artifacts import read_jsonl, read_manifest
from megedit.cli import stage_main
from megedit.general.benchmarks import BENCHMARKS

pytestmark = pytest.mark.slow
QUIET = ["--trainer.enable_progress_bar", "false"]


@pytest.fixture(scope="module")
def run_dir(served_run) -> Path:
    return served_run


def test_general_ability_of_base_meg_and_ft_on_a_few_items(run_dir, tmp_path):
    """``megedit general`` on 4 items per benchmark: every variant scores the same items, an unrouted query gets
    the base's answer, and a rerun scores nothing anew (every item is kept)."""
    out = tmp_path / "general"
    args = ["--data.run_dir", str(run_dir), "--model.out_dir", str(out), "--data.items_per_benchmark", "4",
            "--model.variants", "[base, meg, ft]", "--model.steps", "20", "--model.gsm8k_max_new_tokens", "24",
            "--model.bbh_max_new_tokens", "16", *QUIET]
    stage_main("general", args)
    summary = json.loads((out / "results.json").read_text())
    assert all(summary["results"][v][b]["n"] == 4 for v in ("base", "meg", "ft") for b in BENCHMARKS)
    rows = read_jsonl(out / "per_item.jsonl")
    assert len(rows) == 3 * 5 * 4 and {r["variant"] for r in rows} == {"base", "meg", "ft"}
    base = {r["key"]: r for r in rows if r["variant"] == "base"}
    for r in (r for r in rows if r["variant"] == "meg" and not r["routed"]):
        assert (r["prediction"], r["output"]) == (base[r["key"]]["prediction"], base[r["key"]]["output"])
    assert Path(summary["peers"]["ft"]).is_file()  # computed and saved here, or the evaluate stage's file
    assert "| Before edit (base LM) |" in (out / "results.md").read_text()
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert read_manifest(out, stage="general")["inputs"]["files"]["peer_weights/ft"]
    kept = {p.name: p.read_text() for p in (out / "items").iterdir()}
    stage_main("general", args)  # FT's weights come from its file, every item from the kept rows
    assert {p.name: p.read_text() for p in (out / "items").iterdir()} == kept
    assert json.loads((out / "results.json").read_text())["results"] == summary["results"]
    # A threshold no entropy reaches routes every query: MeG is scored anew with neurons, the base is reused.
    stage_main("general", [*args, "--data.benchmarks", "[rte, sst2]", "--model.variants", "[base, meg]",
                            "--model.router_threshold", "1e9"])
    meg = [r for r in read_jsonl(out / "per_item.jsonl") if r["variant"] == "meg"]
    assert len(meg) == 8 and all(r["routed"] for r in meg)
    assert (out / "items" / "base.jsonl").read_text() == kept["base.jsonl"]
