"""The familiarity stage's report, as functions of the routers' entropies (no model, no files): what
``routing_report.json`` and ``router.json`` say, and the histogram figure."""

from __future__ import annotations

import torch

from megedit.data.locality_kinds import LOCALITY_KINDS
from megedit.familiarity.router import auroc, choose_threshold
from megedit.familiarity.threshold import rate


def entropy_summary(x: torch.Tensor) -> dict:
    """Count, mean and 5 / 50 / 95 % quantiles (just the count when empty)."""
    if x.numel() == 0:
        return {"n": 0}
    q = torch.quantile(x.double(), torch.tensor([0.05, 0.5, 0.95], dtype=torch.double)).tolist()
    return {"n": int(x.numel()), "mean": float(x.mean()), "p05": q[0], "median": q[1], "p95": q[2]}


def calibrate(cal: dict[str, torch.Tensor], rule: str, target_fpr: float, negative_kind: torch.Tensor,
              kind_names: list[str], budget_kinds: list[str], counts: dict) -> dict:
    """The threshold ``rule`` picks on the calibration router's entropies, with its AUROC and the
    calibration set's counts."""
    out = choose_threshold(cal["calib_positives"], cal["calib_negatives"], rule, target_fpr,
                           unfamiliar_kind=negative_kind, kind_names=kind_names, budget_kinds=budget_kinds)
    out["auroc"] = auroc(-cal["calib_positives"], -cal["calib_negatives"])
    out["counts"] = counts
    return out


def chosen_threshold(configured, calibration: dict | None, rule: str) -> tuple[float, str]:
    """(threshold, how it was chosen): the calibrated one for ``auto``, else the configured number."""
    if configured == "auto":
        return calibration["threshold"], f"auto ({rule} on pseudo calibration data)"
    return float(configured), "fixed (config)"


def edit_routing(ent: dict[str, torch.Tensor], threshold: float, locality_kinds: list[str]) -> dict:
    """The main router's routing on the edits at ``threshold``: rates, locality by kind, AUROCs and entropy
    summaries (the report's keys, in its order)."""
    kind_mask = {k: torch.tensor([x == k for x in locality_kinds], dtype=torch.bool) for k in LOCALITY_KINDS}
    return {
        "rates": {
            "edit_prompts_familiar": rate(ent["edit_prompts"], threshold, True),
            "edit_paraphrases_familiar": rate(ent["edit_paraphrases"], threshold, True),
            "locality_unfamiliar": rate(ent["locality"], threshold, False),
            # Locality proper: without the prompts that ask the edited fact again (they should be familiar).
            "locality_unfamiliar_excluding_restatements": rate(ent["locality"][~kind_mask["restates_edit"]],
                                                               threshold, False),
        },
        "locality_unfamiliar_by_kind": {k: rate(ent["locality"][m], threshold, False) for k, m in kind_mask.items()},
        "n_locality_by_kind": {k: int(m.sum()) for k, m in kind_mask.items()},
        "auroc": {
            "edit_paraphrases_vs_locality": auroc(-ent["edit_paraphrases"], -ent["locality"]),
            "edit_prompts_vs_locality": auroc(-ent["edit_prompts"], -ent["locality"]),
        },
        "entropy": {k: entropy_summary(v) for k, v in ent.items()},
    }


def shift_summary(shifts: torch.Tensor | None, scale: float, weight: float) -> dict:
    """How many paraphrase displacements the routers learnt from, and how far they move a point."""
    n = 0 if shifts is None else len(shifts)
    out = {"pairs": n, "scale": scale, "weight": weight, "used": n > 0 and weight > 0}
    if n:
        out["median_displacement_norm"] = float(shifts.norm(dim=-1).median())
    return out


def entropies_file(ent: dict[str, torch.Tensor], cal: dict[str, torch.Tensor] | None,
                   negative_kind: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The tensors of ``entropies.safetensors``: ``main.*``, and ``calibration.*`` with the negatives' kinds."""
    out = {f"main.{k}": v for k, v in ent.items()}
    if cal is not None:
        out |= {f"calibration.{k}": v for k, v in cal.items()}
        out["calibration.negative_kind"] = negative_kind
    return out


def summary_line(report: dict, out_dir, epochs: int) -> str:
    """The one line the stage prints when it has written its artifact."""
    r, a = report["rates"], report["auroc"]
    by_kind = {k: None if v is None else round(v, 3) for k, v in report["locality_unfamiliar_by_kind"].items()}
    return (f"familiarity: threshold {report['threshold']:.4f} ({report['threshold_source']}); edit prompts familiar "
            f"{r['edit_prompts_familiar']:.3f}, paraphrases familiar {r['edit_paraphrases_familiar']:.3f}, "
            f"locality unfamiliar {r['locality_unfamiliar']:.3f} (without restatements of the edited fact "
            f"{r['locality_unfamiliar_excluding_restatements'] or float('nan'):.3f}; by kind "
            f"{by_kind}); "
            f"AUROC paraphrase/locality "
            f"{a['edit_paraphrases_vs_locality']:.3f}; {epochs} epochs; wrote {out_dir} "
            f"({report['wall_seconds']} s)")


NEGATIVE_LABELS = ("pseudo-irrelevant prompts", "pseudo locality prompts", "pseudo locality, same subject")


def histogram(ent: dict, cal: dict | None, negative_kind: torch.Tensor | None, threshold: float, top: float,
              bins: int, units: str = "nats", name: str = ""):
    """Score histograms over [0, ``top``] (the router's largest score; entropy in nats, or ``1 - cosine``): the
    edits (evaluation), and the pseudo calibration data that picks the threshold. ``name`` ends the title."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = torch.linspace(0, top, bins + 1).numpy()
    ncols = 2 if cal is not None else 1
    fig, axes = plt.subplots(1, ncols, figsize=(6.5 * ncols, 4), squeeze=False)
    panels = [(axes[0, 0], "edits (evaluation; not used for the threshold)",
               [("edit prompts", ent["edit_prompts"]), ("paraphrases", ent["edit_paraphrases"]),
                ("locality prompts", ent["locality"])])]
    if cal is not None:
        panels.append((axes[0, 1], "pseudo calibration (picks the auto threshold)",
                       [("memorised pseudo prompts", cal["calib_prompts"]),
                        ("held-out pseudo paraphrases", cal["calib_positives"]),
                        *[(label, cal["calib_negatives"][negative_kind == k])
                          for k, label in enumerate(NEGATIVE_LABELS)]]))
    for ax, title, groups in panels:
        for label, x in groups:
            if x.numel():
                ax.hist(x.clamp(0, top).numpy(), bins=edges, alpha=0.55,
                        label=f"{label} (n={x.numel()})", density=True)
        ax.axvline(threshold, color="k", linestyle="--", label=f"threshold {threshold:.3g}")
        ax.set_yscale("log")
        ax.set_xlabel("output entropy (nats)" if units == "nats" else f"score ({units})")
        ax.set_ylabel("density (log)")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"familiarity router, N={len(ent['edit_prompts'])}" + (f", {name}" if name else ""))
    return fig
