"""Incremental edits: add K edits to a finished run and remove R, against what a from-scratch run costs.

    python bench/incremental.py --run runs/smollm2-counterfact-1024 --work /tmp/incremental-cf1024 \
        [--add 128] [--remove 128] [--old-sample 256] [--value-scale 2.0] [--out bench/results/incremental]

The run is copied to ``--work`` first (its stage folders only; the run itself is never written). Then:

1. K new edits: records of the run's own benchmark (the prepare stage's reader, deduplication and seeded
   order) that the run never used: not an edit, not a pseudo edit, pseudo-irrelevant prompt or encoder pair,
   and none of whose texts is a pseudo text. Their raw rows are written to ``--work`` in their own format.
2. Before: the run (version 0) is scored on a seeded sample of its edits (``--old-sample``) and on the R
   edits that step 5 removes.
3. ``megedit edits add`` (a subprocess, timed end to end) writes version 1.
4. Version 1 is scored on the K new edits, the old sample and the R edits.
5. ``megedit edits remove`` (timed) removes the R edits: version 2.
6. Version 2 is scored on the R edits (their own prompts and paraphrases against the base LM's pre-edit
   answers: "restoration"; and their usual items), the old sample and the new edits ("the rest unchanged":
   metrics and the share of items whose AG outcome is the same as in version 1).

Scoring is the evaluate stage's ``meg`` variant (``megedit.evaluate.items``): TF and AG per item, Score the
harmonic mean. The from-scratch cost is read from the run's stage manifests (``resources.wall_seconds``; for
older manifests the stage's own report, else the creation times: ``stage_cost``): prepare, familiarity, collect and diffusion
grow with N and are scaled by (N + K) / N; the encoder does not depend on N; evaluate is not part of
building an edited model and is left out. Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from megedit.artifacts import atomic_write_json, atomic_write_text, git_commit
from megedit.collect.artifact import read_report as collect_report
from megedit.diffusion.artifact import read_report as diffusion_report
from megedit.encoder.artifact import read_report as encoder_report
from megedit.familiarity.artifact import read_report as familiarity_report
from megedit.prepare.artifact import read_report as prepare_report

ADDED_PREFIX = "added-"  # the new edits' file names, so their ids are the benchmark's with this prefix
STAGES_COPIED = ("prepare", "encoder", "familiarity", "collect", "diffusion")
GROWS_WITH_N = ("prepare", "familiarity", "collect", "diffusion")


# ----------------------------------------------------------------------------- the new edits
def unused_records(prepared, k: int) -> list:
    """The first ``k`` records of the run's benchmark, in the prepare stage's seeded order, that the run never
    used and that share no text with its pseudo sets (so no stage was ever trained on them)."""
    from megedit.data.datasets import load_dataset_config, read_dataset
    from megedit.data.splits import DropReport, dedupe_by_subject, is_edit_eligible
    from megedit.paths import data_dir

    cfg = prepared.manifest["config"]["data"]
    records, _, _ = read_dataset(load_dataset_config(cfg["dataset"]), data_dir(cfg.get("data_dir")))
    order = dedupe_by_subject(records, DropReport())
    random.Random(cfg["seed"]).shuffle(order)  # make_splits' order
    # an edit this bench added earlier carries its record's id behind ADDED_PREFIX (write_raw_rows)
    used = ({e.id.removeprefix(ADDED_PREFIX) for e in prepared.edits} | {r.id for r in prepared.pseudo_edits}
            | {r["id"] for r in prepared.pseudo_irrelevant} | {p["group"] for p in prepared.pseudo_pairs})
    pseudo_texts = ({t for p in prepared.pseudo_pairs for t in (p["anchor"], p["positive"])}
                    | {r["prompt"] for r in prepared.pseudo_irrelevant}
                    | {t for r in prepared.pseudo_edits for t in (r.prompt, *r.paraphrases, *(q.prompt for q in r.locality))})
    picked = []
    for rec in order:
        texts = [rec.prompt, *rec.paraphrases, *(q.prompt for q in rec.locality)]
        if rec.id not in used and is_edit_eligible(rec) and not any(t in pseudo_texts for t in texts):
            picked.append(rec)
            if len(picked) == k:
                return picked
    raise SystemExit(f"only {len(picked)} unused records in the benchmark, asked for {k}")


def write_raw_rows(records, prepared, folder: Path) -> list[Path]:
    """The records' own rows, one file per source file (``added-<name>``: ids differ from the benchmark's only
    by the file stem), in the format they were read from."""
    from megedit.data.datasets import load_dataset_config
    from megedit.data.readers import load_json_list
    from megedit.paths import data_dir

    cfg = prepared.manifest["config"]["data"]
    root = data_dir(cfg.get("data_dir"))
    entries = {e.path: e for e in load_dataset_config(cfg["dataset"]).files}
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for source in sorted({r.source for r in records}):
        path = Path(source) if Path(source).is_absolute() else root / source
        rows = load_json_list(path)
        chosen = [rows[r.index] for r in records if r.source == source]
        if entries.get(source) is None:
            raise SystemExit(f"{source}: not a file of the dataset preset {cfg['dataset']}")
        out = folder / f"{ADDED_PREFIX}{Path(source).stem}.json"
        atomic_write_text(out, json.dumps(chosen, ensure_ascii=False, indent=1) + "\n")
        paths.append(out)
    return paths


# ----------------------------------------------------------------------------- scoring
def score(run: Path, version: int, groups: dict[str, list[dict]], value_scale: float | None, batch_size: int) -> dict:
    """Per group of items: the metrics of the version (``summarise_rows``) and its rows."""
    from megedit.edited_model import EditedLM
    from megedit.evaluate.items import score_meg, summarise_rows

    t0 = time.time()
    edited = EditedLM.load(run, version=version, value_scale=value_scale)
    out = {}
    for name, items in groups.items():
        rows = score_meg(edited, items, batch_size=batch_size)
        out[name] = {"metrics": summarise_rows(rows), "rows": rows}
        print(f"  version {version} {name}: {json.dumps(out[name]['metrics'])}", flush=True)
    out["_seconds"] = round(time.time() - t0, 1)
    return out


def by_id(prepared, ids) -> list[int]:
    index = {e.id: i for i, e in enumerate(prepared.edits)}
    return [index[i] for i in ids]


def same_outcome(before: list[dict], after: list[dict]) -> float | None:
    """Share of items (matched by edit id, group and position) whose AG outcome did not change."""
    key = lambda r: (r["edit_id"], r["group"], r["pos"])  # noqa: E731
    old = {key(r): r["ag"] for r in before}
    pairs = [(old[key(r)], r["ag"]) for r in after if key(r) in old]
    return round(100.0 * sum(a == b for a, b in pairs) / len(pairs), 2) if pairs else None


def items_for(prepared, ids, kind: str = "edit") -> list[dict]:
    from megedit.evaluate.items import edit_items, restoration_items

    make = edit_items if kind == "edit" else restoration_items
    items = make(prepared, by_id(prepared, ids))
    for it in items:
        it["edit_id"] = prepared.edits[it["edit"]].id
    return items


def restoration_by_kind(rows: list[dict]) -> dict:
    from megedit.evaluate.items import summarise_rows

    out = {}
    for kind in ("own_prompt", "own_paraphrase"):
        part = [r for r in rows if r["locality_kind"] == kind]
        m = summarise_rows(part)
        out[kind] = {"n": len(part), "tf": m["loc_tf"], "ag": m["loc_ag"], "routed": m["familiar"]["loc"]}
    return out


# ----------------------------------------------------------------------------- cost
# What each stage's own report says it took, for manifests written before they recorded ``resources``.
REPORTED_SECONDS = {
    "prepare": (prepare_report, lambda r: r["wall_seconds"]),
    "encoder": (encoder_report, lambda r: r["wall_seconds"]),
    "familiarity": (familiarity_report, lambda r: r["wall_seconds"]),
    "collect": (collect_report, lambda r: r["stage_wall_seconds"] + (r.get("transfer") or {}).get("seconds", 0.0)),
    "diffusion": (diffusion_report, lambda r: r["wall_seconds_train"] + r["wall_seconds_report"]),
}


def stage_cost(run: Path, stage: str, pipeline) -> dict | None:
    """What ``stage`` of ``run`` cost, read in the run that owns the folder (an ``EXP=`` run links the stages it
    shares from its base run): the manifest's ``resources``; else the stage's own report (its timer starts
    after the imports); else ``bench/pipeline.py``'s estimate from the manifests' creation times."""
    owner = (run / stage).resolve().parent
    cost = pipeline.stage_costs(owner).get(stage)
    if cost is not None and not cost["estimated"]:
        return {"wall_seconds": cost["wall_seconds"], "source": "manifest resources"}
    read, seconds = REPORTED_SECONDS[stage]
    try:
        return {"wall_seconds": round(seconds(read(owner / stage)), 1), "source": f"{stage} report"}
    except (OSError, KeyError, TypeError, ValueError):
        if cost is None or cost["wall_seconds"] is None:  # unknown: an input was rerun after the stage
            return None
        return {"wall_seconds": cost["wall_seconds"], "source": "manifest creation times"}


def from_scratch_cost(run: Path, n: int, k: int) -> dict:
    spec = importlib.util.spec_from_file_location("pipeline_bench", Path(__file__).with_name("pipeline.py"))
    pipeline = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pipeline)
    costs = {s: c for s in STAGES_COPIED if (c := stage_cost(run, s, pipeline)) is not None}
    stages = {s: c["wall_seconds"] for s, c in costs.items()}
    scaled = {s: round(v * ((n + k) / n if s in GROWS_WITH_N else 1.0), 1) for s, v in stages.items()}
    return {"stages_seconds": stages, "sources": {s: c["source"] for s, c in costs.items()},
            "estimated": any(c["source"] == "manifest creation times" for c in costs.values()),
            "missing": [s for s in STAGES_COPIED if s not in stages], "total_seconds": round(sum(stages.values()), 1),
            "scaled_to_n_plus_k": scaled, "scaled_total_seconds": round(sum(scaled.values()), 1)}


def megedit_cli(*args: str) -> float:
    """Run ``megedit <args>`` in a fresh process (what a user runs); its wall seconds."""
    t0 = time.time()
    subprocess.run([sys.executable, "-m", "megedit.cli", *args], check=True)
    return time.time() - t0


# ----------------------------------------------------------------------------- report
def table(result: dict) -> str:
    m = result["metrics"]
    cols = ("rel_tf", "rel_ag", "gen_tf", "gen_ag", "loc_tf", "loc_ag", "score")
    lines = ["| edits | version | n | " + " | ".join(c.replace("_", " ").title().replace("Tf", "TF").replace("Ag", "AG")
                                                    for c in cols) + " |",
             "|---|---|---|" + "---|" * len(cols)]
    for label, version, metrics in m["rows"]:
        lines.append(f"| {label} | {version} | {metrics['n']['rel']} | "
                     + " | ".join("—" if metrics[c] is None else f"{metrics[c]:.2f}" for c in cols) + " |")
    r, c = result["removal"], result["cost"]
    lines += ["", f"Removed edits answer as the base model (restoration, version {r['version']}): own prompts AG "
              f"{r['restoration']['own_prompt']['ag']} / TF {r['restoration']['own_prompt']['tf']} (routed "
              f"{r['restoration']['own_prompt']['routed']}%), own paraphrases AG {r['restoration']['own_paraphrase']['ag']}"
              f" / TF {r['restoration']['own_paraphrase']['tf']} (routed {r['restoration']['own_paraphrase']['routed']}%).",
              f"Unchanged by the removal (same AG outcome as in version 1): old sample {r['unchanged_old_sample']}%, "
              f"new edits {r['unchanged_new_edits']}%.",
              "", f"`edits add` {c['add_seconds']:.0f} s ({c['add_stage_seconds']}) against a from-scratch run of "
              f"{c['from_scratch']['scaled_total_seconds']:.0f} s at N+K (stage manifests and reports"
              f"{', partly estimated from creation times' if c['from_scratch']['estimated'] else ''}; "
              f"{c['from_scratch']['total_seconds']:.0f} s at N): {c['add_share_of_from_scratch']:.1f}%. "
              f"`edits remove` {c['remove_seconds']:.1f} s."]
    lines += ["", "| criterion (issue 20) | value | pass |", "|---|---|---|"]
    lines += [f"| {k} | {v['value']} | {'yes' if v['pass'] else 'no'} |" for k, v in result["criteria"].items()]
    return "\n".join(lines)


def criteria(result: dict) -> dict:
    m = {label: metrics for label, _, metrics in result["metrics"]["rows"]}
    old_before, old_after = m["old sample, before"]["score"], m["old sample, after add"]["score"]
    r, c = result["removal"], result["cost"]
    return {
        "add <= 25% of a from-scratch run": {"value": f"{c['add_share_of_from_scratch']:.1f}%",
                                             "pass": c["add_share_of_from_scratch"] <= 25.0},
        "old edits' Score within 2 points": {"value": f"{old_before} -> {old_after}",
                                             "pass": None not in (old_before, old_after) and old_after >= old_before - 2.0},
        "new edits' Rel AG >= 95": {"value": m["new edits, after add"]["rel_ag"],
                                    "pass": (m["new edits, after add"]["rel_ag"] or 0) >= 95.0},
        "removed prompts answer as before editing (>= 99%)": {"value": r["restoration"]["own_prompt"]["ag"],
                                                              "pass": (r["restoration"]["own_prompt"]["ag"] or 0) >= 99.0},
        "other edits unchanged by the removal": {"value": f"old {r['unchanged_old_sample']}%, new {r['unchanged_new_edits']}%",
                                                 "pass": min(r["unchanged_old_sample"] or 0, r["unchanged_new_edits"] or 0) >= 99.0},
    }


# ----------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, type=Path, help="a finished run (read only)")
    p.add_argument("--work", required=True, type=Path, help="a fresh folder for the copy and the versions")
    p.add_argument("--add", type=int, default=128, help="K, edits to add")
    p.add_argument("--remove", type=int, default=128, help="R, edits to remove (from the run's own edits)")
    p.add_argument("--old-sample", type=int, default=256, help="seeded sample of the run's edits scored before/after")
    p.add_argument("--value-scale", type=float, default=None, help="for every version (default: each generator's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--add-args", default="", help="extra flags for `megedit edits add`, e.g. '--draws-per-new-edit 400'")
    p.add_argument("--out", type=Path, default=Path("bench/results/incremental"))
    args = p.parse_args(argv)
    if args.work.exists() and any(args.work.iterdir()):
        p.error(f"--work {args.work} is not empty")
    return args


def copy_and_pick(args) -> tuple[Path, object, list[str], list[str], list[Path]]:
    """Copy the run into ``--work``; draw the old sample and the edits to remove; write the new edits' file(s)."""
    from megedit.prepare.artifact import load_prepared

    run = args.work / args.run.name
    for stage in STAGES_COPIED:
        shutil.copytree(args.run / stage, run / stage)
    prepared = load_prepared(run / "prepare")
    order = [e.id for e in prepared.edits]
    random.Random(args.seed).shuffle(order)
    old_ids, removed_ids = order[: args.old_sample], order[args.old_sample: args.old_sample + args.remove]
    files = write_raw_rows(unused_records(prepared, args.add), prepared, args.work / "new_edits")
    print(f"incremental: {len(order)} edits; adding {args.add} from {[str(f) for f in files]}, removing "
          f"{len(removed_ids)}, scoring a sample of {len(old_ids)}", flush=True)
    return run, prepared, old_ids, removed_ids, files


def add_remove_and_score(args, run: Path, prepared, old_ids, removed_ids, files) -> dict:
    """Steps 2-6 of the module docstring: every score, the two commands' times and version 1's record."""
    from megedit.edits.versions import read_record, version_dirs
    from megedit.prepare.artifact import load_prepared

    vs, bs = args.value_scale, args.batch_size
    before = score(run, 0, {"old": items_for(prepared, old_ids), "removed": items_for(prepared, removed_ids)}, vs, bs)
    add_seconds = megedit_cli("edits", "add", "--run", str(run), *map(str, files), "--quiet", *args.add_args.split())
    v1 = read_record(version_dirs(run)[1])
    prepared1 = load_prepared(run / "versions" / "1" / "prepare")
    new_ids = v1["change"]["added"]
    after_add = score(run, 1, {"new": items_for(prepared1, new_ids), "old": items_for(prepared1, old_ids),
                               "removed": items_for(prepared1, removed_ids)}, vs, bs)
    remove_seconds = megedit_cli("edits", "remove", "--run", str(run), *removed_ids, "--reason", "bench/incremental.py")
    after_remove = score(run, 2, {"restoration": items_for(prepared1, removed_ids, "restoration"),
                                  "removed": items_for(prepared1, removed_ids), "old": items_for(prepared1, old_ids),
                                  "new": items_for(prepared1, new_ids)}, vs, bs)
    return {"before": before, "after_add": after_add, "after_remove": after_remove, "version_1": v1,
            "new_ids": new_ids, "add_seconds": add_seconds, "remove_seconds": remove_seconds}


def assemble(args, n: int, old_ids, removed_ids, s: dict) -> dict:
    """The JSON result: metrics per group and version, removal, cost, and the issue's criteria."""
    cost = {"add_seconds": round(s["add_seconds"], 1), "add_stage_seconds": s["version_1"]["seconds"],
            "remove_seconds": round(s["remove_seconds"], 1),
            "from_scratch": from_scratch_cost(args.run, n, len(s["new_ids"]))}
    cost["add_share_of_from_scratch"] = round(100.0 * s["add_seconds"] / cost["from_scratch"]["scaled_total_seconds"], 2)
    m = lambda when, group: s[when][group]["metrics"]  # noqa: E731
    result = {
        "run": str(args.run), "commit": git_commit(), "n_edits": n, "added": len(s["new_ids"]), "removed": len(removed_ids),
        "old_sample": len(old_ids), "seed": args.seed, "value_scale": args.value_scale,
        "machine": {"cpus": os.cpu_count(), "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
                    "python": platform.python_version()},
        "new_edit_ids": s["new_ids"], "removed_edit_ids": removed_ids, "old_sample_ids": old_ids,
        "version_1": s["version_1"], "metrics": {"rows": [
            ("old sample, before", 0, m("before", "old")), ("old sample, after add", 1, m("after_add", "old")),
            ("old sample, after remove", 2, m("after_remove", "old")), ("new edits, after add", 1, m("after_add", "new")),
            ("new edits, after remove", 2, m("after_remove", "new")), ("to remove, before", 0, m("before", "removed")),
            ("to remove, after add", 1, m("after_add", "removed")),
            ("removed, after remove", 2, m("after_remove", "removed"))]},
        "removal": {"version": 2, "restoration": restoration_by_kind(s["after_remove"]["restoration"]["rows"]),
                    "unchanged_old_sample": same_outcome(s["after_add"]["old"]["rows"], s["after_remove"]["old"]["rows"]),
                    "unchanged_new_edits": same_outcome(s["after_add"]["new"]["rows"], s["after_remove"]["new"]["rows"])},
        "cost": cost, "scoring_seconds": {k: s[k]["_seconds"] for k in ("before", "after_add", "after_remove")},
    }
    result["criteria"] = criteria(result)
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.time()
    run, prepared, old_ids, removed_ids, files = copy_and_pick(args)
    scores = add_remove_and_score(args, run, prepared, old_ids, removed_ids, files)
    result = assemble(args, len(prepared.edits), old_ids, removed_ids, scores)
    result["wall_seconds"] = round(time.time() - started, 1)
    md = table(result)
    print(md)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out.with_suffix(".json"), result)
    atomic_write_text(args.out.with_suffix(".md"), md + "\n")
    return 0




if __name__ == "__main__":
    raise SystemExit(main())
