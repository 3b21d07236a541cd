"""Picks every text the familiarity stage needs (``setup``) and embeds them once with the (frozen) tuned encoder
(``handover``, after the module's ``request`` has said which groups it will use; under DDP on every rank).

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
from dataclasses import dataclass
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
from megedit.graph import upstream_dirs
from megedit.prepare.artifact import load_prepared

# The kinds of calibration negatives (``calibration_negative_kind`` indexes this): unrelated prompts,
# pseudo edits' locality prompts about another subject, and those about the pseudo edit's own subject.
NEGATIVE_KINDS = ("pseudo_irrelevant", "pseudo_locality", "pseudo_same_subject")
# Text groups only a router that trains (the net) learns from; the nearest router never reads them.
NET_ONLY_GROUPS = ("train_negatives", "fences", "calib_fences", "shift_originals", "shift_paraphrases")


class PairedIndices(Dataset):
    """Step ``i`` trains the main router on edit ``i % n_main`` and the calibration router on ``i % n_calib``."""

    def __init__(self, n_main: int, n_calib: int):
        self.n_main, self.n_calib = n_main, n_calib

    def __len__(self) -> int:
        return max(self.n_main, self.n_calib)

    def __getitem__(self, i: int) -> tuple[int, int]:
        return i % self.n_main, i % max(1, self.n_calib)


def router_loader(n_main: int, n_calib: int, batch_size: int, num_workers: int = 0) -> DataLoader:
    """The routers' training batches: shuffled ``PairedIndices`` (the calibration router's index is 0 when
    there is none)."""
    ds = PairedIndices(n_main, n_calib)
    return DataLoader(ds, batch_size=min(batch_size, len(ds)), shuffle=True, num_workers=num_workers)


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


def edit_texts(edits: list) -> dict[str, list[str]]:
    """The edits' texts the report scores: their prompts, paraphrases and locality prompts; an edit with
    several atoms (MQuAKE) gives every atom's prompt and paraphrases, and the router memorises every prompt.

    Each prompt once: MQuAKE instances share atoms (one atom can stand in 30 instances), and the same text
    under several random labels cannot be memorised, so the router would never reach low entropy on it."""
    return {"edit_prompts": list(dict.fromkeys(a.prompt for e in edits for a in e.all_atoms())),
            "edit_paraphrases": [p for e in edits for a in e.all_atoms() for p in a.paraphrases],
            "locality": [p.prompt for e in edits for p in e.locality]}


def pseudo_locality_prompts(pseudo_edits: list, evaluation: set[str]) -> list[str]:
    """Locality prompts of pseudo edits: the same kind of text as the evaluation locality prompts
    (CounterFact neighbourhood prompts, ZsRE's NQ questions), which the router must leave alone."""
    return sorted({p.prompt for r in pseudo_edits for p in r.locality} - evaluation)


def uncalibrated_train_negatives(prep, pseudo_locality: list[str], evaluation: set[str], limit: int,
                                 seed: int) -> list[str]:
    """Without a calibration set every pseudo text is free to be a training negative: a seeded sample."""
    pool = sorted(({r["prompt"] for r in prep.pseudo_irrelevant} | {r.prompt for r in prep.pseudo_edits}
                   | set(pseudo_locality)) - evaluation)
    random.Random(seed).shuffle(pool)
    return pool[:limit]


def heldout_pseudo_groups(prep, heldout: set[str], where) -> list[tuple[str, dict]]:
    """``(id, {anchor, positives})`` of the pseudo edits whose pairs the encoder never trained on (held out by
    the encoder stage), padded with held-out paraphrase-corpus groups when the benchmark has under 100."""
    groups = [(r.id, {"anchor": r.prompt, "positives": list(r.paraphrases)})
              for r in prep.pseudo_edits if r.id in heldout and r.paraphrases]
    if len(groups) < 100:
        # Too few held-out pseudo edits of the benchmark itself: the held-out paraphrase-corpus
        # groups are pseudo edits too (an original and its paraphrases).
        seen = {g for g, _ in groups}
        groups += [(g, v) for g, v in group_pairs(prep.pseudo_pairs).items() if g in heldout and g not in seen]
    if not groups:
        raise ArtifactError(f"{where}: no held-out pseudo group with a paraphrase to calibrate on; "
                            "set model.threshold to a number, or re-run the encoder with more held-out groups")
    return groups


@dataclass
class CalibrationTexts:
    """The calibration router's texts: ``prompts`` it memorises, held-out ``positives`` and ``negatives`` it
    is scored on (``negative_kind`` indexes ``NEGATIVE_KINDS``), and ``train_negatives`` both routers learn a
    uniform output on."""
    prompts: list[str]
    positives: list[str]
    positive_texts: set[str]  # every held-out paraphrase, kept or not: none may be a negative or a fence
    negatives: list[str]
    negative_kind: torch.Tensor
    train_negatives: list[str]
    counts: dict


def memorised_pseudo_prompts(groups: list[tuple[str, dict]], prep, n: int, max_positives: int,
                             rng: random.Random) -> tuple[list[str], list[str]]:
    """(N memorised pseudo prompts, up to ``max_positives`` of their held-out paraphrases). ``groups`` are
    shuffled in place; the prompts are padded with other pseudo originals to N (the real router's density)."""
    rng.shuffle(groups)
    positives = [p for _, g in groups[:n] for p in g["positives"]]
    keep = sorted(rng.sample(range(len(positives)), min(len(positives), max_positives)))
    prompts = [g["anchor"] for _, g in groups[:n]]
    if len(prompts) < n:
        irrelevant = {r["prompt"] for r in prep.pseudo_irrelevant}
        filler = sorted({p["anchor"] for p in prep.pseudo_pairs} - set(prompts) - irrelevant)
        rng.shuffle(filler)
        prompts += filler[: n - len(prompts)]
    return prompts, [positives[i] for i in keep]


def neighbours_first(locality: list[str], neighbours: set[str]) -> list[str]:
    """The evaluation's locality prompts are neighbours of *memorised* edits; the calibration's should be
    neighbours of the memorised pseudo prompts too (others are easier and understate the FPR: at N=4096 the
    threshold let 5.3% of locality prompts through on a 5% budget). Stable: no extra RNG draws."""
    return [t for t in locality if t in neighbours] + [t for t in locality if t not in neighbours]


def split_off_train_negatives(irrelevant: list[str], locality: list[str], neighbours: set[str], prep,
                              taken: set[str], limit: int, rng: random.Random) -> tuple[list[str], list[str], list[str]]:
    """(scored irrelevant, scored locality, training negatives): half of each kind stays unseen, so calibration
    measures the trained routers honestly, and neighbours of memorised prompts are never trained on (the real
    edits' neighbours never are); other pseudo originals outside ``taken`` fill the training set."""
    irrelevant, train_irrelevant = irrelevant[: len(irrelevant) // 2], irrelevant[len(irrelevant) // 2:]
    cut = max(len(locality) // 2, sum(t in neighbours for t in locality))
    locality, train_locality = locality[:cut], locality[cut:]
    taken = taken | set(irrelevant) | set(locality)
    others = sorted({r.prompt for r in prep.pseudo_edits} - taken - set(train_irrelevant))
    rng.shuffle(others)
    return irrelevant, locality, interleave(train_irrelevant, train_locality, others)[:limit]


def pseudo_locality_kind(subject: str, prompt: str) -> str:
    """The kind (``NEGATIVE_KINDS``) of a pseudo edit's locality prompt: about that edit's own subject or not."""
    return "pseudo_same_subject" if mentions_subject(subject, prompt) else "pseudo_locality"


def encoder_trained_prompts(pseudo_edits: list, hard_groups: set[str]) -> set[str]:
    """Same-subject locality prompts of the pseudo edits the encoder drew hard negatives from: it may have
    trained on them, so they are not honest calibration data."""
    return {p.prompt for r in pseudo_edits if r.id in hard_groups for p in r.locality
            if pseudo_locality_kind(r.subject, p.prompt) == "pseudo_same_subject"}


def negative_kinds(negatives: list[str], irrelevant: set[str], pseudo_edits: list) -> torch.Tensor:
    """Which kind (``NEGATIVE_KINDS``) each negative is: the threshold must hold for the hardest kind alone."""
    same_subject = {p.prompt for r in pseudo_edits for p in r.locality
                    if pseudo_locality_kind(r.subject, p.prompt) == "pseudo_same_subject"}
    kind = {name: NEGATIVE_KINDS.index(name) for name in NEGATIVE_KINDS}
    return torch.tensor([kind["pseudo_irrelevant"] if t in irrelevant else
                         kind["pseudo_same_subject"] if t in same_subject else kind["pseudo_locality"]
                         for t in negatives], dtype=torch.long)


def calibration_texts(prep, heldout: set[str], hard_groups: set[str], pseudo_locality: list[str],
                      evaluation: set[str], n_train_negatives: int, max_positives: int, max_negatives: int,
                      seed: int, where="") -> CalibrationTexts:
    """The calibration set of a prepare artifact (one seeded stream, drawn in a fixed order), from pseudo data
    only: no evaluation text, no text the encoder trained on."""
    n = len(prep.edits)
    encoder_trained = encoder_trained_prompts(prep.pseudo_edits, hard_groups)
    rng = random.Random(seed)
    groups = heldout_pseudo_groups(prep, heldout, where)
    prompts, positives = memorised_pseudo_prompts(groups, prep, n, max_positives, rng)
    positive_texts = {p for _, g in groups for p in g["positives"]}
    irrelevant = sorted({r["prompt"] for r in prep.pseudo_irrelevant} - evaluation)
    locality = sorted(set(pseudo_locality) - set(prompts) - positive_texts - set(irrelevant) - encoder_trained)
    rng.shuffle(irrelevant)
    rng.shuffle(locality)
    memorised = set(prompts)
    neighbours = {p.prompt for r in prep.pseudo_edits if r.prompt in memorised for p in r.locality}
    locality = neighbours_first(locality, neighbours)
    train_negatives: list[str] = []
    if n_train_negatives > 0:
        irrelevant, locality, train_negatives = split_off_train_negatives(
            irrelevant, locality, neighbours, prep, memorised | positive_texts | evaluation, n_train_negatives, rng)
    negatives = interleave(irrelevant, locality)[:max_negatives]
    counts = {"memorised": len(prompts), "positive_groups": min(n, len(groups)), "positives": len(positives),
              "negatives": len(negatives), "negatives_neighbours_of_memorised": sum(t in neighbours for t in negatives),
              "padded_with_other_pseudo_originals": max(0, n - len(groups)), "train_negatives": len(train_negatives)}
    return CalibrationTexts(prompts, positives, positive_texts, negatives,
                            negative_kinds(negatives, set(irrelevant), prep.pseudo_edits), train_negatives, counts)


@dataclass
class RouterInputs:
    """What the familiarity module receives from its datamodule (``megedit.handover``)."""
    emb: dict[str, torch.Tensor]  # every embedded text group by name (``FamiliarityDataModule._texts``), and "shifts"
    calibrate: bool  # whether the calibration router trains (``calib_*`` groups exist)
    negative_kind: torch.Tensor | None  # per calibration negative, its index in NEGATIVE_KINDS
    calibration_counts: dict | None  # the calibration set's sizes, for the report
    locality_kinds: list[str]  # per edit locality prompt, its ``locality_kind``
    fences: dict  # {per_edit, templates, main}: the report's account of the main router's fences
    n_edits: int
    lineage: dict  # the prepare artifact's, for the manifest
    encoder: dict  # {encoder_dir, encoder_manifest_sha256}: which encoder the router's embeddings come from
    data_config: dict  # the datamodule's arguments, for the manifest
    upstream: dict  # {input stage: folder}, for the manifest

    @property
    def dim(self) -> int:
        return self.emb["edit_prompts"].shape[1]


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
        self.texts: dict[str, list[str]] | None = None
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
        texts = edit_texts(prep.edits)
        self.paraphrase_owner = [k for k, e in enumerate(prep.edits) for a in e.all_atoms() for _ in a.paraphrases]
        # Locality prompts about the edited subject (KnowEdit's relation specificity) are a harder test than
        # unrelated ones, and some restate the edited fact itself (``locality_kinds``): the report splits them.
        self.locality_kinds = [locality_kind(e, p) for e in prep.edits for p in e.locality]
        evaluation = {t for v in texts.values() for t in v}
        pseudo_locality = pseudo_locality_prompts(prep.pseudo_edits, evaluation)
        self.fence_templates = relation_templates(prep.pseudo_edits, evaluation) if hp.fences_per_edit > 0 else []
        texts["fences"] = self._fences([(e.subject, e.prompt) for e in prep.edits],
                                       exclude={normalise(t) for t in evaluation})
        if not hp.calibrate:
            if self.n_train_negatives > 0:
                texts["train_negatives"] = uncalibrated_train_negatives(prep, pseudo_locality, evaluation,
                                                                        self.n_train_negatives, hp.seed)
            return texts
        cal = calibration_texts(prep, heldout_groups(hp.encoder_dir), hard_negative_groups(hp.encoder_dir),
                                pseudo_locality, evaluation, self.n_train_negatives, hp.max_calibration_positives,
                                hp.max_calibration_negatives, hp.seed, where=hp.encoder_dir)
        self.calibration_negative_kind, self.calibration_counts = cal.negative_kind, cal.counts
        subject_of = {r.prompt: r.subject for r in prep.pseudo_edits}
        calib_fences = self._fences([(subject_of.get(t, ""), t) for t in cal.prompts],
                                    exclude={normalise(t) for t in evaluation | set(cal.negatives) | cal.positive_texts
                                             | set(cal.prompts)})
        texts.update(calib_prompts=cal.prompts, calib_positives=cal.positives, calib_negatives=cal.negatives,
                     train_negatives=cal.train_negatives, calib_fences=calib_fences)
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
        """Pick every text group; the encoder embeds them at ``handover``, after the module's ``request``."""
        if self.texts is not None:
            return
        self._check_inputs()
        texts = self._texts()
        texts.update(zip(("shift_originals", "shift_paraphrases"), self._shift_pairs(texts)))
        self.texts, self.fences_drawn, self.net_groups_embedded = texts, len(texts["fences"]), True

    def request(self, net_groups: bool = True) -> None:
        """What the module will use (``megedit.handover``), between ``setup`` and ``handover``: without
        ``net_groups`` (the nearest router, which learns nothing) the training negatives, fences and paraphrase
        shifts are not embedded. They are still drawn, so the calibration sets and the report's counts are
        the same either way; the report says whether they were embedded."""
        if self.texts is None or self.emb is not None:
            raise RuntimeError("FamiliarityDataModule.request comes after setup() and before handover()")
        self.net_groups_embedded = net_groups
        if not net_groups:
            self.texts.update({name: [] for name in NET_ONLY_GROUPS})

    def _embed(self) -> None:
        encoder = load_encoder(self.hparams.encoder_dir, check=False)  # _check_inputs read its manifest
        flat = [t for v in self.texts.values() for t in v]
        all_emb = embed_sharded(encoder, flat, self.hparams.embed_batch_size, progress=True)
        self.emb, start = {}, 0
        for name, v in self.texts.items():
            self.emb[name] = all_emb[start:start + len(v)]
            start += len(v)
        self.dim = self.emb["edit_prompts"].shape[1]
        self.emb["shifts"] = self.emb["shift_paraphrases"] - self.emb["shift_originals"]

    def handover(self) -> RouterInputs:
        if self.emb is None:
            self._embed()
        hp = self.hparams
        return RouterInputs(
            emb=self.emb, calibrate=hp.calibrate, negative_kind=getattr(self, "calibration_negative_kind", None),
            calibration_counts=getattr(self, "calibration_counts", None), locality_kinds=self.locality_kinds,
            fences={"per_edit": hp.fences_per_edit, "templates": len(self.fence_templates),
                    "main": self.fences_drawn, "embedded": self.net_groups_embedded},
            n_edits=len(self.prepared.edits), lineage=self.prepared.lineage,
            encoder={"encoder_dir": str(hp.encoder_dir), "encoder_manifest_sha256": self.encoder_manifest_sha256},
            data_config=dict(hp), upstream=upstream_dirs("familiarity", hp))

    def train_dataloader(self) -> DataLoader:
        n_calib = len(self.emb["calib_prompts"]) if self.hparams.calibrate else 0
        return router_loader(len(self.emb["edit_prompts"]), n_calib, self.hparams.batch_size,
                             self.hparams.num_workers)
