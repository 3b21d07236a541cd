"""Does the familiarity router stay sharp as N grows? (issue 4: "must stay sharp at N=10k")

For each N, a router memorises N pseudo originals with random labels, then scores paraphrases of
memorised originals that the encoder never trained on (should be familiar) against prompts it never
saw (should not): pseudo-irrelevant prompts, and the locality prompts of the memorised pseudo edits
(their neighbours: the same kind of text the evaluation's locality prompts are to the edits). The
same texts and embeddings serve three routers, all in this run:

* ``megedit``: the familiarity stage's shipped recipe, read from ``configs/stages/familiarity.yaml``
  (training negatives, max(train_negatives, negatives_per_edit x N) as far as the pools hold them;
  lr halved on an entropy plateau; the stage's convergence rule);
* ``paper``: positives only at a constant lr (the paper's eq. 6 recipe), the baseline;
* ``nearest-neighbour``: a query is familiar when its best cosine to the memorised set is high.

Each is read at its own best threshold (``balanced``: max TPR - FPR) and at the stage's rule
(``capped`` at the config's FPR budget, on the worst kind of negative). The thresholds are picked on
the very texts they are scored on, so these are the routers' separation, not a deployment estimate
(the stage calibrates on one set of pseudo data and is measured on the real edits).

    python bench/familiarity_scale.py --prepare runs/smollm2-counterfact-1024/prepare \
        --encoder runs/smollm2-counterfact-1024/encoder --n 1024 4096 10000

Prints a table (ratios megedit / paper) and writes JSON (default bench/results/familiarity_scale.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import time
from pathlib import Path

import torch
import yaml

from megedit.artifacts import atomic_write_json
from megedit.components.familiarity_net import FamiliarityNet, FamiliarityRouter, entropy_from_logits
from megedit.components.text_encoder import TextEncoder
from megedit.data.locality_kinds import normalise
from megedit.encoder.encoder_datamodule import group_pairs
from megedit.familiarity.familiarity_module import random_labels, router_loss
from megedit.familiarity.router import auroc, choose_threshold
from megedit.prepare.artifact import load_prepared

STAGE_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "stages" / "familiarity.yaml"
KINDS = ["pseudo_irrelevant", "pseudo_locality"]


def stage_recipe(path: Path = STAGE_CONFIG) -> dict:
    """The familiarity stage's shipped training recipe (its model and data defaults)."""
    cfg = yaml.safe_load(path.read_text())
    m, d = cfg["model"], cfg["data"]
    return {"num_classes": m["num_classes"], "depth": m["depth"], "hidden_mult": m["hidden_mult"],
            "width": m["width"], "lr": m["lr"], "seed": m["seed"], "converge_entropy": m["converge_entropy"],
            "min_epochs": m["min_epochs"], "max_epochs": cfg["trainer"]["max_epochs"],
            "plateau_patience": m["plateau_patience"], "plateau_factor": m["plateau_factor"], "min_lr": m["min_lr"],
            "negative_weight": m["negative_weight"], "target_fpr": m["target_fpr"], "batch_size": d["batch_size"],
            "train_negatives": d["train_negatives"], "negatives_per_edit": d["negatives_per_edit"]}


@torch.no_grad()
def fit_state(net: FamiliarityNet, emb: torch.Tensor, labels: torch.Tensor) -> tuple[bool, float]:
    net.eval()
    logits = torch.cat([net(emb[i:i + 4096]) for i in range(0, len(emb), 4096)])
    net.train()
    return bool((logits.argmax(-1) == labels).all()), float(entropy_from_logits(logits).mean())


def train_router(emb: torch.Tensor, negatives: torch.Tensor | None, r: dict,
                 plateau: bool) -> tuple[FamiliarityNet, int, bool]:
    """One router, trained as the stage trains its main router (same loss, schedule and stopping rule)."""
    torch.manual_seed(r["seed"])
    net = FamiliarityNet(emb.shape[1], r["num_classes"], r["depth"], r["hidden_mult"], r["width"])
    labels = random_labels(len(emb), r["num_classes"], r["seed"])
    opt = torch.optim.Adam(net.parameters(), lr=r["lr"])
    bs = min(r["batch_size"], len(emb))
    steps_per_epoch = math.ceil(len(emb) / bs)
    sched = (torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=r["plateau_factor"],
                                                        patience=math.ceil(r["plateau_patience"] / steps_per_epoch),
                                                        min_lr=r["min_lr"])
             if plateau and r["plateau_patience"] > 0 else None)
    gen = torch.Generator().manual_seed(r["seed"])
    for epoch in range(1, r["max_epochs"] + 1):
        for idx in torch.randperm(len(emb), generator=gen).split(bs):
            neg = None
            if negatives is not None:
                neg = negatives[torch.randint(len(negatives), (len(idx),), generator=gen)]
            loss, _ = router_loss(net, emb[idx], labels[idx], neg, r["negative_weight"])
            opt.zero_grad()
            loss.backward()
            opt.step()
        all_right, mean_entropy = fit_state(net, emb, labels)
        if all_right and mean_entropy < r["converge_entropy"] and epoch >= r["min_epochs"]:
            return net.eval(), epoch, True
        if sched is not None:
            sched.step(mean_entropy)
    return net.eval(), r["max_epochs"], False


def read_out(pos: torch.Tensor, neg: torch.Tensor, neg_kind: torch.Tensor, target_fpr: float) -> dict:
    """Rates at the balanced and at the stage's capped threshold; lower score = more familiar."""
    out = {"auroc": auroc(-pos, -neg)}
    for rule in ("balanced", "capped"):
        c = choose_threshold(pos, neg, rule, target_fpr, unfamiliar_kind=neg_kind, kind_names=KINDS)
        out[rule] = {"threshold": c["threshold"], "paraphrases_familiar": c["familiar_rate"],
                     "negatives_unfamiliar_worst_kind": 1 - c["unfamiliar_routed_familiar_rate"],
                     "unfamiliar_by_kind": {k: 1 - v for k, v in c["unfamiliar_routed_familiar_rate_by_kind"].items()}}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepare", required=True)
    ap.add_argument("--encoder", required=True, help="encoder artifact dir (its held-out groups are the positives)")
    ap.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 10000])
    ap.add_argument("--max-positive-groups", type=int, default=1000,
                    help="held-out pseudo originals whose paraphrases are scored (memorised at every N)")
    ap.add_argument("--max-negatives", type=int, default=4000, help="cap per kind of scored negative")
    ap.add_argument("--out", default="bench/results/familiarity_scale.json")
    args = ap.parse_args(argv)
    recipe = stage_recipe()
    rng = random.Random(recipe["seed"])

    prep = load_prepared(args.prepare)
    heldout = set(json.loads((Path(args.encoder) / "heldout_groups.json").read_text())["groups"])
    groups = group_pairs(prep.pseudo_pairs)
    irrelevant = sorted({r["prompt"] for r in prep.pseudo_irrelevant})
    held = [g for gid, g in groups.items() if gid in heldout and g["anchor"] not in irrelevant]
    rng.shuffle(held)
    # One memorised point per text (the encoder is uncased): two groups with one original would ask the
    # router for two random labels on one embedding, which it can never fit.
    by_text: dict[str, dict] = {}
    for g in held:
        by_text.setdefault(normalise(g["anchor"]), g)
    held = list(by_text.values())[: args.max_positive_groups]
    anchors = [g["anchor"] for g in held]
    anchor_keys = {normalise(a) for a in anchors}
    positives = sorted({p for g in held for p in g["positives"] if normalise(p) not in anchor_keys})
    positive_keys = {normalise(p) for p in positives}
    irrelevant_keys = {normalise(t) for t in irrelevant}
    filler_by_key = {normalise(g["anchor"]): g["anchor"] for g in groups.values()}
    filler = sorted(t for k, t in filler_by_key.items() if k not in anchor_keys | positive_keys | irrelevant_keys)
    rng.shuffle(filler)
    if max(args.n) > len(anchors) + len(filler):
        raise SystemExit(f"{args.prepare}: only {len(anchors) + len(filler)} pseudo originals, fewer than "
                         f"N={max(args.n)}")
    memorised_all = anchors + filler[: max(args.n) - len(anchors)]
    locality_of = {r.prompt: [p.prompt for p in r.locality] for r in prep.pseudo_edits}
    taken = set(memorised_all) | set(positives)
    # Scored negatives: half of the pseudo-irrelevant prompts, and the memorised pseudo edits' own locality
    # prompts (their neighbours), taken in memorisation order so a smaller N scores a prefix of a larger one.
    rng.shuffle(irrelevant)
    scored_irrelevant, train_irrelevant = irrelevant[: len(irrelevant) // 2], irrelevant[len(irrelevant) // 2:]
    neighbours, seen = [], {normalise(t) for t in taken | set(irrelevant)}
    for prompt in memorised_all:
        for t in locality_of.get(prompt, []):
            if normalise(t) not in seen:
                seen.add(normalise(t))
                neighbours.append(t)
    # Training negatives (megedit recipe): never a scored text, a memorised one or a positive.
    other_locality = sorted({t for ts in locality_of.values() for t in ts if normalise(t) not in seen})
    other_originals = filler[max(args.n) - len(anchors):]
    rng.shuffle(other_locality)
    train_pool = []
    for i in range(max(len(train_irrelevant), len(other_locality), len(other_originals))):
        train_pool += [x[i] for x in (train_irrelevant, other_locality, other_originals) if i < len(x)]

    encoder = TextEncoder.from_source(str(Path(args.encoder) / "encoder"))
    t0 = time.time()
    embed = lambda texts: encoder.embed(texts, 256, progress=True)  # noqa: E731
    emb_memorised, emb_pos = embed(memorised_all), embed(positives)
    emb_irrelevant = embed(scored_irrelevant[: args.max_negatives])
    emb_neighbours = embed(neighbours)
    wanted_train = max(recipe["train_negatives"], math.ceil(recipe["negatives_per_edit"] * max(args.n)))
    emb_train = embed(train_pool[:wanted_train])
    embed_seconds = time.time() - t0
    # Which memorised prompt each neighbour belongs to, so a run at N scores only its own neighbours.
    first_owner = {}
    for k, prompt in enumerate(memorised_all):
        for t in locality_of.get(prompt, []):
            first_owner.setdefault(t, k)
    neighbour_owner = torch.tensor([first_owner[t] for t in neighbours])

    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
               "prepare": args.prepare, "encoder": args.encoder, "recipe": recipe,
               "positives": len(positives), "positive_groups": len(anchors), "scored_irrelevant": len(emb_irrelevant),
               "embed_seconds": round(embed_seconds, 1), "runs": []}
    print(f"{len(anchors)} held-out originals memorised at every N, {len(positives)} of their paraphrases scored; "
          f"{len(emb_irrelevant)} pseudo-irrelevant prompts; embedding {embed_seconds:.0f} s", flush=True)
    for n in args.n:
        memorised = emb_memorised[:n]
        neigh = emb_neighbours[neighbour_owner < n][: args.max_negatives]
        neg = torch.cat([emb_irrelevant, neigh])
        neg_kind = torch.cat([torch.zeros(len(emb_irrelevant), dtype=torch.long),
                              torch.ones(len(neigh), dtype=torch.long)])
        n_train = min(len(emb_train), max(recipe["train_negatives"], math.ceil(recipe["negatives_per_edit"] * n)))
        row = {"n": n, "scored_neighbours": len(neigh), "train_negatives": n_train}
        for name, negatives, plateau in (("megedit", emb_train[:n_train], True), ("paper", None, False)):
            t = time.time()
            net, epochs, converged = train_router(memorised, negatives, recipe, plateau)
            router = FamiliarityRouter(net, threshold=0.0)
            e_mem, e_pos, e_neg = router.entropy(memorised), router.entropy(emb_pos), router.entropy(neg)
            row[name] = {"epochs": epochs, "converged": converged, "train_seconds": round(time.time() - t, 1),
                         "memorised_mean_entropy": float(e_mem.mean()),
                         **read_out(e_pos, e_neg, neg_kind, recipe["target_fpr"])}
        # Nearest-neighbour baseline on the same embeddings (distance 1 - cosine: lower = more familiar).
        nn_pos = 1 - (emb_pos @ memorised.T).max(1).values
        nn_neg = 1 - torch.cat([(neg[i:i + 2048] @ memorised.T).max(1).values for i in range(0, len(neg), 2048)])
        row["nearest_neighbour"] = read_out(nn_pos, nn_neg, neg_kind, recipe["target_fpr"])
        results["runs"].append(row)
        m, p, b = row["megedit"], row["paper"], row["nearest_neighbour"]
        print(f"N={n:>6} ({n_train} training negatives, {len(neigh)} neighbours scored)", flush=True)
        for name, x in (("megedit", m), ("paper", p), ("nearest-neighbour", b)):
            c, bal = x["capped"], x["balanced"]
            extra = (f", {x['epochs']} epochs{'' if x['converged'] else ' (NOT converged)'}, "
                     f"{x['train_seconds']:.0f} s" if "epochs" in x else "")
            print(f"  {name:<18} AUROC {x['auroc']:.4f} | balanced: para {bal['paraphrases_familiar']:.3f} / "
                  f"neg {bal['negatives_unfamiliar_worst_kind']:.3f} | capped {recipe['target_fpr']:.0%}: para "
                  f"{c['paraphrases_familiar']:.3f} / irrelevant {c['unfamiliar_by_kind']['pseudo_irrelevant']:.3f} "
                  f"/ neighbours {c['unfamiliar_by_kind'].get('pseudo_locality', float('nan')):.3f}{extra}",
                  flush=True)
        row["ratio_megedit_over_paper"] = {
            "auroc": m["auroc"] / p["auroc"],
            "capped_paraphrases_familiar": m["capped"]["paraphrases_familiar"] / max(p["capped"]["paraphrases_familiar"], 1e-9)}
        print(f"  ratio megedit / paper: AUROC {row['ratio_megedit_over_paper']['auroc']:.3f}, paraphrases familiar "
              f"at the capped threshold {row['ratio_megedit_over_paper']['capped_paraphrases_familiar']:.2f}x",
              flush=True)
    atomic_write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
