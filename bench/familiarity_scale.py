"""Does the familiarity router stay sharp as N grows? (issue 4: "must stay sharp at N=10k")

For each N, a router memorises N pseudo originals with random labels, then scores paraphrases of
memorised originals that the encoder never trained on (should be familiar) against prompts it never
saw (should not): pseudo-irrelevant prompts, and the locality prompts of the memorised pseudo edits
(their neighbours: what the evaluation's locality prompts are to the edits), split by kind as the
stage splits them. Every text is distinct as the uncased encoder sees it, and no training text is
memorised or scored (checked). The same texts and embeddings serve three routers, in this one run:

* ``megedit``: the familiarity stage's recipe with the defaults of ``configs/stages/familiarity.yaml``
  (training negatives, max(train_negatives, negatives_per_edit x N) as far as the pools hold them; lr
  halved on an entropy plateau; the stage's convergence rule), or an experiment's with ``--config``
  (``configs/experiments/large-n``: memorised points also learnt at paraphrase displacements of pseudo
  pairs, ``data.paraphrase_shifts``; the bench, like the stage's calibration router, may draw a
  displacement from a memorised text's own pair, which the stage's main router never does). The router is
  trained by the stage's own ``FamiliarityModule`` through Lightning, on the stage's batches
  (``router_loader``), so its loss, draws, schedule and stopping rule are the stage's. Differences from the
  stage: one router, not the main and calibration routers side by side (the stage's plateau and stop watch
  the worse of the two), and no fences (they need relation templates; CounterFact has none, so there it is
  the stage's recipe). Results written before the bench trained through the module drew its batches and
  negatives from a generator of its own: the same recipe, other draws;
* ``paper``: positives only at a constant lr (the paper's eq. 6 recipe), the baseline;
* ``nearest-neighbour``: a query is familiar when its best cosine to the memorised set is high.

Each is read at its own best threshold (``balanced``: max TPR - FPR) and at the stage's rule
(``capped`` at the config's FPR budget, on the worst budgeted kind of negative). The thresholds are
picked on the very texts they are scored on, so these compare the routers' separation; they are not
a deployment estimate (the stage calibrates on one set of pseudo data and is measured on the edits).

    python bench/familiarity_scale.py --prepare runs/smollm2-counterfact-1024/prepare \
        --encoder runs/smollm2-counterfact-1024/encoder --n 1024 4096 10000

Prints a table (ratios megedit / paper) and writes JSON (default bench/results/familiarity_scale.json).
"""

from __future__ import annotations

import argparse
import inspect
import logging
import math
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from megedit.artifacts import atomic_write_json
from megedit.cli import STAGES, stage_classes
from megedit.components.familiarity_net import FamiliarityNet, FamiliarityRouter
from megedit.components.nearest_router import NearestRouter
from megedit.data.locality_kinds import normalise
from megedit.encoder.artifact import hard_negative_groups, heldout_groups, load_encoder
from megedit.encoder.encoder_datamodule import group_pairs
from megedit.familiarity.familiarity_datamodule import (NEGATIVE_KINDS, RouterInputs, encoder_trained_prompts,
                                                        interleave, pseudo_locality_kind, router_loader, shift_pairs)
from megedit.familiarity.familiarity_module import FamiliarityModule
from megedit.familiarity.router import auroc, choose_threshold
from megedit.prepare.artifact import load_prepared
from megedit.stage_cli import parse_stage_args

KIND = {name: k for k, name in enumerate(NEGATIVE_KINDS)}


def stage_recipe(override: Path | None = None) -> dict:
    """The familiarity stage's training recipe as its own CLI parses it (the code defaults under
    ``configs/stages/familiarity.yaml``), with ``override`` (an experiment's familiarity.yaml, e.g.
    configs/experiments/large-n) read as ``--config`` on top: the model and data options by name (the model's
    ``seed`` where both have one), and the trainer's ``max_epochs``; run folders left out."""
    cfg = parse_stage_args("familiarity", *stage_classes("familiarity"), STAGES["familiarity"].links,
                           ["--config", str(override)] if override is not None else [])
    options = {**cfg.data.as_dict(), **cfg.model.as_dict(), "max_epochs": cfg.trainer.max_epochs}
    return {k: v for k, v in options.items() if not k.endswith("_dir")}


class _RouterOnly(FamiliarityModule):
    """The stage's module as it trains its main router, without writing an artifact: the bench reads the
    trained net itself."""

    def on_fit_end(self) -> None:
        self.main_net.eval()


class _RouterData(L.LightningDataModule):
    """Hands the module its memorised points (and training negatives and shift displacements) as the stage's
    datamodule does, with the stage's training batches; no calibration router."""

    def __init__(self, emb: dict[str, torch.Tensor], batch_size: int):
        super().__init__()
        self.emb, self.batch_size = emb, batch_size

    def request(self, net_groups: bool = True) -> None:
        """Only nets train here (the nearest-neighbour rows score the embeddings directly)."""

    def handover(self) -> RouterInputs:
        # Only the report reads the other fields; this module writes none.
        return RouterInputs(emb=self.emb, calibrate=False, negative_kind=None, calibration_counts=None,
                            locality_kinds=[], fences={"per_edit": 0, "templates": 0, "main": 0},
                            n_edits=len(self.emb["edit_prompts"]), lineage={}, encoder={}, data_config={}, upstream={})

    def train_dataloader(self):
        return router_loader(len(self.emb["edit_prompts"]), 0, self.batch_size)


def train_router(emb: torch.Tensor, negatives: torch.Tensor | None, r: dict,
                 plateau: bool, shifts: torch.Tensor | None = None) -> tuple[FamiliarityNet, int, bool]:
    """One router, trained by the familiarity stage's own module (``FamiliarityModule``: same loss, schedule and
    stopping rule) through Lightning; ``plateau`` False keeps the lr constant. Returns (net, epochs, converged)."""
    options = {k: v for k, v in r.items() if k in inspect.signature(FamiliarityModule.__init__).parameters}
    groups = {"edit_prompts": emb, "train_negatives": negatives, "shifts": shifts}
    with tempfile.TemporaryDirectory() as out:
        module = _RouterOnly(**options | {"out_dir": out, "threshold": math.log(r["num_classes"]),
                                          "checkpoint_every_n_epochs": 0, "init_from": None}
                             | ({} if plateau else {"plateau_patience": 0}))
        # On the CPU, where the embeddings are and where the committed results were measured.
        trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=r["max_epochs"], logger=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                            limit_val_batches=0)
        trainer.fit(module, datamodule=_RouterData({k: v for k, v in groups.items() if v is not None},
                                                   r["batch_size"]))
    fit = module.fit_summary()
    return module.main_net, fit["epochs"], fit["converged"]


def read_out(pos: torch.Tensor, neg: torch.Tensor, neg_kind: torch.Tensor, r: dict) -> dict:
    """Rates at the balanced and at the stage's capped threshold; lower score = more familiar."""
    out = {"auroc": auroc(-pos, -neg)}
    for rule in ("balanced", "capped"):
        c = choose_threshold(pos, neg, rule, r["target_fpr"], unfamiliar_kind=neg_kind, kind_names=list(NEGATIVE_KINDS),
                             budget_kinds=r["budget_kinds"])
        out[rule] = {"threshold": c["threshold"], "paraphrases_familiar": c["familiar_rate"],
                     "negatives_unfamiliar_worst_kind": 1 - c["unfamiliar_routed_familiar_rate"],
                     "unfamiliar_by_kind": {k: 1 - v for k, v in c["unfamiliar_routed_familiar_rate_by_kind"].items()}}
    return out


def select_texts(prep, heldout: set[str], hard_groups: set[str], max_n: int, max_positive_groups: int,
                 seed: int, shift_limit: int = 0) -> dict:
    """Memorised, scored and training texts, pairwise disjoint as the uncased encoder sees them."""
    key, rng = normalise, random.Random(seed)
    groups = group_pairs(prep.pseudo_pairs)
    irrelevant = sorted({key(r["prompt"]): r["prompt"] for r in prep.pseudo_irrelevant}.values())
    irrelevant_keys = {key(t) for t in irrelevant}
    # Locality prompts per pseudo edit, with their kind (about the pseudo edit's own subject or not), as the
    # stage tells the kinds apart.
    locality_of: dict[str, list[tuple[str, int]]] = {}
    for r in prep.pseudo_edits:
        for p in r.locality:
            locality_of.setdefault(key(r.prompt), []).append((p.prompt, KIND[pseudo_locality_kind(r.subject,
                                                                                                  p.prompt)]))
    # Prompts the encoder may have trained on (its hard negatives' sources): never scored, as in the stage.
    encoder_trained = {key(t) for t in encoder_trained_prompts(prep.pseudo_edits, hard_groups)}
    locality_keys = {key(t) for ts in locality_of.values() for t, _ in ts}
    held = [g for gid, g in groups.items() if gid in heldout and key(g["anchor"]) not in irrelevant_keys]
    rng.shuffle(held)
    # One memorised point per text: two groups with one original would ask the router for two random
    # labels on one embedding, which it can never fit.
    first: dict[str, dict] = {}
    for g in held:
        first.setdefault(key(g["anchor"]), g)
    held = list(first.values())[:max_positive_groups]
    anchors = [g["anchor"] for g in held]
    anchor_keys = {key(a) for a in anchors}
    positives = sorted({key(p): p for g in held for p in g["positives"]
                        if key(p) not in anchor_keys | irrelevant_keys}.values())
    positive_keys = {key(p) for p in positives}
    taken = anchor_keys | positive_keys | irrelevant_keys | locality_keys
    filler = sorted({key(g["anchor"]): g["anchor"] for g in groups.values() if key(g["anchor"]) not in taken}.values())
    rng.shuffle(filler)
    if max_n > len(anchors) + len(filler):
        raise SystemExit(f"{prep.dir}: only {len(anchors) + len(filler)} distinct pseudo originals, fewer than "
                         f"N={max_n}")
    memorised = anchors + filler[: max_n - len(anchors)]
    # Scored negatives: half of the pseudo-irrelevant prompts, and the memorised pseudo edits' own locality
    # prompts (their neighbours) in memorisation order, so a smaller N scores a prefix of a larger one's.
    rng.shuffle(irrelevant)
    scored_irrelevant, train_irrelevant = irrelevant[: len(irrelevant) // 2], irrelevant[len(irrelevant) // 2:]
    # ``seen``: texts neither scored as a neighbour nor trained on (also: already a neighbour).
    neighbours, neighbour_kind = [], []
    seen = encoder_trained | anchor_keys | positive_keys | irrelevant_keys
    for prompt in memorised:
        for t, kind in locality_of.get(key(prompt), []):
            if key(t) not in seen:
                seen.add(key(t))
                neighbours.append(t)
                neighbour_kind.append(kind)
    # Training negatives (the stage's recipe): other pseudo locality prompts, the other half of the
    # pseudo-irrelevant prompts, and pseudo originals that are not memorised.
    other_locality = sorted({key(t): t for ts in locality_of.values() for t, _ in ts if key(t) not in seen}.values())
    rng.shuffle(other_locality)
    train_pool = interleave(train_irrelevant, other_locality, filler[max_n - len(anchors):])
    scored = {key(t) for t in memorised + positives + scored_irrelevant + neighbours}
    leaked = [t for t in train_pool if key(t) in scored]
    if leaked:
        raise AssertionError(f"{len(leaked)} training negatives are also memorised or scored, e.g. {leaked[:3]}")
    # Paraphrase displacements (the stage's data.paraphrase_shifts): pairs of groups the encoder trained on,
    # none with a scored text (a memorised one may appear: its displacement moves other memorised points).
    shifts = shift_pairs(prep.pseudo_pairs, heldout, positives + scored_irrelevant + neighbours, shift_limit, seed)
    return {"memorised": memorised, "n_anchors": len(anchors), "positives": positives,
            "scored_irrelevant": scored_irrelevant, "neighbours": neighbours,
            "neighbour_kind": torch.tensor(neighbour_kind, dtype=torch.long), "train_pool": train_pool,
            "shift_pairs": list(zip(*shifts))}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prepare", required=True)
    ap.add_argument("--encoder", required=True, help="encoder artifact dir (its held-out groups are the positives)")
    ap.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 10000])
    ap.add_argument("--max-positive-groups", type=int, default=1000,
                    help="held-out pseudo originals whose paraphrases are scored (memorised at every N)")
    ap.add_argument("--max-negatives", type=int, default=4000, help="cap per kind of scored negative")
    ap.add_argument("--out", default="bench/results/familiarity_scale.json")
    ap.add_argument("--config", type=Path, default=None,
                    help="familiarity.yaml of an experiment whose settings replace the stage defaults "
                         "(e.g. configs/experiments/large-n/familiarity.yaml)")
    args = ap.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # one Trainer per router: no banners
    recipe = stage_recipe(override=args.config)
    prep = load_prepared(args.prepare)
    heldout, hard_groups = heldout_groups(args.encoder), hard_negative_groups(args.encoder)
    encoder = load_encoder(args.encoder)
    cache: dict[str, torch.Tensor] = {}
    embed_seconds = 0.0

    def embed(texts: list[str]) -> torch.Tensor:
        nonlocal embed_seconds
        t0, new = time.time(), [t for t in dict.fromkeys(texts) if t not in cache]
        if new:
            cache.update(zip(new, encoder.embed(new, 256, progress=True)))
        embed_seconds += time.time() - t0
        return torch.stack([cache[t] for t in texts]) if texts else torch.empty(0, encoder.dim)

    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}",
               "config": str(args.config) if args.config else "configs/stages/familiarity.yaml", "prepare": args.prepare, "encoder": args.encoder, "recipe": recipe,
               "fences": "not built (the stage's fences need relation templates; CounterFact has none)", "runs": []}
    for n in args.n:
        # Per N, as the stage does: every pseudo text outside this N's memorised and scored sets may be a
        # training negative. The memorised set, positives and irrelevant prompts are prefixes / the same.
        texts = select_texts(prep, heldout, hard_groups, n,
                             args.max_positive_groups, recipe["seed"], recipe["paraphrase_shifts"])
        memorised, emb_pos = embed(texts["memorised"]), embed(texts["positives"])
        emb_irrelevant = embed(texts["scored_irrelevant"][: args.max_negatives])
        neigh = embed(texts["neighbours"][: args.max_negatives])
        neg = torch.cat([emb_irrelevant, neigh])
        neg_kind = torch.cat([torch.full((len(emb_irrelevant),), KIND["pseudo_irrelevant"]),
                              texts["neighbour_kind"][: args.max_negatives]])
        n_train = max(recipe["train_negatives"], math.ceil(recipe["negatives_per_edit"] * n))
        train = embed(texts["train_pool"][:n_train])
        n_train = len(train)
        pairs = texts["shift_pairs"]
        shifts = embed([p for _, p in pairs]) - embed([a for a, _ in pairs]) if pairs else None
        results.setdefault("positives", len(texts["positives"]))
        results.setdefault("positive_groups", texts["n_anchors"])
        results.setdefault("scored_irrelevant", len(emb_irrelevant))
        row = {"n": n, "scored_neighbours": len(neigh), "train_negatives": n_train, "shift_pairs": len(pairs)}
        for name, negatives, plateau, shift in (("megedit", train, True, shifts), ("paper", None, False, None)):
            t = time.time()
            net, epochs, converged = train_router(memorised, negatives, recipe, plateau, shift)
            router = FamiliarityRouter(net, threshold=0.0)
            e_mem, e_pos, e_neg = router.entropy(memorised), router.entropy(emb_pos), router.entropy(neg)
            row[name] = {"epochs": epochs, "converged": converged, "train_seconds": round(time.time() - t, 1),
                         "memorised_mean_entropy": float(e_mem.mean()),
                         **read_out(e_pos, e_neg, neg_kind, recipe)}
        # The stage's nearest-neighbour router on the same embeddings (1 - max cosine: lower = more familiar).
        nearest = NearestRouter(memorised, threshold=0.0)
        row["nearest_neighbour"] = read_out(nearest.entropy(emb_pos), nearest.entropy(neg), neg_kind, recipe)
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
    results["embed_seconds"] = round(embed_seconds, 1)
    atomic_write_json(args.out, results)
    return results


if __name__ == "__main__":
    main()
