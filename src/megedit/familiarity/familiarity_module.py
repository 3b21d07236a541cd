"""Trains the familiarity router (paper eq. 6) to convergence and picks its entropy threshold.

With ``router: nearest`` nothing trains: each router memorises its prompts' embeddings and scores ``1 - max
cosine`` to them (``megedit.components.nearest_router``); calibration, report and files are the same.

The main router memorises a random label in 0..K-1 for each of the N edit prompts' embeddings.
With ``threshold: auto`` a calibration router, trained side by side on the same recipe over N
pseudo prompts, scores held-out pseudo paraphrases (should be familiar) against
pseudo-irrelevant prompts (should not); the threshold that separates them best is used for the
main router. The edits' evaluation paraphrases and locality prompts only enter the report.

Outputs: ``router.safetensors``, ``router.json`` (architecture, K, threshold and how it was
chosen), ``routing_report.json``, ``entropy_hist.png`` and ``routing_curve.png`` (every routing rate
against the threshold; both also logged to TensorBoard), ``entropies.safetensors`` (re-pick a
threshold with ``megedit threshold``), manifest.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Literal, Union

import lightning as L
import torch
import torch.nn.functional as F

from megedit.artifacts import ArtifactError, write_manifest
from megedit.components.familiarity_net import FamiliarityNet, FamiliarityRouter, entropy_from_logits
from megedit.distributed import barrier
from megedit.components.nearest_router import NearestRouter
from megedit.familiarity.artifact import (MAIN_GROUPS, ROUTER_KINDS, SCORE_UNITS, load_router_states, max_score,
                                          router_kind, write_router_artifact)
from megedit.familiarity.familiarity_datamodule import NEGATIVE_KINDS, RouterInputs
from megedit.familiarity.report import (calibrate, chosen_threshold, edit_routing, entropies_file, entropy_summary,
                                       histogram, shift_summary, summary_line)
from megedit.familiarity.threshold import routing_curve
from megedit.handover import HandOver
from megedit.resume import remove_checkpoints, resume_point_callback

# The calibration router's entropy groups: memorised pseudo prompts, held-out paraphrases, negatives.
CALIBRATION_GROUPS = ("calib_prompts", "calib_positives", "calib_negatives")


def random_labels(n: int, k: int, seed: int) -> torch.Tensor:
    """Balanced random labels: each class gets n/k points (±1), in seeded random order."""
    g = torch.Generator().manual_seed(seed)
    return (torch.arange(n) % k)[torch.randperm(n, generator=g)]


def router_loss(net: FamiliarityNet, emb: torch.Tensor, labels: torch.Tensor, neg: torch.Tensor | None = None,
                negative_weight: float = 1.0, shifts: torch.Tensor | None = None, shift_scale: float = 1.0,
                shift_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy to the random labels (eq. 6), plus

    * ``negative_weight`` x KL(uniform || p) on the negatives ``neg`` (unfamiliar prompts), which is zero
      exactly when their output is uniform;
    * ``shift_weight`` x cross-entropy to the same labels at ``normalise(emb + shift_scale * shifts)``:
      each memorised point moved by a paraphrase displacement (one row of ``shifts`` per point), so the
      familiar basin around it reaches where paraphrases land, not just the point itself.

    Returns (loss, the parts: ``negative_kl`` and ``shift_ce`` where used).
    """
    loss = F.cross_entropy(net(emb), labels)
    parts: dict[str, torch.Tensor] = {}
    if neg is not None and negative_weight > 0:
        parts["negative_kl"] = uniform_kl(net, neg)
        loss = loss + negative_weight * parts["negative_kl"]
    if shifts is not None and shift_weight > 0:
        if shifts.shape != emb.shape:
            raise ValueError(f"shifts {tuple(shifts.shape)} must match the memorised batch {tuple(emb.shape)}")
        parts["shift_ce"] = F.cross_entropy(net(F.normalize(emb + shift_scale * shifts, dim=-1)), labels)
        loss = loss + shift_weight * parts["shift_ce"]
    return loss, parts


@torch.no_grad()
def keep_familiar_labels(net: FamiliarityNet, emb: torch.Tensor, labels: torch.Tensor,
                         threshold: float) -> tuple[torch.Tensor, int]:
    """Labels for fine-tuning a trained router: a point it already calls familiar (entropy below
    ``threshold``) keeps the class it gives it, so nothing it memorised has to be relearnt; any other point
    keeps its fresh random label from ``labels``. Returns (labels, how many were kept)."""
    if not len(emb):
        return labels, 0
    was = net.training
    net.eval()
    logits = torch.cat([net(emb[i:i + 4096]) for i in range(0, len(emb), 4096)])
    net.train(was)
    known = entropy_from_logits(logits) < threshold
    return torch.where(known, logits.argmax(-1), labels), int(known.sum())


def uniform_kl(net: FamiliarityNet, x: torch.Tensor) -> torch.Tensor:
    """Mean KL(uniform || p) of the router's outputs on ``x``: zero exactly when each is uniform."""
    return -F.log_softmax(net(x), dim=-1).mean(-1).mean() - math.log(net.num_classes)


def check_options(threshold, num_classes: int, budget_kinds: list[str], router: str = "entropy",
                  init_from: str | None = None) -> None:
    """Refuse an unknown router, a nearest router asked to fine-tune, a threshold outside (0, the router's largest
    score] (ln K nats for ``entropy``, 2 for ``nearest``) and budget kinds that are not kinds of negatives."""
    if router not in ROUTER_KINDS:
        raise ValueError(f"model.router must be one of {list(ROUTER_KINDS)}, got {router!r}")
    if router == "nearest" and init_from:
        raise ValueError("model.init_from fine-tunes a familiarity net; the nearest router trains nothing "
                         "(it memorises the version's edit prompts afresh)")
    if isinstance(threshold, str) and threshold != "auto":
        raise ValueError(f"model.threshold must be a number or 'auto', got {threshold!r}")
    top = max_score(router, num_classes)
    if not isinstance(threshold, str) and not 0 < threshold <= top:
        raise ValueError(f"model.threshold {threshold} is outside (0, {top:.3f}] {SCORE_UNITS[router]} "
                         f"(the largest score of the {router} router)")
    if not budget_kinds:
        raise ValueError(f"model.budget_kinds must name at least one of {list(NEGATIVE_KINDS)}")
    unknown = set(budget_kinds) - set(NEGATIVE_KINDS)
    if unknown:
        raise ValueError(f"model.budget_kinds: unknown kinds {sorted(unknown)}; known: {list(NEGATIVE_KINDS)}")


class FamiliarityModule(L.LightningModule):
    resumable = True  # the stage CLI resumes checkpoints/last.ckpt of the same run (megedit.resume)

    def __init__(self, out_dir: str = "runs/familiarity", num_classes: int = 10, depth: int = 5, hidden_mult: int = 4,
                 width: int | None = None, lr: float = 1e-3, seed: int = 0, converge_entropy: float = 0.01,
                 min_epochs: int = 20, threshold: Union[float, Literal["auto"]] = "auto",
                 calibration_rule: Literal["capped", "balanced", "max_fpr"] = "capped", target_fpr: float = 0.04,
                 budget_kinds: list[str] = ["pseudo_irrelevant", "pseudo_locality"], hist_bins: int = 60,
                 negative_weight: float = 1.0, checkpoint_every_n_epochs: int = 5, fence_weight: float = 0.5,
                 shift_scale: float = 1.6, shift_weight: float = 1.0, plateau_patience: int = 100,
                 plateau_factor: float = 0.5, min_lr: float = 1e-5, init_from: str | None = None,
                 router: Literal["entropy", "nearest"] = "entropy"):
        """
        Args:
            out_dir: where the router artifact goes.
            router: ``entropy`` (the net; the options below) or ``nearest`` (``megedit.components.nearest_router``).
            num_classes: K, the number of random classes (paper: 10).
            depth: FFN blocks (paper: 5).
            hidden_mult: FFN inner width = ``hidden_mult`` x block width (authors: 768 -> 3072).
            width: block width; None: the encoder's embedding size.
            lr: Adam learning rate (no weight decay: the net is meant to overfit).
            seed: seed of the random labels and of the initialisation.
            converge_entropy: training stops once every memorised point is classified right and
                their mean entropy (nats) is below this, for the main and the calibration router.
            min_epochs: train at least this many epochs.
            threshold: entropy threshold in nats (the paper uses 0.1 on Phi-2), or ``auto``.
            calibration_rule: on the pseudo calibration data, with FPR the worst over the kinds of negatives
                (``familiarity_datamodule.NEGATIVE_KINDS``): ``balanced``
                maximises TPR - FPR; ``max_fpr`` takes the largest threshold whose FPR <= target_fpr;
                ``capped`` (default) is ``balanced`` but never above the ``max_fpr`` threshold.
            target_fpr: the FPR budget of ``max_fpr`` and ``capped``.
            budget_kinds: the kinds whose own rate must stay within the budget; a kind left out is only
                reported (a kind under 100 texts just joins the pooled rate). Same-subject prompts are out by
                default: some of them restate their pseudo edit's fact, and before the fences budgeting them
                on ZsRE left 19% of the edit prompts familiar.
            hist_bins: bins of the entropy histogram.
            negative_weight: weight of the uniform-output loss on the datamodule's ``train_negatives``
                (cross-entropy to the uniform distribution; no effect when there are none).
            fence_weight: weight of the same loss on each router's own fences (``data.fences_per_edit``:
                other facts about its memorised subjects); 0 ignores them.
            shift_scale: how far each memorised point is moved along a pseudo paraphrase displacement
                (``data.paraphrase_shifts``) for the shifted cross-entropy. The displacements come from pairs the
                encoder trained on, which it pulled closer than unseen paraphrases lie, hence > 1.
            shift_weight: weight of the cross-entropy at the shifted points (0: no shifts, the paper).
            plateau_patience: halve (``plateau_factor``) the learning rate after this many optimizer steps (rounded up
                to whole epochs) without a new low of the routers' mean entropy on their memorised points (0: constant
                lr). At a constant lr Adam keeps knocking a large router (N=4096) back out of its minimum.
            plateau_factor: the learning-rate factor at each plateau.
            min_lr: the plateau schedule's floor.
            checkpoint_every_n_epochs: how often ``out_dir/checkpoints/last.ckpt`` is refreshed, so a
                killed run resumes (0: never). Removed once the router is written.
            init_from: a familiarity artifact to fine-tune instead of starting from random weights (``megedit
                edits add``): each router starts from its counterpart (the calibration router from scratch when
                the artifact saved none). Points a router already calls familiar keep the class it gives them;
                the others (new edits) get balanced random labels (``keep_familiar_labels``). Same architecture.
        """
        super().__init__()
        self.save_hyperparameters()
        check_options(threshold, num_classes, budget_kinds, router, init_from)
        self.inputs: RouterInputs | None = None  # received from the datamodule (megedit.handover)
        self.main_net = self.calib_net = None  # FamiliarityNet or NearestRouter (``router``), built in setup
        self._started, self._epochs_run, self._converged = time.time(), 0, False
        self.resumed_from: str | None = None  # set by the stage CLI

    # ------------------------------------------------------------------ setup
    @property
    def learns_from_negatives(self) -> bool:
        """The net learns from training negatives, fences and shifts; the nearest router only memorises."""
        return self.hparams.router == "entropy"

    def data_request(self) -> dict:
        if not self.learns_from_negatives and self._trainer is not None and self.trainer.world_size > 1:  # before any embedding
            raise ValueError("model.router nearest trains nothing: run it on one device (trainer.devices 1)")
        return {"net_groups": self.learns_from_negatives}

    def receive(self, inputs: RouterInputs) -> None:
        if self.hparams.threshold == "auto" and not inputs.calibrate:
            raise ValueError("model.threshold auto needs data.calibrate true (the calibration router)")
        self.inputs = inputs

    def setup(self, stage: str) -> None:
        if self.main_net is not None:
            return
        emb, hp = self.inputs.emb, self.hparams
        if hp.router == "nearest":
            self._memorise(emb)
            return
        torch.manual_seed(hp.seed)  # identical nets on every rank and every run
        make = lambda: FamiliarityNet(self.inputs.dim, hp.num_classes, hp.depth, hp.hidden_mult, hp.width)  # noqa: E731
        self.main_net = make()
        # Plain tensors, not buffers: DDP would re-broadcast buffers on every step.
        self.main_emb = emb["edit_prompts"]
        self.main_labels = random_labels(len(self.main_emb), hp.num_classes, hp.seed)
        if self.inputs.calibrate:
            self.calib_net = make()
            self.calib_emb = emb["calib_prompts"]
            self.calib_labels = random_labels(len(self.calib_emb), hp.num_classes, hp.seed + 1)
        nonempty = lambda x: x if x is not None and len(x) > 0 else None  # noqa: E731
        self.neg_emb = nonempty(emb.get("train_negatives"))
        self.shift_emb = nonempty(emb.get("shifts"))
        self.fence_emb, self.calib_fence_emb = nonempty(emb.get("fences")), nonempty(emb.get("calib_fences"))
        self.warm_start = self._warm_start(Path(hp.init_from)) if hp.init_from else None

    def _memorise(self, emb: dict[str, torch.Tensor]) -> None:
        """The nearest routers: the edit prompts and (with calibration) the pseudo prompts, memorised."""
        self.main_net = NearestRouter(emb["edit_prompts"], math.inf)
        self.calib_net = NearestRouter(emb["calib_prompts"], math.inf) if self.inputs.calibrate else None
        self.warm_start, self._converged = None, True  # nothing to fit: a memory holds every point exactly
        # Nothing to train: the fit loop is skipped and on_fit_end writes the artifact.
        self.trainer.limit_train_batches = 0

    def _warm_start(self, folder: Path) -> dict:
        """Load the nets of ``folder`` and relabel their memorised points (see ``init_from``)."""
        cfg, main_state, calib_state = load_router_states(folder)
        if router_kind(cfg) != "entropy":
            raise ArtifactError(f"model.init_from {folder}: a {router_kind(cfg)} router has no net to fine-tune")
        if cfg["architecture"] != self.main_net.config():
            raise ArtifactError(f"model.init_from {folder}: its router is {cfg['architecture']}, this run builds "
                                f"{self.main_net.config()}; fine-tune with the same architecture")
        threshold = float(cfg["threshold"])
        self.main_net.load_state_dict(main_state)
        self.main_labels, kept = keep_familiar_labels(self.main_net, self.main_emb, self.main_labels, threshold)
        out = {"from": str(folder), "threshold": threshold, "main_points": len(self.main_emb),
               "main_labels_kept": kept, "calibration": None}
        if self.calib_net is not None and calib_state is None:
            out["calibration"] = "from scratch: the artifact saved no calibration router"
        elif self.calib_net is not None:
            self.calib_net.load_state_dict(calib_state)
            self.calib_labels, kept = keep_familiar_labels(self.calib_net, self.calib_emb, self.calib_labels, threshold)
            out.update(calibration="fine-tuned", calibration_points=len(self.calib_emb),
                       calibration_labels_kept=kept)
        print(f"familiarity: fine-tuning {folder}: {out['main_labels_kept']} of {out['main_points']} memorised points "
              f"keep their class; calibration router {out['calibration']}")
        return out

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # A run killed after its last epoch's checkpoint resumes with nothing left to train: keep its fit state.
        checkpoint["megedit_fit"] = {"epochs_run": self._epochs_run, "converged": self._converged,
                                     "fit_states": getattr(self, "_fit_states", {})}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        fit = checkpoint.get("megedit_fit", {})
        self._epochs_run, self._converged = fit.get("epochs_run", 0), fit.get("converged", False)
        if fit.get("fit_states"):
            self._fit_states = fit["fit_states"]

    def configure_callbacks(self):
        # Replaces the Trainer's default checkpoint callback (which would write into the logger's folder).
        return [HandOver(), resume_point_callback(self.hparams.out_dir, self.hparams.checkpoint_every_n_epochs)]

    def on_fit_start(self) -> None:
        for name in ("main_emb", "main_labels", "calib_emb", "calib_labels", "neg_emb", "fence_emb", "calib_fence_emb",
                     "shift_emb"):
            if getattr(self, name, None) is not None:
                setattr(self, name, getattr(self, name).to(self.device))

    def configure_optimizers(self):
        hp = self.hparams
        if hp.router == "nearest":
            return None  # nothing to train (the fit loop is skipped: ``_memorise``)
        opt = torch.optim.Adam(self.parameters(), lr=hp.lr)
        if hp.plateau_patience <= 0:
            return opt
        total, epochs = self.trainer.estimated_stepping_batches, self.trainer.max_epochs
        steps_per_epoch = max(1, int(total // epochs)) if math.isfinite(total) and epochs and epochs > 0 else 1
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=hp.plateau_factor,
                                                             patience=math.ceil(hp.plateau_patience / steps_per_epoch),
                                                             min_lr=hp.min_lr)
        # Stepped after on_train_epoch_end, which logs the monitored value.
        return {"optimizer": opt, "lr_scheduler": {"scheduler": plateau, "monitor": "fit/max_mean_entropy",
                                                   "interval": "epoch"}}

    # ------------------------------------------------------------------ training
    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        i_main, i_calib = batch
        neg = None
        if self.neg_emb is not None and self.hparams.negative_weight > 0:
            # Same draw for both routers, so the calibration router keeps the main router's recipe.
            neg = self.neg_emb[torch.randint(len(self.neg_emb), (len(i_main),), device=self.neg_emb.device)]
        shifts = None
        if self.shift_emb is not None and self.hparams.shift_weight > 0:
            shifts = self.shift_emb[torch.randint(len(self.shift_emb), (len(i_main),), device=self.shift_emb.device)]
        loss_main = self._router_loss(self.main_net, self.main_emb[i_main], self.main_labels[i_main], neg, "train",
                                      self.fence_emb, shifts)
        loss = loss_main
        self.log("train/loss", loss_main, prog_bar=True, batch_size=len(i_main))
        if self.calib_net is not None:
            # Separate nets and Adam is per-parameter: the sum trains both exactly as two runs would.
            loss_calib = self._router_loss(self.calib_net, self.calib_emb[i_calib], self.calib_labels[i_calib],
                                           neg, "train/calibration", self.calib_fence_emb,
                                           None if shifts is None else shifts[:len(i_calib)])
            self.log("train/calibration_loss", loss_calib, batch_size=len(i_calib))
            loss = loss + loss_calib
        return loss

    def _router_loss(self, net: FamiliarityNet, emb: torch.Tensor, labels: torch.Tensor,
                     neg: torch.Tensor | None, prefix: str, fences: torch.Tensor | None = None,
                     shifts: torch.Tensor | None = None) -> torch.Tensor:
        hp = self.hparams
        loss, parts = router_loss(net, emb, labels, neg, hp.negative_weight, shifts, hp.shift_scale, hp.shift_weight)
        for name, value in parts.items():
            self.log(f"{prefix}_{name}", value, batch_size=len(emb))
        if fences is not None and self.hparams.fence_weight > 0:
            # A batch of this router's own fences (other facts about its memorised subjects), as many as
            # memorised points in the step, on the same uniform-output loss as the negatives.
            f = fences[torch.randint(len(fences), (len(emb),), device=fences.device)]
            fence_kl = uniform_kl(net, f)
            loss = loss + self.hparams.fence_weight * fence_kl
            self.log(f"{prefix}_fence_kl", fence_kl, batch_size=len(f))
        return loss

    @torch.no_grad()
    def _fit_state(self, net: FamiliarityNet, emb: torch.Tensor, labels: torch.Tensor) -> dict:
        was = net.training
        net.eval()
        logits = torch.cat([net(emb[i:i + 4096]) for i in range(0, len(emb), 4096)])
        net.train(was)
        ent = entropy_from_logits(logits)
        return {"accuracy": float((logits.argmax(-1) == labels).float().mean()), "mean_entropy": float(ent.mean()),
                "max_entropy": float(ent.max())}

    def on_train_epoch_end(self) -> None:
        # Every rank holds the same weights and all embeddings, so every rank reaches the same decision.
        hp = self.hparams
        states = {"main": self._fit_state(self.main_net, self.main_emb, self.main_labels)}
        if self.calib_net is not None:
            states["calibration"] = self._fit_state(self.calib_net, self.calib_emb, self.calib_labels)
        for name, s in states.items():
            for k, v in s.items():
                self.log(f"fit/{name}_{k}", v, sync_dist=True)  # equal on every rank
        self.log("fit/max_mean_entropy", max(s["mean_entropy"] for s in states.values()), sync_dist=True)
        self.log("fit/lr", self.trainer.optimizers[0].param_groups[0]["lr"], sync_dist=True)
        self._epochs_run = self.current_epoch + 1
        self._fit_states = states
        self._converged = all(s["accuracy"] == 1.0 and s["mean_entropy"] < hp.converge_entropy for s in states.values())
        if self._converged and self._epochs_run >= hp.min_epochs:
            self.trainer.should_stop = True

    def fit_summary(self) -> dict:
        """How training ended: epochs run and whether every router met the convergence rule at the last one."""
        return {"epochs": self._epochs_run, "converged": self._converged}

    # ------------------------------------------------------------------ outputs
    def on_fit_end(self) -> None:
        if self.global_rank == 0:
            self._write()
            # The checkpoints only serve a resume; the router artifact is complete now.
            remove_checkpoints(self.hparams.out_dir)
        barrier()

    @torch.no_grad()
    def _entropies(self, net: FamiliarityNet | NearestRouter, emb: torch.Tensor) -> torch.Tensor:
        """A router's scores (the net's entropy, or the nearest router's ``1 - max cosine``) on ``emb``."""
        router = net if isinstance(net, NearestRouter) else FamiliarityRouter(net, threshold=math.inf)
        return router.entropy(emb.to(self.device)).cpu()

    def _router_config(self, threshold: float, source: str, calibration: dict | None) -> dict:
        """``router.json``: the kind, what rebuilds the router (architecture and K, or the memory's size), the
        threshold and how it was chosen, and the encoder the embeddings come from."""
        hp = self.hparams
        built = ({"architecture": self.main_net.config(), "K": hp.num_classes} if hp.router == "entropy"
                 else {"memory": self.main_net.config()})
        return {"kind": hp.router, **built, "threshold": threshold, "threshold_source": source,
                "calibration": calibration, "entropy_units": SCORE_UNITS[hp.router], **self.inputs.encoder}

    @property
    def score_ceiling(self) -> float:
        """The largest score this stage's router gives (ln K nats of entropy, or 2 for ``1 - cosine``)."""
        return max_score(self.hparams.router, self.hparams.num_classes)

    def _write(self) -> None:
        hp, data = self.hparams, self.inputs
        self.main_net.eval()
        ent = {name: self._entropies(self.main_net, data.emb[name]) for name in MAIN_GROUPS}
        cal = calibration = None
        if self.calib_net is not None:
            self.calib_net.eval()
            cal = {name: self._entropies(self.calib_net, data.emb[name]) for name in CALIBRATION_GROUPS}
            calibration = calibrate(cal, hp.calibration_rule, hp.target_fpr, data.negative_kind, list(NEGATIVE_KINDS),
                                    list(hp.budget_kinds), data.calibration_counts)
        threshold, source = chosen_threshold(hp.threshold, calibration, hp.calibration_rule)
        report = self._report(ent, cal, calibration, threshold, source)
        router_cfg = self._router_config(threshold, source, calibration)
        entropies = entropies_file(ent, cal, data.negative_kind)
        name = f"K={hp.num_classes}" if hp.router == "entropy" else "nearest neighbour"
        hist = histogram(ent, cal, data.negative_kind, threshold, self.score_ceiling, hp.hist_bins,
                         SCORE_UNITS[hp.router], name)
        curve = routing_curve(entropies, threshold, list(NEGATIVE_KINDS), max_entropy=self.score_ceiling,
                              title=f"{hp.router} router, N={len(ent['edit_prompts'])}: threshold {threshold:.3g} "
                                    f"({source})", units=SCORE_UNITS[hp.router])
        outputs = write_router_artifact(hp.out_dir, self.main_net, self.calib_net, entropies, list(NEGATIVE_KINDS),
                                        router_cfg, report, hist, curve)
        self._log_tensorboard({"familiarity/entropy_hist": hist, "familiarity/routing_curve": curve}, report)
        import matplotlib.pyplot as plt

        plt.close(hist)
        plt.close(curve)
        write_manifest(hp.out_dir, "familiarity", data.lineage,
                       config={"data": data.data_config, "model": dict(hp),
                               "trainer": {"max_epochs": self.trainer.max_epochs,
                                           "world_size": self.trainer.world_size}},
                       outputs=outputs, upstream=data.upstream)
        print(summary_line(report, Path(hp.out_dir), self._epochs_run))

    def _report(self, ent: dict, cal: dict | None, calibration: dict | None, threshold: float, source: str) -> dict:
        """``routing_report.json``: the edits' routing (a diagnostic), the calibration, fences, shifts, the fit."""
        hp, data = self.hparams, self.inputs
        routing = edit_routing(ent, threshold, data.locality_kinds)
        trains = self.learns_from_negatives
        report = {"router": hp.router, "threshold": threshold, "threshold_source": source,
                  "entropy_units": SCORE_UNITS[hp.router], "max_entropy": self.score_ceiling, "n_edits": data.n_edits,
                  **{k: routing[k] for k in ("rates", "locality_unfamiliar_by_kind", "n_locality_by_kind", "auroc",
                                             "entropy")},
                  "calibration": calibration,
                  "fences": {**data.fences, "used": trains and hp.fence_weight > 0 and data.fences["main"] > 0},
                  "paraphrase_shifts": shift_summary(data.emb.get("shifts") if trains else None, hp.shift_scale,
                                                     hp.shift_weight),
                  "fit": {**self.fit_summary(), "resumed_from": self.resumed_from, "warm_start": self.warm_start,
                          **getattr(self, "_fit_states", {})},
                  "note": "edit paraphrases and locality prompts are a diagnostic only: neither was used to train or "
                          "to pick the threshold",
                  "wall_seconds": round(time.time() - self._started, 1)}
        if calibration is not None:
            report["calibration"]["entropy"] = {k: entropy_summary(v) for k, v in cal.items()}
        return report

    def _log_tensorboard(self, figures: dict, report: dict) -> None:
        from lightning.pytorch.loggers import TensorBoardLogger

        for logger in self.trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                for tag, fig in figures.items():
                    logger.experiment.add_figure(tag, fig, global_step=self.global_step, close=False)
                for k, v in report["rates"].items():
                    if v is not None:
                        logger.experiment.add_scalar(f"routing/{k}", v, self.global_step)
                logger.experiment.add_scalar("routing/threshold", report["threshold"], self.global_step)
                logger.experiment.flush()
