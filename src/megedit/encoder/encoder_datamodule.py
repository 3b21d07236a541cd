"""Serves (original, paraphrase) pseudo-edit pairs for the encoder, with a held-out split by group.

Pairs come only from ``Prepared.pseudo_pairs`` (pseudo edits that are never edited, and the
paraphrase corpus, already filtered against the edits' evaluation texts); hard-negative triples
(``hard_negatives.py``) from the training pseudo edits, never an evaluation text. Groups (one
original and its paraphrases) are split whole into train and held-out, stratified by source,
so the held-out recall measures transfer to unseen facts. The held-out group ids are saved
with the encoder: the familiarity stage calibrates its threshold on them, which the encoder
never trained on.

A killed run resumes mid-epoch exactly where it was (``state_dict``): each training loader shuffles
with a ``ResumableRandomSampler``, which draws its order as torch's ``RandomSampler`` does and
remembers the seed, so the epoch's order is replayed from the batch after the last one trained on.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from dataclasses import dataclass

import lightning as L
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset, RandomSampler

from megedit.data.locality_kinds import locality_kind
from megedit.distributed import world
from megedit.encoder.hard_negatives import HardNegativeTriples, build_sources
from megedit.graph import upstream_dirs
from megedit.prepare.artifact import Prepared, load_prepared


class GroupPairs(Dataset):
    """One item per group: its original and one of its paraphrases, drawn anew on every access.

    Drawing one pair per group per epoch keeps every batch free of two pairs sharing an
    original, which would make the other one a false negative in InfoNCE.
    """

    def __init__(self, groups: list[tuple[str, list[str]]], seed: int):
        self.groups, self.seed, self.epoch = groups, seed, 0

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i: int) -> dict:
        anchor, positives = self.groups[i]
        pick = random.Random(hash((self.seed, self.epoch, i))).randrange(len(positives))
        return {"anchor": anchor, "positive": positives[pick]}


class IndexedTexts(Dataset):
    def __init__(self, texts: list[str]):
        self.texts = texts

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict:
        return {"index": i, "text": self.texts[i]}


class ResumableRandomSampler(RandomSampler):
    """torch's ``RandomSampler`` (a fresh permutation per pass, its seed drawn from the global torch RNG
    when the pass starts), which remembers that seed and can replay a pass from an offset.

    A fresh run draws exactly what ``DataLoader(shuffle=True)`` draws (same global RNG use, same order),
    so adding it changed no result. ``resume(seed, skip)`` makes the next pass the permutation of
    ``seed`` without its first ``skip`` indices, drawing nothing from the global RNG. Under DDP Lightning
    replaces it with a ``DistributedSampler`` (it is a ``RandomSampler``: shuffled), as before.
    """

    def __init__(self, data_source):
        super().__init__(data_source)
        self.seed: int | None = None  # seed of the current pass's permutation (None before the first)
        self._resume: tuple[int, int] | None = None

    def resume(self, seed: int, skip: int) -> None:
        self._resume = (seed, skip)

    def __iter__(self):
        if self._resume is not None:
            (seed, skip), self._resume = self._resume, None
        else:  # as RandomSampler.__iter__ without a generator
            seed, skip = int(torch.empty((), dtype=torch.int64).random_().item()), 0
        self.seed = seed
        generator = torch.Generator()
        generator.manual_seed(seed)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()[skip:]


def _collate_pairs(batch: list[dict]) -> dict:
    return {"anchor": [b["anchor"] for b in batch], "positive": [b["positive"] for b in batch]}


def _collate_triples(batch: list[dict]) -> dict:
    return {k: [b[k] for b in batch] for k in ("anchor", "positive", "negative")}


def _collate_texts(batch: list[dict]) -> dict:
    return {"index": torch.tensor([b["index"] for b in batch]), "text": [b["text"] for b in batch]}


def group_pairs(pairs: list[dict]) -> dict[str, dict]:
    """``{group: {anchor, positives[], source}}`` in first-seen order; positives deduplicated."""
    groups: dict[str, dict] = {}
    for p in pairs:
        g = groups.setdefault(p["group"], {"anchor": p["anchor"], "positives": [], "source": p.get("source", "")})
        if p["anchor"] != g["anchor"]:
            raise ValueError(f"pseudo pair group {p['group']!r} has two different originals: "
                             f"{g['anchor']!r} and {p['anchor']!r}")
        if p["positive"] != p["anchor"] and p["positive"] not in g["positives"]:
            g["positives"].append(p["positive"])
    return {k: v for k, v in groups.items() if v["positives"]}


def split_groups(groups: dict[str, dict], seed: int, val_fraction: float, min_val_per_source: int,
                 max_val_per_source: int) -> tuple[list[str], list[str]]:
    """Held-out groups per source: ``val_fraction`` of them, at least ``min_val_per_source`` (never more
    than half a source), at most ``max_val_per_source``."""
    by_source = defaultdict(list)
    for gid, g in groups.items():
        by_source[g["source"]].append(gid)
    train, val = [], []
    for source in sorted(by_source):
        ids = sorted(by_source[source])
        random.Random(f"{seed}:{source}").shuffle(ids)
        n_val = max(round(val_fraction * len(ids)), min(min_val_per_source, len(ids) // 2))
        n_val = min(n_val, max_val_per_source)
        val += ids[:n_val]
        train += ids[n_val:]
    return train, val


@dataclass
class RetrievalTexts:
    """Queries scored against keys: query ``i``'s right key is ``keys[targets[i]]``."""
    keys: list[str]
    queries: list[str]
    targets: list[int]

    @property
    def texts(self) -> list[str]:
        """Keys then queries: the order of the validation batches' ``index``."""
        return self.keys + self.queries


@dataclass
class EncoderInputs:
    """What the encoder module receives from its datamodule (``megedit.handover``); batches are the training
    pairs (and triples) and the held-out texts."""
    heldout: RetrievalTexts  # held-out pseudo originals (keys) and their paraphrases (queries): never trained on
    edits: RetrievalTexts  # the edit prompts (keys) and their evaluation paraphrases (queries): never trained on
    same_subject: list[tuple[int, str]]  # (edit index, a locality prompt about that edit's subject)
    counts: dict  # {train_groups, heldout_groups, heldout_queries, edits}, for the report
    hard_negative_counts: dict  # what ``hard_negatives.build_sources`` found, for the report
    triples: bool  # whether the training batches carry hard-negative triples
    heldout_groups: list[str]  # the held-out group ids (``heldout_groups.json``)
    hard_negative_groups: list[str]  # the pseudo edits the served triples come from (empty: none served)
    seed: int  # the split's seed, recorded beside the held-out groups
    lineage: dict  # the prepare artifact's, for the manifest
    data_config: dict  # the datamodule's arguments, for the manifest
    upstream: dict  # {input stage: folder}, for the manifest


def edit_retrieval_texts(edits: list) -> RetrievalTexts:
    """The edit prompts against their evaluation paraphrases: never trained on."""
    return RetrievalTexts([e.prompt for e in edits], [p for e in edits for p in e.paraphrases],
                          [k for k, e in enumerate(edits) for _ in e.paraphrases])


def same_subject_prompts(edits: list) -> list[tuple[int, str]]:
    """(edit index, locality prompt) for each locality prompt about its edit's own subject: whether a paraphrase
    is closer to its edit than another fact about the same subject is (never trained on)."""
    return [(k, p.prompt) for k, e in enumerate(edits) for p in e.locality if locality_kind(e, p) == "same_subject"]


class EncoderDataModule(L.LightningDataModule):
    def __init__(self, prepare_dir: str, batch_size: int = 64, val_fraction: float = 0.05,
                 min_val_per_source: int = 256, max_val_per_source: int = 300, max_train_groups: int | None = None,
                 seed: int = 0, eval_batch_size: int = 256, num_workers: int = 0, hard_negatives: bool = True,
                 hard_negative_batch_size: int = 16):
        """
        Args:
            prepare_dir: the prepare stage's output folder.
            batch_size: pairs per step per device; the other originals in the batch (of every
                device, under DDP) are the negatives of eq. 5.
            val_fraction: share of the pseudo groups of each source held out (never trained on).
            min_val_per_source: held out per source at least this many groups (at most half of it),
                so a small source (ZsRE's few pseudo edits) still leaves enough for threshold calibration.
            max_val_per_source: cap on held-out groups per source (retrieval among more is slow and adds little).
            max_train_groups: keep at most this many training groups (seeded); None keeps all.
            seed: seed of the split and of the pair draws.
            eval_batch_size: texts per embedding batch in validation.
            hard_negatives: also train on (original, paraphrase, hard negative) triples from the training
                pseudo edits (``hard_negatives.py``: another fact about the subject, or the question about
                another subject); only the ``infonce`` objective with ``model.hard_negative_weight`` > 0
                uses them. A dataset without relation-specificity locality prompts (CounterFact) has none,
                and training is eq. 5 alone.
            hard_negative_batch_size: triples per step per device, besides ``batch_size`` pairs.
        """
        super().__init__()
        self.save_hyperparameters()
        self.prepared: Prepared | None = None
        self._samplers: dict[str, ResumableRandomSampler] = {}  # by training loader
        self._resume: dict | None = None  # a checkpoint's data position, until the loaders are built

    def setup(self, stage: str | None = None) -> None:
        if self.prepared is not None:
            return
        hp = self.hparams
        self.prepared = load_prepared(hp.prepare_dir)
        self.groups = group_pairs(self.prepared.pseudo_pairs)
        if len(self.groups) < 4:
            raise ValueError(f"{hp.prepare_dir}: only {len(self.groups)} pseudo-pair groups with a paraphrase; "
                             "the encoder needs more (raise data.max_pseudo_edits in the prepare stage)")
        self.train_ids, self.val_ids = split_groups(self.groups, hp.seed, hp.val_fraction, hp.min_val_per_source,
                                                    hp.max_val_per_source)
        if hp.max_train_groups is not None and len(self.train_ids) > hp.max_train_groups:
            self.train_ids = random.Random(hp.seed).sample(self.train_ids, hp.max_train_groups)
        self.train_set = GroupPairs([(self.groups[g]["anchor"], self.groups[g]["positives"]) for g in self.train_ids],
                                    hp.seed)
        # Held-out retrieval: every held-out paraphrase against every held-out original.
        self.val_anchors = [self.groups[g]["anchor"] for g in self.val_ids]
        self.val_queries, self.val_targets = [], []
        for k, g in enumerate(self.val_ids):
            for p in self.groups[g]["positives"]:
                self.val_queries.append(p)
                self.val_targets.append(k)
        self.val_texts = self.val_anchors + self.val_queries
        self.hard_set, self.hard_negative_counts = None, {"sources": 0}
        if hp.hard_negatives and hp.hard_negative_batch_size > 0:
            self.hard_set = self._hard_set()

    def _hard_set(self) -> HardNegativeTriples | None:
        """Triples from the training pseudo edits, never an evaluation text (None: the data has no source)."""
        hp = self.hparams
        evaluation = {t for e in self.prepared.edits
                      for t in (e.prompt, *e.paraphrases, *(p.prompt for p in e.locality))}
        sources, templates, self.hard_negative_counts = build_sources(
            self.prepared.pseudo_edits, set(self.train_ids), evaluation)
        if not sources:
            return None
        # As many triple batches per rank as pair batches (each loader is sharded on its own).
        size = world()[1]
        per_rank = math.ceil(len(self.train_set) / size)
        pair_batches = per_rank // max(1, min(hp.batch_size, len(self.train_set)))
        return HardNegativeTriples(sources, templates, hp.seed,
                                   length=pair_batches * hp.hard_negative_batch_size * size)

    @property
    def hard_negative_groups(self) -> list[str]:
        """The pseudo edits the triples come from: the encoder may train on their own locality prompts (as
        natural negatives or rebuilt from a template), so calibration must not score those."""
        return sorted(s.group for s in self.hard_set.sources) if self.hard_set else []

    def request(self, triples: bool = True) -> None:
        """What the module will train on (``megedit.handover``, before ``handover``): without ``triples`` no
        triple loader is built, so the pair batches are those of ``hard_negatives: false`` (no loader draws from
        the RNG for them), and the artifact names no hard-negative group."""
        if not triples:
            self.hard_set = None

    def set_epoch(self, epoch: int) -> None:
        """A fresh paraphrase (and triple) draw per group each epoch. ``megedit.handover.DataEpoch`` calls it at
        an epoch's start: Lightning's own ``set_epoch`` reaches the samplers only, which it replaces under DDP."""
        self.train_set.epoch = epoch
        if self.hard_set is not None:
            self.hard_set.epoch = epoch

    def handover(self) -> EncoderInputs:
        hp, edits = self.hparams, self.prepared.edits
        heldout = RetrievalTexts(self.val_anchors, self.val_queries, self.val_targets)
        counts = {"train_groups": len(self.train_ids), "heldout_groups": len(self.val_ids),
                  "heldout_queries": len(self.val_queries), "edits": len(edits)}
        return EncoderInputs(heldout, edit_retrieval_texts(edits), same_subject_prompts(edits), counts,
                             self.hard_negative_counts, self.hard_set is not None, list(self.val_ids),
                             self.hard_negative_groups, hp.seed, self.prepared.lineage, dict(hp),
                             upstream_dirs("encoder", hp))

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        """Where training is in the data, saved in every checkpoint: the epoch, the batches of it trained
        on, and the seed of each loader's current pass (None where Lightning replaced the sampler: under DDP
        a resumed epoch starts its data over)."""
        if self.trainer is None or not self._samplers:
            return {}
        return {"epoch": self.trainer.current_epoch,
                "batches": self.trainer.fit_loop.epoch_loop.batch_progress.current.processed,
                "seeds": {name: sampler.seed for name, sampler in self._samplers.items()}}

    def load_state_dict(self, state: dict) -> None:
        # Restored before the trainer builds the loaders (train_dataloader below).
        self._resume = state or None

    def _loader(self, name: str, dataset: Dataset, batch_size: int, collate_fn, resume: dict | None) -> DataLoader:
        sampler = ResumableRandomSampler(dataset)
        # drop_last: under DDP every rank must contribute the same number of originals to the gathered negatives.
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True, collate_fn=collate_fn,
                            num_workers=self.hparams.num_workers)
        seed = (resume or {}).get("seeds", {}).get(name)
        if seed is not None:
            # The pass the checkpoint was in, from the batch after the last one trained on. A loader shorter
            # than the epoch (CombinedLoader's max_size_cycle) starts a new pass whenever it runs out.
            sampler.resume(seed, (resume["batches"] % len(loader)) * batch_size)
        self._samplers[name] = sampler
        return loader

    def train_dataloader(self) -> DataLoader | CombinedLoader:
        resume, self._resume = self._resume, None
        if resume:  # the trainer builds the loaders before it restores its loops: the epoch is the checkpoint's
            epoch = resume["epoch"]
            if any(seed is not None for seed in resume["seeds"].values()):
                import warnings

                from lightning.pytorch.utilities.warnings import PossibleUserWarning

                # Lightning warns that a plain DataLoader starts a resumed epoch's data over; these replay it.
                warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the "
                                        "epoch ended", category=PossibleUserWarning)
        else:
            epoch = self.trainer.current_epoch if self.trainer is not None else None
        if epoch is not None:
            self.set_epoch(epoch)
        self._samplers = {}
        pairs = self._loader("pairs", self.train_set, min(self.hparams.batch_size, len(self.train_set)),
                             _collate_pairs, resume)
        if self.hard_set is None:
            return pairs
        triples = self._loader("triples", self.hard_set,
                               min(self.hparams.hard_negative_batch_size, len(self.hard_set)), _collate_triples, resume)
        # One triple batch per pair batch (the triple set's length is sized so), so neither loader cycles.
        return CombinedLoader({"pairs": pairs, "triples": triples}, mode="max_size_cycle")

    def val_dataloader(self) -> DataLoader:
        return DataLoader(IndexedTexts(self.val_texts), batch_size=self.hparams.eval_batch_size, shuffle=False,
                          collate_fn=_collate_texts, num_workers=self.hparams.num_workers)
