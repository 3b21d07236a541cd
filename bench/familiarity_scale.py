"""Does the familiarity router stay sharp as N grows? (issue: "must stay sharp at N=10k")

For each N it memorises N pseudo originals (random labels, the stage's own recipe and
convergence rule), then scores paraphrases of the memorised originals that the encoder never
trained on (should be familiar) against pseudo-irrelevant prompts (should not). Baseline,
measured in the same run on the same embeddings: a nearest-neighbour router that calls a
query familiar when its best cosine similarity to the memorised set is high.

    python bench/familiarity_scale.py --prepare runs/smollm2-counterfact-1024/prepare \
        --encoder runs/smollm2-counterfact-1024/encoder --n 1024 4096 10000 --out bench/results/familiarity_scale.json

Prints one line per N and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from megedit.artifacts import atomic_write_json
from megedit.components.familiarity_net import FamiliarityNet, FamiliarityRouter, entropy_from_logits
from megedit.components.text_encoder import TextEncoder
from megedit.encoder.encoder_datamodule import group_pairs
from megedit.familiarity.familiarity_module import random_labels
from megedit.familiarity.router import auroc, choose_threshold
from megedit.prepare.artifact import load_prepared


def train_router(emb: torch.Tensor, k: int, seed: int, max_epochs: int, converge_entropy: float,
                 batch_size: int = 256, lr: float = 1e-3) -> tuple[FamiliarityNet, int]:
    torch.manual_seed(seed)
    net = FamiliarityNet(emb.shape[1], k)
    labels = random_labels(len(emb), k, seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for epoch in range(1, max_epochs + 1):
        net.train()
        for idx in torch.randperm(len(emb)).split(batch_size):
            loss = F.cross_entropy(net(emb[idx]), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            logits = torch.cat([net(emb[i:i + 4096]) for i in range(0, len(emb), 4096)])
        if (logits.argmax(-1) == labels).all() and entropy_from_logits(logits).mean() < converge_entropy:
            return net, epoch
    return net, max_epochs


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepare", required=True)
    ap.add_argument("--encoder", required=True, help="encoder artifact dir (its held-out groups are the positives)")
    ap.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 10000])
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--max-epochs", type=int, default=300)
    ap.add_argument("--converge-entropy", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/familiarity_scale.json")
    args = ap.parse_args(argv)

    prep = load_prepared(args.prepare)
    heldout = set(json.loads((Path(args.encoder) / "heldout_groups.json").read_text())["groups"])
    groups = group_pairs(prep.pseudo_pairs)
    held = [(g["anchor"], g["positives"]) for gid, g in groups.items() if gid in heldout]
    negatives = [r["prompt"] for r in prep.pseudo_irrelevant]
    filler = sorted({g["anchor"] for gid, g in groups.items() if gid not in heldout} - set(negatives))
    random.Random(args.seed).shuffle(filler)
    if max(args.n) > len(held) + len(filler):
        raise SystemExit(f"only {len(held) + len(filler)} pseudo originals available, fewer than N={max(args.n)}")

    encoder = TextEncoder.from_source(str(Path(args.encoder) / "encoder"))
    t0 = time.time()
    anchors = [a for a, _ in held]
    positives = [p for _, ps in held for p in ps]
    owner = torch.tensor([k for k, (_, ps) in enumerate(held) for _ in ps])
    emb_anchor = encoder.embed(anchors, 256, progress=True)
    emb_pos = encoder.embed(positives, 256, progress=True)
    emb_neg = encoder.embed(negatives, 256, progress=True)
    emb_fill = encoder.embed(filler[: max(args.n) - len(held)], 256, progress=True)
    embed_seconds = time.time() - t0

    results = {"prepare": args.prepare, "encoder": args.encoder, "k": args.k, "positives": len(positives),
               "negatives": len(negatives), "embed_seconds": round(embed_seconds, 1), "runs": []}
    for n in args.n:
        memorised = torch.cat([emb_anchor, emb_fill[: n - len(held)]])
        t = time.time()
        net, epochs = train_router(memorised, args.k, args.seed, args.max_epochs, args.converge_entropy)
        train_seconds = time.time() - t
        router = FamiliarityRouter(net, threshold=0.0)
        e_mem, e_pos, e_neg = router.entropy(memorised), router.entropy(emb_pos), router.entropy(emb_neg)
        cal = choose_threshold(e_pos, e_neg, "balanced")
        # Baseline: nearest-neighbour cosine to the memorised set (higher = more familiar).
        nn_pos = (emb_pos @ memorised.T).max(1).values
        nn_neg = (emb_neg @ memorised.T).max(1).values
        nn_cal = choose_threshold(-nn_pos, -nn_neg, "balanced")
        row = {"n": n, "epochs": epochs, "train_seconds": round(train_seconds, 1),
               "memorised_mean_entropy": float(e_mem.mean()),
               "router": {"auroc": auroc(-e_pos, -e_neg), "threshold": cal["threshold"],
                          "paraphrases_familiar": cal["familiar_rate"],
                          "irrelevant_unfamiliar": 1 - cal["unfamiliar_routed_familiar_rate"],
                          "paraphrase_median_entropy": float(e_pos.median()),
                          "irrelevant_median_entropy": float(e_neg.median())},
               "nearest_neighbour_baseline": {"auroc": auroc(nn_pos, nn_neg),
                                              "paraphrases_familiar": nn_cal["familiar_rate"],
                                              "irrelevant_unfamiliar": 1 - nn_cal["unfamiliar_routed_familiar_rate"]}}
        results["runs"].append(row)
        r, b = row["router"], row["nearest_neighbour_baseline"]
        print(f"N={n:>6}: router AUROC {r['auroc']:.4f} (para familiar {r['paraphrases_familiar']:.3f}, irrelevant "
              f"unfamiliar {r['irrelevant_unfamiliar']:.3f}, threshold {r['threshold']:.3f}, {epochs} epochs, "
              f"{train_seconds:.0f} s) | nearest-neighbour AUROC {b['auroc']:.4f} "
              f"({b['paraphrases_familiar']:.3f} / {b['irrelevant_unfamiliar']:.3f})", flush=True)
    atomic_write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
