"""Re-pick or inspect a trained router's entropy threshold from its saved entropies, without retraining.

``megedit threshold RUN/familiarity`` reads ``entropies.safetensors`` (every entropy behind the
stage's report) and prints, for the threshold a calibration rule and FPR budget give on the pseudo
calibration data (or for a threshold you name), the pseudo rates the choice rests on and the
routing rates it gives on the edits (a diagnostic: the edits' paraphrases and locality prompts
never pick the threshold). ``--curve PNG`` plots every rate against the threshold. Nothing in the
artifact changes; evaluate a chosen value with ``evaluate --model.router_threshold T``
(``make sweep-threshold THRESHOLDS="..."`` for several).

The stage writes the same curve as ``routing_curve.png`` (``routing_curve``).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from megedit.artifacts import atomic_path, atomic_write_json
from megedit.familiarity.artifact import SCORE_UNITS, load_entropies, max_score, read_router_config, router_kind
from megedit.familiarity.router import CALIBRATION_RULES, choose_threshold

# The main router's groups and which way each should fall (True: below the threshold, i.e. familiar).
EDIT_GROUPS = (("edit_prompts", "edit prompts familiar", True),
               ("edit_paraphrases", "paraphrases familiar", True),
               ("locality", "locality unfamiliar", False))


def rate(x: torch.Tensor, threshold: float, familiar: bool) -> float | None:
    """Share of ``x`` on the expected side of ``threshold`` (familiar: below it), None when empty."""
    if x.numel() == 0:
        return None
    return float((x < threshold).float().mean() if familiar else (x >= threshold).float().mean())


def edit_rates(ent: dict[str, torch.Tensor], threshold: float) -> dict[str, float | None]:
    """Routing rates of the main router on the edits at ``threshold``, named as in the report's ``rates``
    (all of them but the one without restatements: locality kinds are not in the entropies file)."""
    return {f"{g}_{'familiar' if fam else 'unfamiliar'}": rate(ent[f"main.{g}"], threshold, fam)
            for g, _, fam in EDIT_GROUPS}


def pseudo_rates(ent: dict[str, torch.Tensor], threshold: float, kind_names: list[str]) -> dict | None:
    """The calibration router's rates at ``threshold``: held-out pseudo paraphrases familiar, and each kind
    of pseudo negative unfamiliar (None without calibration data)."""
    if "calibration.calib_positives" not in ent:
        return None
    neg, kind = ent["calibration.calib_negatives"], ent["calibration.negative_kind"]
    by_kind = {name: rate(neg[kind == k], threshold, False) for k, name in enumerate(kind_names)}
    return {"paraphrases_familiar": rate(ent["calibration.calib_positives"], threshold, True),
            "negatives_unfamiliar_by_kind": {k: v for k, v in by_kind.items() if v is not None}}


def routing_curve(ent: dict[str, torch.Tensor], threshold: float, kind_names: list[str], title: str = "",
                  max_entropy: float | None = None, units: str = "nats"):
    """Every routing rate against the threshold (log x), the chosen one marked: a matplotlib figure.

    Solid lines: the main router on the edits (diagnostic). Dashed: the calibration router on pseudo data
    (familiar rate of held-out paraphrases; unfamiliar rate per kind of negative), which picks ``auto``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = torch.cat([v.flatten().double() for k, v in ent.items() if k != "calibration.negative_kind"])
    lo = max(float(values[values > 0].min()) if (values > 0).any() else 1e-6, 1e-6)
    hi = max_entropy or float(values.max())
    grid = torch.logspace(math.log10(lo), math.log10(max(hi, lo * 10)), 400)

    def curve(x: torch.Tensor, familiar: bool) -> list[float]:
        below = (x.double().view(1, -1) < grid.view(-1, 1)).double().mean(1)
        return (below if familiar else 1 - below).tolist()

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for g, label, fam in EDIT_GROUPS:
        x = ent[f"main.{g}"]
        if x.numel():
            ax.plot(grid, curve(x, fam), label=f"{label} (n={x.numel()})")
    if "calibration.calib_positives" in ent:
        ax.plot(grid, curve(ent["calibration.calib_positives"], True), "--",
                label=f"pseudo paraphrases familiar (n={ent['calibration.calib_positives'].numel()})")
        neg, kind = ent["calibration.calib_negatives"], ent["calibration.negative_kind"]
        for k, name in enumerate(kind_names):
            x = neg[kind == k]
            if x.numel():
                ax.plot(grid, curve(x, False), ":", label=f"{name} unfamiliar (n={x.numel()})")
    ax.axvline(threshold, color="k", linestyle="--", linewidth=1, label=f"threshold {threshold:.3g}")
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("entropy threshold (nats; familiar iff entropy < threshold)" if units == "nats" else
                  f"score threshold ({units}; familiar iff score < threshold)")
    ax.set_ylabel("share on the expected side")
    ax.grid(alpha=0.3)
    ax.set_title(title or "routing rates against the threshold", fontsize=10)
    ax.legend(fontsize=7, loc="lower left")
    return fig


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="megedit threshold", description=__doc__.splitlines()[0])
    ap.add_argument("familiarity_dir", help="a familiarity stage output folder")
    ap.add_argument("--rule", choices=CALIBRATION_RULES, help="calibration rule (default: the run's own)")
    ap.add_argument("--target-fpr", type=float, help="FPR budget of capped / max_fpr (default: the run's own)")
    ap.add_argument("--budget-kinds", nargs="+", help="kinds of pseudo negative the budget holds for "
                    "(default: the run's own)")
    ap.add_argument("--threshold", type=float, help="report this threshold instead of picking one")
    ap.add_argument("--curve", help="write the routing-rate curve here (PNG)")
    ap.add_argument("--json", help="write the result here (JSON)")
    return ap


def _pick_on_pseudo(ent: dict[str, torch.Tensor], kinds: list[str], rule: str, fpr: float, budget: list[str]) -> dict:
    """``choose_threshold`` on the run's pseudo calibration data, called as the stage calls it
    (``FamiliarityModule._write``: same tensors, kinds and default ``min_kind_size``)."""
    unknown = set(budget) - set(kinds)
    if unknown:
        raise SystemExit(f"budget kinds {sorted(unknown)} are not kinds of this run's calibration negatives ({kinds})")
    return choose_threshold(ent["calibration.calib_positives"], ent["calibration.calib_negatives"], rule, fpr,
                            unfamiliar_kind=ent["calibration.negative_kind"], kind_names=kinds,
                            budget_kinds=list(budget))


def _choose(args, folder: Path, ent, kinds: list[str], cfg: dict, hp: dict) -> tuple[float, str, dict | None]:
    """``(threshold, where it comes from, the pick's summary or None)``: the one named, else the run's own
    fixed threshold, else a pick with the asked rule / budget, each falling back to the run's own."""
    asked_to_pick = args.rule is not None or args.target_fpr is not None or args.budget_kinds is not None
    if args.threshold is not None:
        if asked_to_pick:
            raise SystemExit("--threshold names a threshold; --rule, --target-fpr and --budget-kinds pick one: "
                             "give one or the other")
        return args.threshold, "given (--threshold)", None
    if not asked_to_pick and hp.get("threshold") != "auto":
        # A run trained with a fixed threshold: report that one, not what auto would have picked.
        return float(cfg["threshold"]), cfg.get("threshold_source", "fixed (config)"), None
    if "calibration.calib_positives" not in ent:
        raise SystemExit(f"{folder}: trained without calibration data (data.calibrate false): nothing to pick a "
                         "threshold on; pass --threshold to inspect one")
    rule = args.rule or hp["calibration_rule"]
    fpr = args.target_fpr if args.target_fpr is not None else hp["target_fpr"]
    pick = _pick_on_pseudo(ent, kinds, rule, fpr, args.budget_kinds or hp["budget_kinds"])
    source = ("balanced (max TPR - FPR)" if rule == "balanced" else f"{rule} at FPR budget {fpr}") + \
        " on the pseudo calibration data" + ("" if asked_to_pick else " (the run's own rule)")
    summary = {k: pick[k] for k in ("rule", "target_fpr", "kinds_budgeted", "familiar_rate",
                                    "unfamiliar_routed_familiar_rate")}
    return pick["threshold"], source, summary


def report_lines(folder, result: dict) -> list[str]:
    """The printed summary of a ``megedit threshold`` result."""
    threshold, source = result["threshold"], result["threshold_source"]
    lines = [f"{folder}: threshold {threshold:.4g} ({source}); trained with {result['trained_threshold']:.4g}"]
    if not threshold > 0:
        lines.append("  warning: a threshold <= 0 routes no query familiar (no entropy is negative)")
    if result["pseudo"] is not None:
        p = result["pseudo"]
        by_kind = ", ".join(f"{k} {v:.3f}" for k, v in p["negatives_unfamiliar_by_kind"].items())
        line = f"  pseudo calibration: paraphrases familiar {p['paraphrases_familiar']:.3f}; negatives unfamiliar {by_kind}"
        if "pick" in result:
            q = result["pick"]
            line += (f"; worst budgeted ({', '.join(q['kinds_budgeted']) or 'pooled'}) routed familiar "
                     f"{q['unfamiliar_routed_familiar_rate']:.3f}")
        lines.append(line)
    labels = [label for _, label, _ in EDIT_GROUPS]  # edit_rates keeps EDIT_GROUPS' order
    lines.append("  edits (diagnostic): " + ", ".join(f"{label} {v:.3f}" for label, v
                                                      in zip(labels, result["edits"].values()) if v is not None))
    lines.append(f"  evaluate it: stages/evaluate.py ... --model.router_threshold {threshold:.6g}")
    return lines


def _write_curve(path: str, ent, result: dict, kinds: list[str], folder: Path, cfg: dict) -> None:
    import matplotlib.pyplot as plt

    # The x axis ends at the largest score the router can give (for the net: a K-class output's entropy).
    kind = router_kind(cfg)
    fig = routing_curve(ent, result["threshold"], kinds, title=f"{folder}: {result['threshold_source']}",
                        max_entropy=max_score(kind, (cfg.get("architecture") or {}).get("num_classes")),
                        units=SCORE_UNITS[kind])
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    folder = Path(args.familiarity_dir)
    ent, kinds, manifest = load_entropies(folder)
    cfg = read_router_config(folder)
    threshold, source, pick = _choose(args, folder, ent, kinds, cfg, manifest["config"]["model"])
    result: dict = {"familiarity_dir": str(folder), "router": router_kind(cfg),
                    "trained_threshold": cfg["threshold"],
                    "trained_threshold_source": cfg.get("threshold_source")}
    if pick is not None:
        result["pick"] = pick
    result.update(threshold=threshold, threshold_source=source, pseudo=pseudo_rates(ent, threshold, kinds),
                  edits=edit_rates(ent, threshold))
    print("\n".join(report_lines(folder, result)))
    if args.curve:
        _write_curve(args.curve, ent, result, kinds, folder, cfg)
        print(f"  wrote {args.curve}")
    if args.json:
        atomic_write_json(args.json, result)
    return 0
