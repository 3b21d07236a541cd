"""(condition, neuron) pairs for the weight generator.

The condition of edit i is the tuned encoder's embedding of the *raw* edit prompt (the encoder
never sees the LM's template); the target is the neuron the collect stage found for edit i.
With ``zero_weight_aug`` the pseudo-irrelevant prompts are added with all-zero weights (paper
App. A.3): the generator learns to answer "no edit" for queries far from every edit.
With ``paraphrase_shifts`` an edit's condition is, at random (``shift_prob``), moved by the
displacement (paraphrase minus original, in embedding space) of a pseudo pair the encoder trained
on, so the generator learns that a paraphrase's embedding means its edit's neuron, not only the
prompt's own point (the familiarity router's ``paraphrase_shifts`` is the same idea).
With ``relation_views`` an edit's condition is, at random (``view_prob``), the embedding of one of its
*relation views* instead of its prompt: the edit's subject put into a rephrasing that another record of
the same relation template lends (``megedit.collect.views``; never an evaluation text, checked by the same
leak guard as collection). These are the displacements a paraphrase makes for this very edit, where the
shifts above are another pair's.
With ``pseudo_generality`` the collect stage's pseudo-edit neurons (its transfer diagnostic; records
that are never edited) are learnt too, and validation generates neurons from their *paraphrases'*
embeddings: the generated neurons' Generality against the collected ones', without any evaluation text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset, WeightedRandomSampler

from megedit.artifacts import ArtifactError, check_lineage, check_upstream, read_manifest
from megedit.collect.artifact import read_collected
from megedit.graph import upstream_dirs
from megedit.prepare.artifact import load_prepared

def validation_indices(n_edits: int, n_val: int, seed: int) -> list[int]:
    """The seeded subset of edits validation scores (sorted; all of them when ``n_val`` >= N)."""
    order = torch.randperm(n_edits, generator=torch.Generator().manual_seed(seed))
    return sorted(order[:min(n_val, n_edits)].tolist())


def favoured_rows(keep: torch.Tensor, favour_from: int | None) -> torch.Tensor | None:
    """Training rows of the edits from index ``favour_from`` on (None: nothing favoured). Training row
    r < sum(keep) is edit keep.nonzero()[r], so the favoured rows are the new edits' rows."""
    if favour_from is None:
        return None
    return (keep.nonzero().flatten() >= favour_from).nonzero().flatten()


class ShiftedConditions(Dataset):
    """(condition, neuron) pairs whose conditions are varied afresh at every draw.

    Row ``i`` with views (``view_rows[i]``, indices into ``view_cond``) is conditioned, with probability
    ``view_prob``, on one of them instead of its own embedding; then the first ``n_shiftable`` rows are
    moved, with probability ``prob``, by a random row of ``shifts`` (scaled by ``scale``) and re-normalised.
    """

    def __init__(self, cond: torch.Tensor, weights: torch.Tensor, shifts: torch.Tensor | None, n_shiftable: int,
                 prob: float, scale: float, view_cond: torch.Tensor | None = None,
                 view_rows: list[list[int]] | None = None, view_prob: float = 0.0):
        self.cond, self.weights, self.shifts = cond, weights, shifts
        self.n_shiftable, self.prob, self.scale = n_shiftable, prob, scale
        self.view_cond, self.view_rows, self.view_prob = view_cond, view_rows or [], view_prob

    def __len__(self) -> int:
        return len(self.cond)

    def __getitem__(self, i: int):
        cond = self.cond[i]
        views = self.view_rows[i] if i < len(self.view_rows) else ()
        if views and torch.rand(()) < self.view_prob:
            cond = self.view_cond[views[int(torch.randint(len(views), ()))]]
        if self.shifts is not None and i < self.n_shiftable and torch.rand(()) < self.prob:
            shift = self.shifts[torch.randint(len(self.shifts), ())]
            cond = F.normalize(cond + self.scale * shift, dim=-1)
        return cond, self.weights[i]


@dataclass
class GeneratorInputs:
    """What the diffusion module receives from its datamodule (``megedit.handover``); training batches
    are (condition, neuron) pairs, validation batches edit indices into ``edits`` / ``edit_cond``."""
    spec: object  # the prepare artifact's ModelSpec (prompt format, neuron layout, the LM to score on)
    edits: list  # the prepare artifact's EditRecords
    edit_cond: torch.Tensor  # [N, H] the edit prompts' embeddings
    edit_weights: torch.Tensor  # [N, D] the collected neurons
    success: torch.Tensor  # [N] bool: collection reproduced the target
    pseudo: dict | None  # the collect run's pseudo edits (``DiffusionDataModule._pseudo``), or None
    normalisation_weights: torch.Tensor  # the neurons the normalisation statistics come from
    validates: bool  # whether any edit is validated (the best checkpoint is chosen on val/score)
    trained_on: dict  # what the generator learnt from, for generator.json
    lineage: dict
    data_config: dict
    upstream: dict

    @property
    def neuron_dim(self) -> int:
        return self.edit_weights.shape[1]

    @property
    def cond_dim(self) -> int:
        return self.edit_cond.shape[1]


class DiffusionDataModule(L.LightningDataModule):
    def __init__(self, prepare_dir: str, encoder_dir: str, collect_dir: str, batch_size: int = 32,
                 only_successful: bool | None = None, zero_weight_aug: bool = False, n_zero: int | None = None,
                 val_edits: int = 128, val_batch_size: int = 64, seed: int = 0, embed_batch_size: int = 256,
                 num_workers: int = 0, paraphrase_shifts: int = 4096, shift_prob: float = 0.5,
                 shift_scale: float = 1.0, pseudo_generality: bool = True, relation_views: int = 0,
                 view_prob: float = 0.5, favour_from: int | None = None, favoured_share: float = 0.5):
        """
        Args:
            prepare_dir: the prepare artifact (edits, pseudo-irrelevant prompts, lineage).
            encoder_dir: the encoder artifact; its ``encoder/`` folder embeds the prompts.
            collect_dir: the collect artifact (``neurons.safetensors``: weights [N, D], success [N]).
            batch_size: training pairs per step and process.
            only_successful: train only on neurons whose collection reproduced the target (the paper's filter);
                None: follow the collect run (``model.drop_failed``, see ``megedit.collect.artifact.training_rows``).
            zero_weight_aug: add (pseudo-irrelevant prompt, zero vector) pairs (paper App. A.3).
            n_zero: how many pseudo-irrelevant prompts to use; None: all of them.
            val_edits: edits (seeded subset) on which validation samples weights and measures L2 and
                reliability; 0 turns validation off.
            val_batch_size: edits per validation step (one sampling batch).
            seed: seed of the validation subset.
            paraphrase_shifts: pseudo pairs (from the encoder's training groups, never a held-out group nor a
                text of the edits) whose displacements move the edits' conditions in training; 0: none.
            shift_prob: chance that a drawn edit pair is moved by one of them.
            shift_scale: the displacement's scale.
            pseudo_generality: learn the collect run's pseudo-edit neurons as well (when it saved them) and
                track, at each validation, generated against collected neurons on those pseudo edits'
                paraphrases (``val/pseudo_gen_*``).
            relation_views: up to this many relation views per edit (and per learnt pseudo edit) whose
                embeddings stand in for the edit's own condition in training; 0: none.
            view_prob: chance that a drawn pair with views is conditioned on one of them.
            favour_from: edits from this index on (the new edits a run version appends, ``megedit edits add``)
                make up ``favoured_share`` of the draws; the other rows (older edits, pseudo edits, zero
                vectors) share the rest, so a short fine-tuning learns the new edits while it rehearses the old.
                None: every pair is drawn equally often (shuffled epochs).
            favoured_share: the share of draws that go to the favoured edits, in (0, 1).
        """
        super().__init__()
        self.save_hyperparameters()
        if not 0.0 < favoured_share < 1.0:
            raise ValueError(f"data.favoured_share must be in (0, 1), got {favoured_share}")
        self.ready = False

    def setup(self, stage: str | None = None) -> None:
        if self.ready:
            return
        from megedit.encoder.artifact import load_encoder

        hp = self.hparams
        self.edit_weights, self.success = self._read_inputs()
        encoder = load_encoder(hp.encoder_dir, check=False)  # its manifest was read by _read_inputs
        self.edit_cond = encoder.embed([r.prompt for r in self.prepared.edits], batch_size=hp.embed_batch_size)
        self._training_pairs(encoder, self._learnt_edits(self.success))
        del encoder
        self.val_indices = validation_indices(len(self.prepared.edits), hp.val_edits, hp.seed)
        self.ready = True

    def _read_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Read the three input artifacts and check that they are one run's; the collected (weights, success)."""
        hp = self.hparams
        prepare_dir, encoder_dir, collect_dir = Path(hp.prepare_dir), Path(hp.encoder_dir), Path(hp.collect_dir)
        self.prepared = load_prepared(prepare_dir)
        self.encoder_manifest = read_manifest(encoder_dir, stage="encoder")
        self.collect_manifest, weights, success = read_collected(collect_dir)
        check_lineage({"prepare": self.prepared.manifest, "encoder": self.encoder_manifest,
                       "collect": self.collect_manifest})
        check_upstream(self.encoder_manifest, "prepare", prepare_dir, f"encoder artifact {encoder_dir}",
                       accept_ancestors=True)  # a run version extends the encoder's prepare artifact
        check_upstream(self.collect_manifest, "prepare", prepare_dir, f"collect artifact {collect_dir}")
        self.spec = self.prepared.spec
        if weights.shape[0] != len(self.prepared.edits):
            raise ArtifactError(f"{collect_dir}: {weights.shape[0]} neurons for {len(self.prepared.edits)} edits in "
                                f"{prepare_dir}")
        if weights.shape[1] != self.spec.neuron_dim:
            raise ArtifactError(f"{collect_dir}: neurons have {weights.shape[1]} values; model {self.spec.name} "
                                f"needs {self.spec.neuron_dim}")
        return weights, success

    def _learnt_edits(self, success: torch.Tensor) -> torch.Tensor:
        """Which edits' neurons the generator learns (bool [N]): the collect run's choice unless overridden."""
        hp = self.hparams
        if hp.only_successful is None:
            from megedit.collect.artifact import training_rows

            keep = torch.zeros_like(success)
            keep[training_rows(success, self.collect_manifest)] = True
        else:
            keep = success if hp.only_successful else torch.ones_like(success)
        if not keep.any():
            raise ArtifactError(f"{hp.collect_dir}: no successfully collected neuron to train on "
                                "(set data.only_successful false to train on all of them)")
        return keep

    def _training_pairs(self, encoder, keep: torch.Tensor) -> None:
        """The (condition, neuron) rows in training order: learnt edits, learnt pseudo edits, zero vectors;
        and what varies their conditions (paraphrase shifts, relation views)."""
        hp, edits, weights = self.hparams, self.prepared.edits, self.edit_weights
        cond, target = [self.edit_cond[keep]], [weights[keep]]
        self.pseudo = self._pseudo(encoder, Path(hp.collect_dir))
        if self.pseudo is not None:  # learnt like edits (before the zero rows: shifts move them too)
            cond.append(self.pseudo["cond"][self.pseudo["success"]])
            target.append(self.pseudo["weights"][self.pseudo["success"]])
        self.n_zero = 0
        if hp.zero_weight_aug:
            irrelevant = self.prepared.pseudo_irrelevant[: hp.n_zero]
            if not irrelevant:
                raise ArtifactError(f"{hp.prepare_dir}: zero_weight_aug needs pseudo-irrelevant prompts; there are none")
            cond.append(encoder.embed([r["prompt"] for r in irrelevant], batch_size=hp.embed_batch_size))
            target.append(torch.zeros(len(irrelevant), weights.shape[1]))
            self.n_zero = len(irrelevant)
        self.shifts = self._shifts(encoder, edits)
        train_records = [r for r, k in zip(edits, keep.tolist()) if k]
        if self.pseudo is not None:
            train_records += [r for r, ok in zip(self.pseudo["records"], self.pseudo["success"].tolist()) if ok]
        self.view_cond, self.view_rows, self.view_texts = self._views(encoder, train_records)
        self.train_cond, self.train_weights = torch.cat(cond), torch.cat(target)
        self.n_train_edits = int(keep.sum())
        self.favoured_rows = favoured_rows(keep, hp.favour_from)
        self.n_shiftable = self.n_train_edits + (int(self.pseudo["success"].sum()) if self.pseudo else 0)

    def _pseudo(self, encoder, collect_dir: Path) -> dict | None:
        """The collect run's pseudo-edit neurons with their prompts' and paraphrases' embeddings, or None."""
        from megedit.collect.artifact import load_pseudo_neurons

        got = load_pseudo_neurons(collect_dir) if self.hparams.pseudo_generality else None
        if got is None:
            return None
        ids, weights, success = got
        by_id = {r.id: r for r in self.prepared.pseudo_edits}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise ArtifactError(f"{collect_dir}: pseudo neurons for ids {missing[:3]} that {self.hparams.prepare_dir} "
                                "does not hold")
        records = [by_id[i] for i in ids]
        para = [(k, p) for k, r in enumerate(records) if success[k] for p in r.paraphrases]
        bs = self.hparams.embed_batch_size
        return {"records": records, "weights": weights.float(), "success": success,
                "cond": encoder.embed([r.prompt for r in records], batch_size=bs),
                "para_rows": [k for k, _ in para], "para_texts": [p for _, p in para],
                "para_cond": encoder.embed([p for _, p in para], batch_size=bs)}

    def _views(self, encoder, records: list) -> tuple[torch.Tensor | None, list[list[int]], list[list[str]]]:
        """Embeddings of the training records' relation views: ``(cond [V, H], rows, texts)``, where
        ``rows[i]`` indexes ``cond`` for training row ``i``. Views are lent by pseudo edits that are not
        themselves learnt here, and never equal an edit's or a learnt pseudo edit's evaluation text."""
        from megedit.collect.views import LeakGuard, evaluation_texts, relation_views

        k = self.hparams.relation_views
        # A several-atom edit's other atomic prompts are views of its one neuron (paper App. A.6.2).
        atoms = [[a.prompt for a in r.atoms] for r in records]
        if k <= 0 and not any(atoms):
            return None, [], []
        texts = [[] for _ in records]
        if k > 0:
            learnt = {r.id for r in records}
            pool = [r for r in self.prepared.pseudo_edits if r.id not in learnt]
            guard = LeakGuard(evaluation_texts(self.prepared.edits) + evaluation_texts(records))
            texts = relation_views(records, pool, k, guard, seed=self.hparams.seed)
        texts = [a + v for a, v in zip(atoms, texts)]
        flat = [t for views in texts for t in views]
        rows, start = [], 0
        for views in texts:
            rows.append(list(range(start, start + len(views))))
            start += len(views)
        cond = encoder.embed(flat, batch_size=self.hparams.embed_batch_size) if flat else None
        covered = sum(bool(v) for v in texts)
        print(f"diffusion: {len(flat)} views (atoms, relation views) for {covered} of {len(records)} learnt records")
        return cond, rows, texts

    @property
    def view_coverage(self) -> dict:
        """How many learnt records have relation views, and how many views in all."""
        return {"per_record": self.hparams.relation_views, "view_prob": self.hparams.view_prob,
                "records": len(self.view_rows), "records_with_views": sum(bool(r) for r in self.view_rows),
                "views": sum(len(r) for r in self.view_rows)}

    def _shifts(self, encoder, edits) -> torch.Tensor | None:
        """``[M, H]`` paraphrase displacements of pseudo pairs the encoder trained on, or None."""
        from megedit.encoder.artifact import heldout_groups
        from megedit.familiarity.familiarity_datamodule import shift_pairs

        hp = self.hparams
        if hp.paraphrase_shifts <= 0:
            return None
        heldout = heldout_groups(hp.encoder_dir)  # empty when the encoder held nothing out
        edit_texts = [t for r in edits for t in (r.prompt, *r.paraphrases, *(q.prompt for q in r.locality))]
        originals, paraphrases = shift_pairs(self.prepared.pseudo_pairs, heldout, edit_texts,
                                             hp.paraphrase_shifts, hp.seed)
        if not originals:  # e.g. a prepare run without a paraphrase source: train on the plain conditions
            print(f"diffusion: {hp.prepare_dir} has no pseudo pairs outside the encoder's held-out groups; "
                  "training without paraphrase shifts")
            return None
        emb = encoder.embed(originals + paraphrases, batch_size=hp.embed_batch_size)
        return emb[len(originals):] - emb[: len(originals)]

    @property
    def normalisation_weights(self) -> torch.Tensor:
        """Weights the normalisation statistics come from: the edits' neurons, never the zero vectors."""
        return self.train_weights[: self.n_train_edits]

    def handover(self) -> GeneratorInputs:
        hp = self.hparams
        trained_on = {"edits": self.n_train_edits, "zero_vectors": self.n_zero,
                      "pseudo_edits": self.n_shiftable - self.n_train_edits,
                      "paraphrase_shifts": 0 if self.shifts is None else len(self.shifts),
                      "relation_views": self.view_coverage, "only_successful": self.n_train_edits < len(self.success)}
        return GeneratorInputs(spec=self.spec, edits=self.prepared.edits, edit_cond=self.edit_cond,
                               edit_weights=self.edit_weights, success=self.success, pseudo=self.pseudo,
                               normalisation_weights=self.normalisation_weights, validates=hp.val_edits > 0,
                               trained_on=trained_on, lineage=self.prepared.lineage, data_config=dict(hp),
                               upstream=upstream_dirs("diffusion", hp))

    def train_dataloader(self) -> DataLoader:
        hp = self.hparams
        if self.shifts is None and self.view_cond is None:
            data = TensorDataset(self.train_cond, self.train_weights)
        else:  # only the edits' rows move; the zero-weight rows stay where the irrelevant prompts are
            data = ShiftedConditions(self.train_cond, self.train_weights, self.shifts, self.n_shiftable,
                                     hp.shift_prob, hp.shift_scale, self.view_cond, self.view_rows,
                                     hp.view_prob)
        sampler = self._favouring_sampler(len(data))
        return DataLoader(data, batch_size=self.hparams.batch_size, shuffle=sampler is None, sampler=sampler,
                          drop_last=False, num_workers=self.hparams.num_workers)

    def _favouring_sampler(self, n_rows: int) -> WeightedRandomSampler | None:
        """Draws (with replacement, ``n_rows`` per epoch) that give the favoured rows ``favoured_share`` of
        the batch; None when nothing is favoured."""
        rows = self.favoured_rows
        if rows is None:
            return None
        if len(rows) == 0:
            print("diffusion: data.favour_from names no successfully collected edit; drawing every pair equally")
            return None
        share = self.hparams.favoured_share if len(rows) < n_rows else 1.0
        weights = torch.full((n_rows,), (1.0 - share) / max(1, n_rows - len(rows)))
        weights[rows] = share / len(rows)
        return WeightedRandomSampler(weights, num_samples=n_rows, replacement=True)

    def val_dataloader(self) -> DataLoader:
        # Edit indices; the module samples, scores and gathers them (duplicates from DDP padding are dropped).
        return DataLoader(self.val_indices, batch_size=self.hparams.val_batch_size, shuffle=False)
