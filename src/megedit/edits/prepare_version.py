"""The prepare artifact of a run version that adds edits.

Its ``edits.jsonl`` is the parent's rows (verbatim, pre-edit answers included) minus the edits the new ones
replace, then the new edits' rows, answered by the base LM exactly as the prepare stage answers
(``megedit.prepare.answers``). The pseudo sets are the parent's, less every pseudo text that is an evaluation
text of a new edit or mentions a new edit's subject: the rule the prepare stage's split applies to its own
edits (``megedit.data.splits.PseudoFilter``), so the router and the generator, which are fine-tuned on these
sets, never learn a new edit's paraphrase as a negative. The lineage stays the run's; the manifest lists the
manifests it extends under ``ancestors``, which is how the (unchanged) encoder accepts it.
"""

from __future__ import annotations

import time
from pathlib import Path

from megedit.artifacts import (ANCESTORS, MANIFEST, atomic_write_json, atomic_write_jsonl, mark_stage_start, read_jsonl,
                               sha256_file, write_manifest)
from megedit.data.splits import PseudoFilter
from megedit.edits.new_edits import AddPlan
from megedit.prepare.artifact import FILES, Prepared, load_prepared


def filter_pseudo(parent: Prepared, new_edits) -> tuple[dict[str, list], dict[str, int]]:
    """The parent's pseudo sets without any text that leaks a new edit; and how many were dropped per set."""
    clean = PseudoFilter(list(new_edits)).clean
    pseudo_edits = [r for r in parent.pseudo_edits if clean([r.prompt, *r.paraphrases])]
    irrelevant = [r for r in parent.pseudo_irrelevant if clean([r["prompt"]])]
    groups: dict[str, list[dict]] = {}
    for pair in parent.pseudo_pairs:
        groups.setdefault(pair["group"], []).append(pair)
    kept_groups = {g for g, pairs in groups.items() if clean([t for p in pairs for t in (p["anchor"], p["positive"])])}
    pairs = [p for p in parent.pseudo_pairs if p["group"] in kept_groups]
    sets = {"pseudo_edits": [r.to_dict() for r in pseudo_edits], "pseudo_irrelevant": irrelevant, "pseudo_pairs": pairs}
    dropped = {"pseudo_edits": len(parent.pseudo_edits) - len(pseudo_edits),
               "pseudo_irrelevant": len(parent.pseudo_irrelevant) - len(irrelevant),
               "pseudo_pair_groups": len(groups) - len(kept_groups)}
    return sets, dropped


def write_prepare_version(out: Path, parent: Prepared, plan: AddPlan, new_rows: list[dict], input_files: dict,
                          version: int) -> Prepared:
    """Write the version's prepare artifact to ``out`` and return it loaded (manifest last)."""
    mark_stage_start()
    started = time.time()
    out.mkdir(parents=True, exist_ok=True)
    kept = [row for row in read_jsonl(parent.dir / FILES["edits"]) if row["id"] not in plan.replaced]
    rows = kept + new_rows
    sets, dropped = filter_pseudo(parent, plan.new)
    atomic_write_jsonl(out / FILES["edits"], rows)
    for name, items in sets.items():
        atomic_write_jsonl(out / FILES[name], items)
    report = {"version": version, "parent_prepare": str(parent.dir), "edits": len(rows), "kept_from_parent": len(kept),
              **plan.summary(), "new_base_model_already_correct": sum(r["base_correct"] for r in new_rows),
              "pseudo_dropped_for_new_edits": dropped,
              "prompts_answered": sum(1 + len(r["paraphrases"]) + len(r["locality"]) for r in new_rows),
              "wall_seconds": round(time.time() - started, 1)}
    atomic_write_json(out / FILES["report"], report)
    parent_manifest = parent.dir / MANIFEST
    write_manifest(out, "prepare", parent.lineage, config=parent.manifest["config"], outputs=list(FILES.values()),
                   input_files={**{f"parent:{FILES['edits']}": parent.dir / FILES["edits"]}, **input_files},
                   extra={"model_spec": parent.manifest["model_spec"],
                          ANCESTORS: [*parent.manifest.get(ANCESTORS, []), sha256_file(parent_manifest)],
                          "version": {"number": version, "n_edits": len(rows), "first_new_edit": len(kept)}})
    return load_prepared(out)
