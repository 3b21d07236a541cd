"""Encoder training objectives and retrieval metrics (paper eq. 5 and the Table 4 ablation)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def info_nce(paraphrases: torch.Tensor, originals: torch.Tensor, temperature: float,
             target_offset: int = 0) -> torch.Tensor:
    """Paper eq. 5: paraphrase ``i`` must pick its own original among all originals in the batch.

    ``paraphrases`` [B, H] and ``originals`` [M, H] (M >= B; under DDP the originals of every
    rank, this rank's at rows ``target_offset .. target_offset+B``) are L2-normalised, so the
    dot product is the cosine similarity.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    logits = paraphrases @ originals.T / temperature
    targets = torch.arange(paraphrases.shape[0], device=paraphrases.device) + target_offset
    return F.cross_entropy(logits, targets)


def mse_alignment(paraphrases: torch.Tensor, originals: torch.Tensor) -> torch.Tensor:
    """Table 4's "MSE-tuned" ablation: pull each paraphrase onto its original, with no negatives."""
    return (paraphrases - originals).pow(2).sum(-1).mean()


@torch.no_grad()
def retrieval_metrics(queries: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor) -> dict:
    """Recall@1/@5 and MRR of retrieving ``keys[targets[i]]`` for ``queries[i]`` by cosine similarity.

    Ties count against the query (rank = 1 + number of keys scoring at least as high, other
    than the target), so a collapsed encoder scores recall 0, not 1.
    """
    if queries.shape[0] == 0:
        return {"n_queries": 0, "n_keys": int(keys.shape[0]), "recall@1": None, "recall@5": None, "mrr": None}
    scores = queries @ keys.T
    own = scores.gather(1, targets.view(-1, 1))
    ahead = (scores >= own).sum(1) - 1  # the target itself always satisfies >=
    rank = ahead.float() + 1
    return {"n_queries": int(queries.shape[0]), "n_keys": int(keys.shape[0]),
            "recall@1": float((rank == 1).float().mean()), "recall@5": float((rank <= 5).float().mean()),
            "mrr": float((1.0 / rank).mean())}


def info_nce_with_hard_negatives(anchors: torch.Tensor, positives: torch.Tensor, hard_negatives: torch.Tensor,
                                 temperature: float) -> torch.Tensor:
    """Both directions of eq. 5 with extra candidates: row ``j`` of (anchor, positive, hard negative) triples.

    The positive must pick its anchor among every anchor and every hard negative, and the anchor
    its positive among every positive and every hard negative. The second direction is the one
    the router needs: it memorises the anchors (edit prompts), so a hard negative (another fact
    about the same subject) must sit farther from the anchor than a paraphrase does.
    """
    if hard_negatives.shape[0] != anchors.shape[0]:
        raise ValueError(f"one hard negative per triple: {anchors.shape[0]} anchors, {hard_negatives.shape[0]} negatives")
    to_anchor = info_nce(positives, torch.cat([anchors, hard_negatives]), temperature)
    to_positive = info_nce(anchors, torch.cat([positives, hard_negatives]), temperature)
    return (to_anchor + to_positive) / 2


@torch.no_grad()
def pairwise_auc(higher: torch.Tensor, lower: torch.Tensor) -> float | None:
    """P(a random ``higher`` score beats a random ``lower`` one), ties counting half (AUROC)."""
    if higher.numel() == 0 or lower.numel() == 0:
        return None
    diff = higher.view(-1, 1) - lower.view(1, -1)
    return float((diff > 0).float().mean() + 0.5 * (diff == 0).float().mean())
