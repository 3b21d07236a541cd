"""The threshold and AUROC helpers of the familiarity stage (its files: ``megedit.familiarity.artifact``)."""

from __future__ import annotations

import torch


def auroc(positive: torch.Tensor, negative: torch.Tensor) -> float | None:
    """P(score of a random positive > score of a random negative), ties counted half (Mann-Whitney U)."""
    if positive.numel() == 0 or negative.numel() == 0:
        return None
    scores = torch.cat([positive, negative]).double()
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.double)
    # average ranks over ties
    uniq, inverse = torch.unique(scores, return_inverse=True)
    sums = torch.zeros(len(uniq), dtype=torch.double).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(uniq), dtype=torch.double).index_add_(0, inverse, torch.ones_like(ranks))
    ranks = (sums / counts)[inverse]
    n_pos, n_neg = positive.numel(), negative.numel()
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


CALIBRATION_RULES = ("balanced", "max_fpr", "capped")


def choose_threshold(familiar: torch.Tensor, unfamiliar: torch.Tensor, rule: str = "capped",
                     target_fpr: float = 0.05, unfamiliar_kind: torch.Tensor | None = None,
                     kind_names: list[str] | None = None, min_kind_size: int = 100,
                     budget_kinds: list[str] | None = None) -> dict:
    """Entropy threshold separating ``familiar`` (should fall below) from ``unfamiliar`` entropies.

    FPR (unfamiliar routed familiar) is the *worst* over the kinds of unfamiliar text
    (``unfamiliar_kind[i]`` indexes ``kind_names``) and the pooled rate: easy unrelated prompts must
    not dilute the rate of the hard ones (prompts sharing the edits' relation), which is what
    locality measures. A kind with fewer than ``min_kind_size`` texts only counts in the pooled rate
    (9 texts cannot measure a 5% rate); a larger kind not in ``budget_kinds`` (None: all) is only
    reported, never budgeted, not even through the pooled rate.

    ``balanced``: maximise TPR - FPR (Youden's J). ``max_fpr``: the largest threshold whose FPR
    is at most ``target_fpr``. ``capped``: ``balanced``, but never above the ``max_fpr`` threshold
    (locality has a budget; generality takes what is left). Thresholds lie midway between
    neighbouring observed entropies.
    """
    if familiar.numel() == 0 or unfamiliar.numel() == 0:
        raise ValueError("threshold calibration needs entropies of both familiar and unfamiliar texts")
    if rule not in CALIBRATION_RULES:
        raise ValueError(f"unknown calibration rule {rule!r} ({' | '.join(CALIBRATION_RULES)})")
    if unfamiliar_kind is None:
        unfamiliar_kind = torch.zeros(unfamiliar.numel(), dtype=torch.long)
    if unfamiliar_kind.shape != unfamiliar.shape:
        raise ValueError(f"unfamiliar_kind has shape {tuple(unfamiliar_kind.shape)}, unfamiliar entropies "
                         f"{tuple(unfamiliar.shape)}")
    kinds = [int(k) for k in torch.unique(unfamiliar_kind)]
    names = kind_names or [str(k) for k in range(max(kinds) + 1)]
    values = torch.unique(torch.cat([familiar, unfamiliar]).double())  # sorted
    cands = torch.cat([values[:1] - 1e-6, (values[1:] + values[:-1]) / 2, values[-1:] + 1e-6])
    tpr = (familiar.double().view(1, -1) < cands.view(-1, 1)).double().mean(1)
    fpr_by_kind = torch.stack([(unfamiliar[unfamiliar_kind == k].double().view(1, -1) < cands.view(-1, 1))
                               .double().mean(1) for k in kinds])
    big = [int((unfamiliar_kind == k).sum()) >= min_kind_size for k in kinds]
    wanted = [budget_kinds is None or names[k] in budget_kinds for k in kinds]
    sized = [j for j in range(len(kinds)) if big[j] and wanted[j]]
    ignored = [kinds[j] for j in range(len(kinds)) if big[j] and not wanted[j]]
    counted = ~torch.isin(unfamiliar_kind, torch.tensor(ignored, dtype=unfamiliar_kind.dtype))
    if not counted.any():
        raise ValueError(f"threshold calibration: every kind of unfamiliar text ({[names[k] for k in kinds]}) is "
                         f"left out of the budget (budget_kinds={budget_kinds}); nothing to hold the FPR on")
    pooled = (unfamiliar[counted].double().view(1, -1) < cands.view(-1, 1)).double().mean(1)
    fpr = torch.cat([pooled.view(1, -1), fpr_by_kind[sized]]).max(0).values
    under_budget = (fpr <= target_fpr).nonzero().flatten()
    capped_at = int(under_budget[-1]) if len(under_budget) else 0  # fpr and tpr grow with the threshold
    best = int((tpr - fpr).argmax())
    if rule == "max_fpr":
        best = capped_at
    elif rule == "capped":
        best = min(best, capped_at)
    uses_budget = rule != "balanced"
    return {"threshold": max(float(cands[best]), 0.0), "rule": rule, "target_fpr": target_fpr if uses_budget else None,
            "familiar_rate": float(tpr[best]), "unfamiliar_routed_familiar_rate": float(fpr[best]),
            "unfamiliar_routed_familiar_rate_by_kind": {names[k]: float(fpr_by_kind[j, best])
                                                        for j, k in enumerate(kinds)},
            "kinds_budgeted": [names[kinds[j]] for j in sized], "min_kind_size": min_kind_size,
            "n_familiar": int(familiar.numel()), "n_unfamiliar": int(unfamiliar.numel()),
            "n_unfamiliar_by_kind": {names[k]: int((unfamiliar_kind == k).sum()) for k in kinds}}
