"""Readable outputs of the evaluate stage: a table shaped like the paper's Table 1 and a bar chart."""

from __future__ import annotations

from pathlib import Path

from megedit.evaluate.metrics import metric_names
from megedit.plots import grouped_bars

LABELS = {"meg": "MeG", "meg_no_router": "MeG w/o FN", "meg_retrieval": "MeG, collected neuron of nearest edit",
          "base": "base LM (unedited)", "ft": "FT", "memit": "MEMIT", "alphaedit": "AlphaEdit"}


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _secs(v) -> str:
    return "n/a" if v is None else f"{v:.0f}"


def _peer_notes(summary: dict) -> list[str]:
    """One line per peer saying what it did (FT: epochs and whether it reached its reliability target)."""
    notes = []
    for variant, acc in summary.get("peers", {}).items():
        if variant == "ft":
            goal = acc.get("target_reliability")
            reached = "reached" if acc.get("reached_target") else "did not reach"
            last = acc["reliability"][-1] if acc.get("reliability") else None
            notes.append(f"FT: {acc.get('trained')}, lr {acc.get('lr')}, {acc.get('epochs')} of {acc.get('epoch_budget')} "
                         f"epochs; " + (f"{reached} its target reliability {goal} (last {last})." if goal else
                                         "no reliability target."))
        else:
            notes.append(f"{LABELS.get(variant, variant)}: layers {acc.get('layers')}, {acc.get('n_edits')} edits "
                         f"at once, {acc.get('time_s')} s.")
    for variant, why in summary.get("skipped", {}).items():
        notes.append(f"{LABELS.get(variant, variant)}: skipped ({why}).")
    return ["", *notes] if notes else []


def results_table(summary: dict) -> str:
    lin, meta = summary["lineage"], summary["metric_meta"]
    lines = [f"# {lin['model']} / {lin['dataset']} / N={meta['n_edits']}", "",
             "| Method | Rel AG | Rel TF | Gen AG | Gen TF | Loc AG | Loc TF | Score | routed familiar (rel/gen/loc %) "
             "| edit / scoring s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    seconds = summary.get("method_seconds", {})
    for variant, r in summary["results"].items():
        fam = r["routing_familiar"]
        routed = "none (weights edited)" if variant in summary.get("peers", {}) else \
            f"{_fmt(fam['rel'])} / {_fmt(fam['gen'])} / {_fmt(fam['loc'])}"
        sec = seconds.get(variant, {})
        lines.append(f"| {LABELS.get(variant, variant)} | {_fmt(r['rel_ag'])} | {_fmt(r['rel_tf'])} | "
                     f"{_fmt(r['gen_ag'])} | {_fmt(r['gen_tf'])} | {_fmt(r['loc_ag'])} | {_fmt(r['loc_tf'])} | "
                     f"**{_fmt(r['score'])}** | {routed} | {_secs(sec.get('edit'))} / {_secs(sec.get('evaluate'))} |")
    lines += _peer_notes(summary)
    lines += locality_table(summary)
    lines += multi_hop_table(summary)
    lines += ["", f"AG protocol: `{meta['ag_protocol']}`: {meta['ag']}.", f"TF: {meta['tf']}.",
              f"Locality reference: {meta['locality_reference']}. Score: {meta['score']}.",
              f"Sampler: {meta['sampler']}, {meta['steps']} steps; router threshold {meta['router_threshold']:.4g}; "
              f"items: {meta['items']}.", ""]
    return "\n".join(lines)


KIND_LABELS = {"other": "unrelated", "same_subject": "same subject, other fact",
               "restates_edit": "restates the edited fact"}


def locality_table(summary: dict) -> list[str]:
    """Locality AG / TF and the routed-familiar rate per kind of locality prompt, when there is more than
    one kind (ZsRE's KnowEdit prompts about the edited subject); empty otherwise."""
    parts = {v: r.get("locality") for v, r in summary["results"].items() if r.get("locality")}
    kinds = sorted({k for p in parts.values() for k in p["by_kind"]}, key=list(KIND_LABELS).index)
    if kinds == ["other"] or not kinds:
        return []
    first = next(iter(parts.values()))["by_kind"]
    head = " | ".join(f"{KIND_LABELS[k]} (n={first[k]['n']})" for k in kinds if k in first)
    lines = ["", "Locality by kind of prompt: AG / TF / routed familiar (%).", "",
             f"| Method | {head} | Loc AG / TF and Score without restatements |",
             "|---|" + "---|" * len(kinds) + "---|"]
    for variant, p in parts.items():
        cells = [" / ".join(_fmt(p["by_kind"][k][m]) for m in ("loc_ag", "loc_tf", "familiar")) if k in p["by_kind"]
                 else "n/a" for k in kinds]
        ex = p.get("excluding_restatements")
        tail = f"{_fmt(ex['loc_ag'])} / {_fmt(ex['loc_tf'])}, **{_fmt(ex['score'])}**" if ex else "n/a"
        lines.append(f"| {LABELS.get(variant, variant)} | " + " | ".join(cells) + f" | {tail} |")
    return lines


def multi_hop_table(summary: dict) -> list[str]:
    """MQuAKE's table (paper Table 18: edit-wise, instance-wise, multi-hop), when the run has multi-hop items."""
    parts = {v: r["multi_hop"] for v, r in summary["results"].items() if r.get("multi_hop")}
    if not parts:
        return []
    first = next(iter(parts.values()))
    lines = ["", f"MQuAKE ({first['n_instances']} instances, {first['n_questions']} multi-hop questions; %): a multi-hop "
                 "question is right when its greedy answer starts with the new answer or an alias, an instance "
                 "when any of its questions is.", "",
             "| Method | Edit-wise | Instance-wise | Multi-hop (instance) | Multi-hop (question) | Multi-hop TF "
             "| routed familiar |", "|---|---|---|---|---|---|---|"]
    for variant, m in parts.items():
        lines.append(f"| {LABELS.get(variant, variant)} | {_fmt(m['edit_wise'])} | {_fmt(m['instance_wise'])} | "
                     f"**{_fmt(m['multi_hop_instance'])}** | {_fmt(m['multi_hop_question'])} | {_fmt(m['multi_hop_tf'])} "
                     f"| {_fmt(m['multi_hop_familiar'])} |")
    return lines


def bar_chart(summary: dict, path: Path) -> None:
    names = metric_names() + ["score"]
    series = {LABELS.get(v, v): [r[n] or 0.0 for n in names] for v, r in summary["results"].items()}
    lin = summary["lineage"]
    grouped_bars(path, series, [n.replace("_", " ").upper() for n in names], ylabel="%", ylim=105,
                 title=f"{lin['model']} / {lin['dataset']} / N={summary['metric_meta']['n_edits']}",
                 legend_loc="lower right")
