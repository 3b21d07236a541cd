"""Gather the evaluate folders of one sweep (DDIM steps, router threshold, ...) into one JSON + Markdown table.

    python bench/sweep_table.py RUN/evaluate-steps-10 RUN/evaluate-steps-50 ... --name steps \
        --out bench/results/sweeps/smollm2-counterfact-1024-first-256-steps

Per folder: the variant's six metrics and Score, its routing rates, the sampler settings and the seconds the
evaluate stage spent routing/sampling and in the LM; and, item by item against the first folder, how many
items changed their TF score, AG outcome, answer or routing (the check behind "no item changes").
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from megedit.artifacts import atomic_write_json, atomic_write_text

METRICS = ("rel_ag", "rel_tf", "gen_ag", "gen_tf", "loc_ag", "loc_tf", "score")


def per_item(folder: Path, variant: str) -> dict[int, dict]:
    rows = (json.loads(line) for line in (folder / "per_example.jsonl").read_text().splitlines() if line)
    return {r["key"]: r for r in rows if r["variant"] == variant}


def changed(base: dict[int, dict], other: dict[int, dict]) -> dict:
    if base.keys() != other.keys():
        raise ValueError("the folders scored different items: compare sweeps over the same edits")
    return {field: sum(base[k][field] != other[k][field] for k in base) for field in ("tf", "ag", "answer", "familiar")}


def row(folder: Path, variant: str, base_items: dict[int, dict] | None) -> dict:
    res = json.loads((folder / "results.json").read_text())
    meta, metrics = res["metric_meta"], res["results"][variant]
    items = per_item(folder, variant)
    return {"folder": str(folder), "steps": meta.get("steps"), "sampler": meta.get("sampler"),
            "noise_scale": meta.get("noise_scale"), "threshold": meta.get("router_threshold"),
            "items": meta.get("items"), **{m: metrics[m] for m in METRICS},
            "routed_familiar": metrics.get("routing_familiar"), "seconds": res.get("timings_seconds"),
            "items_changed_vs_first": changed(base_items, items) if base_items is not None else None}


def markdown(out: dict) -> str:
    lines = [f"# Sweep: {out['name']}", "", f"`{out['command']}`", "",
             "| folder | steps | threshold | Rel AG | Rel TF | Gen AG | Gen TF | Loc AG | Loc TF | Score | "
             "routed rel/gen/loc % | route s | LM s | items changed vs first (TF/AG/answer/routing) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in out["rows"]:
        fam, sec, ch = r["routed_familiar"] or {}, r["seconds"] or {}, r["items_changed_vs_first"]
        lines.append(f"| {Path(r['folder']).name} | {r['steps']} | {r['threshold']:.3f} | "
                     + " | ".join(f"{r[m]:.2f}" for m in METRICS)
                     + f" | {fam.get('rel')} / {fam.get('gen')} / {fam.get('loc')} | {sec.get('route')} | {sec.get('lm')} | "
                     + ("(first)" if ch is None else f"{ch['tf']} / {ch['ag']} / {ch['answer']} / {ch['familiar']}") + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path, help="evaluate folders; the first is the reference")
    ap.add_argument("--name", required=True)
    ap.add_argument("--variant", default="meg")
    ap.add_argument("--machine", default="", help="where the folders were made (for the record)")
    ap.add_argument("--out", required=True, type=Path, help="writes <out>.json and <out>.md")
    args = ap.parse_args(argv)
    base = per_item(args.folders[0], args.variant)
    rows = [row(f, args.variant, None if i == 0 else base) for i, f in enumerate(args.folders)]
    out = {"name": args.name, "variant": args.variant, "machine": args.machine, "rows": rows,
           "command": shlex.join(["python", "bench/sweep_table.py", *(argv if argv is not None else sys.argv[1:])])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    # Appended, not with_suffix: an --out like "threshold-0.5" keeps its last dot.
    atomic_write_json(f"{args.out}.json", out)
    atomic_write_text(f"{args.out}.md", markdown(out))
    print(markdown(out))
    return out


if __name__ == "__main__":
    main()
