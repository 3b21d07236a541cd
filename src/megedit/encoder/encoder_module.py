"""Fine-tunes the registry's query encoder so a paraphrase lands next to its original (paper eq. 5).

Objectives (paper Table 4): ``infonce`` (the method), ``mse`` (pull pairs together, no
negatives) and ``frozen`` (no training: the base encoder is packaged as is, for the ablation).
The stage writes the encoder artifact (``megedit.encoder.artifact``: the tuned ``encoder/``, the
held-out groups, ``report.json`` with retrieval on held-out pseudo pairs and on the edits' own
paraphrases, tuned vs frozen, and the manifest).

A killed run resumes (re-run the same command): ``checkpoints/last.ckpt`` is refreshed every
``checkpoint_every_n_steps`` steps in the middle of an epoch, with the RNG states and the data
position (``EncoderDataModule.state_dict``), so the resumed run trains on the same batches with the
same dropout masks as an uninterrupted one (one process; under DDP an interrupted epoch starts its
data over).
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path
from typing import Literal

import lightning as L
import numpy as np
import torch

from megedit.artifacts import read_manifest, write_manifest
from megedit.components.contrastive import (info_nce, info_nce_with_hard_negatives, mse_alignment, pairwise_auc,
                                           retrieval_metrics)
from megedit.components.text_encoder import TextEncoder
from megedit.distributed import barrier, gather_objects, world
from megedit.encoder.artifact import write_encoder_artifact
from megedit.encoder.encoder_datamodule import EncoderInputs, RetrievalTexts
from megedit.encoder.hard_negatives import first_triple_per_anchor
from megedit.handover import DataEpoch, HandOver
from megedit.resume import CHECKPOINT_DIR, StepResumePoint


class EncoderModule(L.LightningModule):
    resumable = True  # the stage CLI resumes checkpoints/last.ckpt of the same run (megedit.resume)
    # The learning rate decays to 0 at the budget's last step: a run with another budget is another run.
    fingerprinted_trainer_settings = ("max_epochs", "max_steps", "limit_train_batches", "devices", "num_nodes")

    def __init__(self, prepare_dir: str, out_dir: str = "runs/encoder", encoder: str | None = None,
                 objective: Literal["infonce", "mse", "frozen"] = "infonce", pooling: Literal["cls", "mean"] = "cls",
                 temperature: float = 0.05, lr: float = 3e-5, weight_decay: float = 0.01, warmup_fraction: float = 0.1,
                 max_length: int = 64, gather_negatives: bool = True, eval_batch_size: int = 256,
                 hard_negative_weight: float = 1.0, checkpoint_every_n_steps: int = 20):
        """
        Args:
            prepare_dir: the prepare artifact (linked from ``data.prepare_dir``); gives the registry encoder.
            out_dir: where the encoder artifact goes.
            encoder: encoder source overriding the registry's (hub id, folder, ``pkg://``); None: the registry's.
            objective: ``infonce`` (eq. 5), ``mse`` (ablation), ``frozen`` (ablation: no training).
            pooling: ``cls`` as in the paper, or ``mean``.
            temperature: tau of eq. 5 (cosine similarities are divided by it).
            lr: AdamW learning rate (linear warm-up, then linear decay to 0).
            weight_decay: AdamW weight decay (not on biases and LayerNorms).
            warmup_fraction: share of the steps spent warming up.
            max_length: tokens per text (prompts are short; longer ones are truncated).
            gather_negatives: under DDP, use the originals of every rank as negatives (a larger
                effective batch, as the paper's); False keeps each rank's own.
            eval_batch_size: texts per batch when embedding for the report.
            hard_negative_weight: weight of the hard-negative triple loss (``data.hard_negatives``)
                added to eq. 5; 0 trains eq. 5 alone. Each rank uses its own triples.
            checkpoint_every_n_steps: how often ``out_dir/checkpoints/last.ckpt``, the resume point after a
                kill, is refreshed (in optimiser steps, never on an epoch's last batch; 0: never). Removed
                once the encoder is written; it changes no result.
        """
        super().__init__()
        self.save_hyperparameters()
        if temperature <= 0:
            raise ValueError(f"model.temperature must be > 0, got {temperature}")
        prepare_manifest = read_manifest(prepare_dir, stage="prepare", verify=False)
        self.encoder_source = encoder or prepare_manifest["model_spec"]["encoder"]
        self.encoder = self._load_base()
        self.inputs: EncoderInputs | None = None  # received from the datamodule (megedit.handover)
        self._val_store: dict[int, torch.Tensor] = {}
        self._started = time.time()
        self.resumed_from: str | None = None  # set by the stage CLI
        self._rng_to_restore: dict | None = None

    def _load_base(self) -> TextEncoder:
        enc = TextEncoder.from_source(self.encoder_source)
        # The configured pooling wins even over a saved megedit encoder's pooling.json.
        enc.pooling, enc.max_length = self.hparams.pooling, self.hparams.max_length
        # BERT's pooler head is not part of either pooling: frozen, so DDP finds no unused trainable weights.
        for name, p in enc.backbone.named_parameters():
            if name.startswith("pooler."):
                p.requires_grad_(False)
        return enc

    # ------------------------------------------------------------------ training
    @property
    def trains_on_triples(self) -> bool:
        """Only infonce with a positive weight adds the hard-negative loss to eq. 5."""
        return self.hparams.objective == "infonce" and self.hparams.hard_negative_weight > 0

    def data_request(self) -> dict:
        # Without triples the run is eq. 5's alone, on the same batches as data.hard_negatives false.
        return {"triples": self.trains_on_triples}

    def receive(self, inputs: EncoderInputs) -> None:
        self.inputs = inputs

    def setup(self, stage: str) -> None:
        if self.hparams.objective == "frozen":
            self.trainer.limit_train_batches = 0  # the fit loop is skipped; on_fit_end still packages the encoder

    def configure_callbacks(self):
        return [HandOver(), DataEpoch(), StepResumePoint(self.hparams.out_dir, self.hparams.checkpoint_every_n_steps)]

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The RNG streams (dropout; the next pass's shuffle seed) as they are after this step, so a resumed run
        # draws what the uninterrupted one draws next. Plain types: the checkpoint loads with weights_only.
        np_state = np.random.get_state()
        checkpoint["megedit_rng"] = {
            "world_size": world()[1], "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "python": random.getstate(),
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Restored at the first resumed step (on_train_batch_start): building the loaders draws from the RNG first.
        rng = checkpoint.get("megedit_rng")
        if rng is not None and rng["world_size"] == 1 and world()[1] == 1:
            self._rng_to_restore = rng

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        rng, self._rng_to_restore = self._rng_to_restore, None
        if rng is None:
            return
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
        random.setstate(rng["python"])
        name, keys, *rest = rng["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))

    def on_fit_start(self) -> None:
        self.encoder.train()  # from_pretrained returns eval mode; dropout is part of the fine-tuning recipe

    def _embed_batch(self, texts: list[str]) -> torch.Tensor:
        batch = {k: v.to(self.device) for k, v in self.encoder.tokenize(texts).items()}
        return self.encoder(**batch)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        triples = None
        if "pairs" in batch:  # a CombinedLoader batch: pairs plus hard-negative triples
            batch, triples = batch["pairs"], batch["triples"]
            triples = first_triple_per_anchor(triples)
        originals = self._embed_batch(batch["anchor"])
        paraphrases = self._embed_batch(batch["positive"])
        rank, size = world()
        if self.hparams.objective == "mse":
            loss = mse_alignment(paraphrases, originals)
        elif size > 1 and self.hparams.gather_negatives:
            import torch.distributed.nn.functional as dist_nn

            # all_gather with autograd: every rank's originals are negatives, gradients flow back to their owner
            all_originals = torch.cat(dist_nn.all_gather(originals))
            loss = info_nce(paraphrases, all_originals, self.hparams.temperature, target_offset=rank * originals.shape[0])
        else:
            loss = info_nce(paraphrases, originals, self.hparams.temperature)
        with torch.no_grad():
            pos = (paraphrases * originals).sum(-1).mean()
        if triples is not None and self.trains_on_triples:
            a, p, n = (self._embed_batch(triples[k]) for k in ("anchor", "positive", "negative"))
            hard = info_nce_with_hard_negatives(a, p, n, self.hparams.temperature)
            loss = loss + self.hparams.hard_negative_weight * hard
            with torch.no_grad():
                gap = ((a * p).sum(-1) - (a * n).sum(-1)).mean()
            self.log("train/hard_negative_loss", hard, batch_size=len(triples["anchor"]))
            self.log("train/hard_negative_cosine_gap", gap, batch_size=len(triples["anchor"]))
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["anchor"]))
        self.log("train/positive_cosine", pos, batch_size=len(batch["anchor"]))
        return loss

    def configure_optimizers(self):
        decay, no_decay = [], []
        for p in self.encoder.parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 else decay).append(p)
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": self.hparams.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=self.hparams.lr)
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self.hparams.objective != "frozen" else 1
        warmup = max(1, int(self.hparams.warmup_fraction * total))

        def schedule(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            return max(0.0, (total - step) / max(1, total - warmup))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ------------------------------------------------------------------ validation (held-out pseudo pairs)
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        emb = self._embed_batch(batch["text"]).float().cpu()
        for i, e in zip(batch["index"].tolist(), emb):
            self._val_store[i] = e

    def on_validation_epoch_end(self) -> None:
        store: dict[int, torch.Tensor] = {}
        for part in gather_objects(self._val_store):  # DDP: each rank embedded a shard (padded with repeats)
            store.update(part)
        self._val_store = {}
        heldout = self.inputs.heldout
        if len(store) < len(heldout.texts):  # sanity check ran only a few batches
            return
        emb = torch.stack([store[i] for i in range(len(heldout.texts))])
        n = len(heldout.keys)
        m = retrieval_metrics(emb[n:], emb[:n], torch.tensor(heldout.targets))
        self.log("val/recall@1", m["recall@1"], sync_dist=True)  # equal on every rank
        self.log("val/mrr", m["mrr"], sync_dist=True)  # equal on every rank

    # ------------------------------------------------------------------ outputs
    def on_fit_end(self) -> None:
        if self.global_rank == 0:
            self._write()
            # The checkpoints only serve a resume; the encoder artifact is complete now.
            shutil.rmtree(Path(self.hparams.out_dir) / CHECKPOINT_DIR, ignore_errors=True)
        barrier()

    def _retrieval(self, encoder: TextEncoder) -> dict:
        bs, data = self.hparams.eval_batch_size, self.inputs
        out = {}
        emb = encoder.embed(data.heldout.texts, bs, progress=True)
        out["heldout_pseudo_pairs"] = _retrieval_of(emb[len(data.heldout.keys):], emb[:len(data.heldout.keys)],
                                                    data.heldout)
        edits = data.edits
        emb_p = encoder.embed(edits.keys, bs, progress=True)
        emb_q = encoder.embed(edits.queries, bs, progress=True)
        out["edit_paraphrases"] = _retrieval_of(emb_q, emb_p, edits)
        # Same-subject separation: is a paraphrase closer to its edit prompt than another fact about the
        # edit's subject (a locality prompt) is? Never trained on; None when the dataset has no such prompt.
        own_para = (emb_q * emb_p[edits.targets]).sum(-1)
        if data.same_subject:
            emb_s = encoder.embed([t for _, t in data.same_subject], bs, progress=True)
            own_same = (emb_s * emb_p[[k for k, _ in data.same_subject]]).sum(-1)
            out["same_subject_locality"] = {
                "n": len(data.same_subject), "paraphrase_cosine_mean": float(own_para.mean()),
                "same_subject_cosine_mean": float(own_same.mean()),
                "auc_paraphrase_closer": pairwise_auc(own_para, own_same)}
        else:
            out["same_subject_locality"] = {"n": 0, "auc_paraphrase_closer": None}
        return out

    @torch.no_grad()
    def _write(self) -> None:
        hp, data = self.hparams, self.inputs
        train_seconds = time.time() - self._started
        self.encoder.cpu()
        tuned = self._retrieval(self.encoder)
        frozen = self._retrieval(self._load_base())
        report = {
            "objective": hp.objective, "pooling": hp.pooling, "temperature": hp.temperature,
            "encoder_source": self.encoder_source, **data.counts,
            "hard_negatives": data.hard_negative_counts | {"weight": hp.hard_negative_weight, "used": data.triples},
            "epochs": self.current_epoch if hp.objective != "frozen" else 0,
            "steps": int(self.global_step), "resumed_from": self.resumed_from,
            "tuned": tuned, "frozen": frozen,
            "edit_paraphrase_recall@1_gain": (tuned["edit_paraphrases"]["recall@1"] or 0)
            - (frozen["edit_paraphrases"]["recall@1"] or 0),
            "train_seconds": round(train_seconds, 1),
            "wall_seconds": round(time.time() - self._started, 1),
            "world_size": world()[1],
        }
        outputs = write_encoder_artifact(hp.out_dir, self.encoder, data.heldout_groups, data.seed,
                                         data.hard_negative_groups, report)
        write_manifest(hp.out_dir, "encoder", data.lineage,
                       config={"data": data.data_config, "model": dict(hp),
                               "trainer": {"max_epochs": self.trainer.max_epochs, "max_steps": self.trainer.max_steps,
                                           "world_size": world()[1]}},
                       outputs=outputs, upstream=data.upstream,
                       extra={"encoder": {"source": self.encoder_source, "pooling": hp.pooling,
                                          "max_length": hp.max_length, "dim": self.encoder.dim,
                                          "objective": hp.objective}})
        print(summary_lines(report, hp.out_dir))


def _retrieval_of(queries: torch.Tensor, keys: torch.Tensor, texts: RetrievalTexts) -> dict:
    return retrieval_metrics(queries, keys, torch.tensor(texts.targets, dtype=torch.long))


def summary_lines(report: dict, out_dir) -> str:
    """What the stage prints when it is done: retrieval tuned vs frozen (and same-subject separation)."""
    tuned, frozen = report["tuned"], report["frozen"]
    t, f = tuned["edit_paraphrases"], frozen["edit_paraphrases"]
    lines = []
    auc = tuned["same_subject_locality"]["auc_paraphrase_closer"]
    if auc is not None:
        lines.append(f"encoder: paraphrase closer to its edit than a same-subject locality prompt: AUC {auc:.3f} "
                     f"(frozen {frozen['same_subject_locality']['auc_paraphrase_closer']:.3f})")
    lines.append(f"encoder ({report['objective']}): edit-paraphrase recall@1 {t['recall@1']:.3f} (frozen "
                 f"{f['recall@1']:.3f}), MRR {t['mrr']:.3f} (frozen {f['mrr']:.3f}); held-out pseudo recall@1 "
                 f"{tuned['heldout_pseudo_pairs']['recall@1']:.3f} (frozen "
                 f"{frozen['heldout_pseudo_pairs']['recall@1']:.3f}); wrote {out_dir} ({report['wall_seconds']} s)")
    return "\n".join(lines)
