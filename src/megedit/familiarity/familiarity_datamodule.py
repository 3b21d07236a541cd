"""Embeds, once, every text the familiarity stage needs with the (frozen) tuned encoder.

Two routers train side by side on identical recipes:

* the **main** router memorises random labels for the N edit prompts;
* the **calibration** router does the same for N pseudo prompts (pseudo edits the encoder
  held out, padded with other pseudo originals when there are fewer than N), so that its
  entropy on those held-out pseudo edits' paraphrases versus pseudo-irrelevant prompts shows
  where the threshold should go, without touching any evaluation text of the edits.

With ``train_negatives`` both routers also see unfamiliar pseudo prompts (pseudo originals
outside the calibration set, half of the pseudo-irrelevant prompts and at most half of the pseudo
edits' own locality prompts, never the neighbours of memorised pseudo prompts; calibration scores the
rest) and are pushed to a uniform output on them, which sharpens the familiar region
around each memorised prompt (the paper trains on positives only; ``train_negatives: 0`` is that).
With ``fences_per_edit`` each router also learns a uniform output on other facts about its memorised
subjects (relation templates of the pseudo data; ZsRE's locality prompts ask those).
With ``paraphrase_shifts`` each router also learns its labels at memorised points moved by the
displacement (paraphrase minus original, in embedding space) of a pseudo pair the encoder trained on:
paraphrases of an edit land in the familiar basin, not just the edit prompt itself.

The edits' evaluation paraphrases and locality prompts are embedded only for the report.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from megedit.artifacts import MANIFEST, ArtifactError, check_lineage, read_manifest, sha256_file
from megedit.components.text_encoder import TextEncoder
from megedit.data.locality_kinds import locality_kind, mentions_subject, normalise
from megedit.distributed import gather_objects, world
from megedit.encoder.artifact import hard_negative_groups, heldout_groups, load_encoder
from megedit.encoder.encoder_datamodule import group_pairs
from megedit.encoder.hard_negatives import SLOT, other_relations, relation_templates
from megedit.prepare.artifact import load_prepared

# The kinds of calibration negatives (``calibration_negative_kind`` indexes this): unrelated prompts,
# pseudo edits' locality prompts about another subject, and those about the pseudo edit's own subject.
NEGATIVE_KINDS = ("pseudo_irrelevant", "pseudo_locality", "pseudo_same_subject")


class PairedIndices(Dataset):
    """Step ``i`` trains the main router on edit ``i % n_main`` and the calibration router on ``i % n_calib``."""

    def __init__(self, n_main: int, n_calib: int):
        self.n_main, self.n_calib = n_main, n_calib

    def __len__(self) -> int:
        return max(self.n_main, self.n_calib)

    def __getitem__(self, i: int) -> tuple[int, int]:
        return i % self.n_main, i % max(1, self.n_calib)


def embed_sharded(encoder: TextEncoder, texts: list[str], batch_size: int, progress: bool) -> torch.Tensor:
    """Embed ``texts`` split across DDP ranks (each rank a strided shard), gathered back in order."""
    rank, size = world()
    mine = encoder.embed(texts[rank::size], batch_size, progress=progress and rank == 0)
    parts = gather_objects(mine)
    out = torch.empty(len(texts), encoder.dim)
    for r, part in enumerate(parts):
        out[r::size] = part
    return out


def interleave(*lists: list[str]) -> list[str]:
    """Round-robin merge, so that a cap keeps every kind of text in proportion."""
    out = []
    for i in range(max((len(x) for x in lists), default=0)):
        out += [x[i] for x in lists if i < len(x)]
    return out


def shift_pairs(pseudo_pairs: list[dict], heldout: set[str], scored: list[str], limit: int,
                seed: int) -> tuple[list[str], list[str]]:
    """(originals, paraphrases): up to ``limit`` pseudo pairs of groups not in ``heldout``, none holding a
    ``scored`` text (compared as the uncased encoder sees them), in a seeded order of their own."""
    taken = {normalise(t) for t in scored}
    pairs = [(g["anchor"], p) for gid, g in group_pairs(pseudo_pairs).items() if gid not in heldout
             and normalise(g["anchor"]) not in taken for p in g["positives"] if normalise(p) not in taken]
    random.Random(f"{seed}:shifts").shuffle(pairs)  # its own stream: the other draws stay as they were
    pairs = pairs[:limit]
    return [a for a, _ in pairs], [p for _, p in pairs]


class FamiliarityDataModule(L.LightningDataModule):
    def __init__(self, prepare_dir: str, encoder_dir: str, batch_size: int = 256, calibrate: bool = True,
                 max_calibration_positives: int = 2000, max_calibration_negatives: int = 4000, seed: int = 0,
                 embed_batch_size: int = 256, num_workers: int = 0, train_negatives: int = 4096,
                 negatives_per_edit: float = 4.0, fences_per_edit: int = 1, paraphrase_shifts: int = 0):
        """
        Args:
            prepare_dir: the prepare artifact.
            encoder_dir: the encoder artifact built from it (its ``encoder/`` folder embeds every query).
            batch_size: embeddings per step per device.
            calibrate: build the calibration set and train the calibration router (needed by
                ``model.threshold: auto``; a fixed threshold still reports the calibration diagnostics).
            max_calibration_positives: cap on held-out pseudo paraphrases scored for calibration.
            max_calibration_negatives: cap on the negatives scored for calibration (pseudo-irrelevant and
                pseudo locality prompts, interleaved).
            seed: seed of the subsets.
            embed_batch_size: texts per encoder batch (split across DDP ranks).
            train_negatives: unfamiliar pseudo prompts both routers learn a uniform output on: at least
                this many, as far as the pseudo pools hold them (0: none, positives only, as the paper).
                They never overlap the calibration positives, negatives or memorised pseudo prompts,
                nor any evaluation text.
            negatives_per_edit: the count grows with N to at least this many negatives per edit: the
                familiar region of a larger router needs more fencing (CounterFact-4096 with 4096
                negatives left 85% of locality prompts unfamiliar, with 4 per edit 93%).
            fences_per_edit: per memorised prompt with a subject, this many "fences": its subject in the
                relation template of another fact (from the pseudo edits' locality prompts, "The cell
                component of {} is"; not one sharing a content word with the prompt), which the router
                learns to leave unfamiliar. A dataset without relation-specificity locality prompts
                (CounterFact) has no template, hence no fence. Never an evaluation text; the calibration
                router gets its own fences, never one of its calibration texts. 0: none.
            paraphrase_shifts: how many pseudo pairs (original, paraphrase) from the groups the encoder did not
                hold out (its training groups; with the encoder's ``data.max_train_groups`` some were not trained on)
                give the embedding displacements ``model.shift_scale`` moves memorised points by (never a
                held-out group, an evaluation text or a calibration text; 0: none, the default). They sharpen
                a large router and blur a small one: CounterFact-4096 AUROC 0.956 -> 0.965 with 8000,
                CounterFact-1024 0.984 -> 0.976 (``configs/experiments/large-n``).
        """
        super().__init__()
        self.save_hyperparameters()
        self.emb: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------ inputs
    def _check_inputs(self) -> None:
        hp = self.hparams
        self.prepared = load_prepared(hp.prepare_dir)
        self.encoder_manifest = read_manifest(hp.encoder_dir, stage="encoder")
        check_lineage({"prepare": self.prepared.manifest, "encoder": self.encoder_manifest})
        from megedit.artifacts import check_upstream

        check_upstream(self.encoder_manifest, "prepare", hp.prepare_dir, where=f"encoder artifact {hp.encoder_dir}",
                       accept_ancestors=True)  # a run version extends the encoder's prepare artifact
        self.encoder_manifest_sha256 = sha256_file(Path(hp.encoder_dir) / MANIFEST)

    @property
    def n_train_negatives(self) -> int:
        """How many training negatives are asked for: 0 turns them off, else max(train_negatives, per-edit x N)."""
        hp = self.hparams
        if hp.train_negatives <= 0:
            return 0
        return max(hp.train_negatives, math.ceil(hp.negatives_per_edit * len(self.prepared.edits)))

    def _texts(self) -> dict[str, list[str]]:
        """Every text group to embed, by name; the calibration groups come from pseudo data only."""
        hp, prep = self.hparams, self.prepared
        n = len(prep.edits)
        texts = {
            "edit_prompts": [e.prompt for e in prep.edits],
            "edit_paraphrases": [p for e in prep.edits for p in e.paraphrases],
            "locality": [p.prompt for e in prep.edits for p in e.locality],
        }
        self.paraphrase_owner = [k for k, e in enumerate(prep.edits) for _ in e.paraphrases]
        # Locality prompts about the edited subject (KnowEdit's relation specificity) are a harder test than
        # unrelated ones, and some restate the edited fact itself (``locality_kinds``): the report splits them.
        self.locality_kinds = [locality_kind(e, p) for e in prep.edits for p in e.locality]
        evaluation = {t for v in texts.values() for t in v}
        # Locality prompts of pseudo edits: the same kind of text as the evaluation locality prompts
        # (CounterFact neighbourhood prompts, ZsRE's NQ questions), which the router must leave alone.
        pseudo_locality = sorted({p.prompt for r in prep.pseudo_edits for p in r.locality} - evaluation)
        self.fence_templates = relation_templates(prep.pseudo_edits, evaluation) if hp.fences_per_edit > 0 else []
        texts["fences"] = self._fences([(e.subject, e.prompt) for e in prep.edits],
                                       exclude={normalise(t) for t in evaluation})
        if not hp.calibrate:
            if self.n_train_negatives > 0:
                pool = sorted(({r["prompt"] for r in prep.pseudo_irrelevant} | {r.prompt for r in prep.pseudo_edits}
                               | set(pseudo_locality)) - evaluation)
                random.Random(hp.seed).shuffle(pool)
                texts["train_negatives"] = pool[: self.n_train_negatives]
            return texts
        heldout = heldout_groups(hp.encoder_dir)
        # Same-subject locality prompts of the pseudo edits the encoder drew hard negatives from: it may have
        # trained on them, so they are not honest calibration data.
        hard_groups = hard_negative_groups(hp.encoder_dir)
        encoder_trained = {p.prompt for r in prep.pseudo_edits if r.id in hard_groups for p in r.locality
                           if mentions_subject(r.subject, p.prompt)}
        rng = random.Random(hp.seed)
        # Positives: pseudo edits whose pairs the encoder never trained on (held out by the encoder stage).
        pseudo_groups = [(r.id, {"anchor": r.prompt, "positives": list(r.paraphrases)})
                         for r in prep.pseudo_edits if r.id in heldout and r.paraphrases]
        if len(pseudo_groups) < 100:
            # Too few held-out pseudo edits of the benchmark itself: the held-out paraphrase-corpus
            # groups are pseudo edits too (an original and its paraphrases).
            seen = {g for g, _ in pseudo_groups}
            pseudo_groups += [(g, v) for g, v in group_pairs(prep.pseudo_pairs).items()
                              if g in heldout and g not in seen]
        if not pseudo_groups:
            raise ArtifactError(f"{hp.encoder_dir}: no held-out pseudo group with a paraphrase to calibrate on; "
                                "set model.threshold to a number, or re-run the encoder with more held-out groups")
        rng.shuffle(pseudo_groups)
        positives_owner, positives = [], []
        for k, (_, g) in enumerate(pseudo_groups[:n]):
            for p in g["positives"]:
                positives.append(p)
                positives_owner.append(k)
        keep = sorted(rng.sample(range(len(positives)), min(len(positives), hp.max_calibration_positives)))
        calib_prompts = [g["anchor"] for _, g in pseudo_groups[:n]]
        # Pad to N memorised points with other pseudo originals (same density as the real router).
        if len(calib_prompts) < n:
            used = set(calib_prompts)
            irrelevant = {r["prompt"] for r in prep.pseudo_irrelevant}
            filler = sorted({p["anchor"] for p in prep.pseudo_pairs} - used - irrelevant)
            rng.shuffle(filler)
            calib_prompts += filler[: n - len(calib_prompts)]
        positive_texts = {p for _, g in pseudo_groups for p in g["positives"]}
        irrelevant = sorted({r["prompt"] for r in prep.pseudo_irrelevant} - evaluation)
        locality = sorted(set(pseudo_locality) - set(calib_prompts) - positive_texts - set(irrelevant) - encoder_trained)
        rng.shuffle(irrelevant)
        rng.shuffle(locality)
        # The evaluation's locality prompts are neighbours of *memorised* edits; the calibration's should be
        # neighbours of the memorised pseudo prompts too (others are easier and understate the FPR: at N=4096
        # the threshold let 5.3% of locality prompts through on a 5% budget). Stable: no extra RNG draws.
        memorised = set(calib_prompts)
        neighbours = {p.prompt for r in prep.pseudo_edits if r.prompt in memorised for p in r.locality}
        locality = [t for t in locality if t in neighbours] + [t for t in locality if t not in neighbours]
        train_negatives: list[str] = []
        if self.n_train_negatives > 0:
            # Half of each kind stays unseen, so calibration measures the trained routers honestly.
            irrelevant, train_irrelevant = irrelevant[: len(irrelevant) // 2], irrelevant[len(irrelevant) // 2:]
            # Neighbours of memorised prompts are never trained on (the real edits' neighbours never are).
            cut = max(len(locality) // 2, sum(t in neighbours for t in locality))
            locality, train_locality = locality[:cut], locality[cut:]
            taken = set(calib_prompts) | set(irrelevant) | set(locality) | positive_texts | evaluation
            others = sorted({r.prompt for r in prep.pseudo_edits} - taken - set(train_irrelevant))
            rng.shuffle(others)
            train_negatives = interleave(train_irrelevant, train_locality, others)[: self.n_train_negatives]
        negatives = interleave(irrelevant, locality)[: hp.max_calibration_negatives]
        # Which kind each negative is: the threshold must hold for the hardest kind on its own.
        irrelevant_set = set(irrelevant)
        same_subject = {p.prompt for r in prep.pseudo_edits for p in r.locality
                        if mentions_subject(r.subject, p.prompt)}
        kind = {name: NEGATIVE_KINDS.index(name) for name in NEGATIVE_KINDS}
        self.calibration_negative_kind = torch.tensor(
            [kind["pseudo_irrelevant"] if t in irrelevant_set else
             kind["pseudo_same_subject"] if t in same_subject else kind["pseudo_locality"] for t in negatives],
            dtype=torch.long)
        self.calibration_counts = {"memorised": len(calib_prompts), "positive_groups": min(n, len(pseudo_groups)),
                                   "positives": len(keep), "negatives": len(negatives),
                                   "negatives_neighbours_of_memorised": sum(t in neighbours for t in negatives),
                                   "padded_with_other_pseudo_originals": max(0, n - len(pseudo_groups)),
                                   "train_negatives": len(train_negatives)}
        subject_of = {r.prompt: r.subject for r in prep.pseudo_edits}
        calib_fences = self._fences([(subject_of.get(t, ""), t) for t in calib_prompts],
                                    exclude={normalise(t) for t in evaluation | set(negatives) | positive_texts
                                             | set(calib_prompts)})
        texts.update(calib_prompts=calib_prompts, calib_positives=[positives[i] for i in keep],
                     calib_negatives=negatives, train_negatives=train_negatives, calib_fences=calib_fences)
        self.calibration_counts["fences"] = len(calib_fences)
        return texts

    def _fences(self, memorised: list[tuple[str, str]], exclude: set[str]) -> list[str]:
        """Up to ``fences_per_edit`` other-relation prompts about each (subject, prompt)'s subject."""
        n, templates = self.hparams.fences_per_edit, self.fence_templates
        rng = random.Random(f"{self.hparams.seed}:fences")  # its own stream: the other draws stay as they were
        out: list[str] = []
        for subject, prompt in memorised:
            if not subject or not templates:
                continue
            texts = [templates[k].replace(SLOT, subject) for k in other_relations(prompt, subject, templates)]
            texts = [t for t in texts if normalise(t) not in exclude]  # the encoder is uncased
            out += rng.sample(texts, min(n, len(texts)))
        return out

    def _shift_pairs(self, texts: dict[str, list[str]]) -> tuple[list[str], list[str]]:
        """Up to ``paraphrase_shifts`` (original, paraphrase) pseudo pairs from the encoder's training groups.

        None touches a text the stage scores (an edit's prompt, paraphrase or locality prompt, a calibration
        positive or negative; compared as the uncased encoder sees them), nor comes from a held-out group,
        whose paraphrases calibrate the threshold. A memorised or training-negative pseudo text may appear:
        a displacement moves *another* memorised point.
        """
        hp = self.hparams
        if hp.paraphrase_shifts <= 0:
            return [], []
        heldout = heldout_groups(hp.encoder_dir)
        scored = ("edit_prompts", "edit_paraphrases", "locality", "calib_positives", "calib_negatives")
        return shift_pairs(self.prepared.pseudo_pairs, heldout, [t for name in scored for t in texts.get(name, [])],
                           hp.paraphrase_shifts, hp.seed)

    def setup(self, stage: str | None = None) -> None:
        if self.emb is not None:
            return
        hp = self.hparams
        self._check_inputs()
        texts = self._texts()
        texts.update(zip(("shift_originals", "shift_paraphrases"), self._shift_pairs(texts)))
        self.texts = texts
        encoder = load_encoder(hp.encoder_dir, check=False)  # _check_inputs read its manifest
        flat = [t for v in texts.values() for t in v]
        all_emb = embed_sharded(encoder, flat, hp.embed_batch_size, progress=True)
        self.emb, start = {}, 0
        for name, v in texts.items():
            self.emb[name] = all_emb[start:start + len(v)]
            start += len(v)
        self.dim = self.emb["edit_prompts"].shape[1]
        self.emb["shifts"] = self.emb["shift_paraphrases"] - self.emb["shift_originals"]

    def train_dataloader(self) -> DataLoader:
        n_calib = len(self.emb["calib_prompts"]) if self.hparams.calibrate else 0
        ds = PairedIndices(len(self.emb["edit_prompts"]), n_calib)
        return DataLoader(ds, batch_size=min(self.hparams.batch_size, len(ds)), shuffle=True,
                          num_workers=self.hparams.num_workers)
