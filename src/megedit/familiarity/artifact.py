"""The familiarity artifact, as the familiarity stage writes it and every later stage reads it.

Two kinds of router (``model.router``; ``router.json``'s ``kind``, ``entropy`` when absent): ``entropy``, the
familiarity net whose output entropy is the score, and ``nearest``, which memorises the edit prompts'
embeddings and scores ``1 - max cosine`` to them (``megedit.components.nearest_router``). Their files are the
same; what the weights hold differs.

``<out_dir>/``
  ``router.safetensors``            the main router's net (``FamiliarityNet`` state), or for ``nearest`` its
                                    memory (``memory``: the edit prompts' normalised embeddings)
  ``calibration_router.safetensors``  the calibration router (same recipe, N pseudo prompts), kept so that a
                                    later run version can fine-tune it beside the main router and recalibrate
                                    the threshold the same way (``megedit edits add``); absent in artifacts
                                    written before it was saved, or trained without ``data.calibrate``
  ``router.json``                   {kind, architecture, K (entropy) or memory {n, dim} (nearest), threshold,
                                    threshold_source, calibration, entropy_units, encoder_dir,
                                    encoder_manifest_sha256}
  ``entropies.safetensors``         every entropy behind the report and the threshold, so a threshold can be
                                    re-picked without retraining (``megedit threshold``): ``main.*`` from the
                                    router, ``calibration.*`` from the calibration router
                                    (``calibration.negative_kind`` indexes the kind names in the file's
                                    ``negative_kinds`` metadata)
  ``routing_report.json``           routing rates, AUROCs, entropy summaries, calibration, fit
  ``entropy_hist.png``, ``routing_curve.png``  the report's figures
  ``manifest.json``                 stage "familiarity", upstream {"prepare", "encoder"}
  ``checkpoints/``                  while training only (``megedit.resume``); removed once the artifact is written
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from megedit.artifacts import ArtifactError, atomic_path, atomic_write_json, check_upstream, read_manifest
from megedit.components.familiarity_net import FamiliarityNet, FamiliarityRouter
from megedit.components.nearest_router import MAX_SCORE, NearestRouter

WEIGHTS = "router.safetensors"
CALIBRATION_WEIGHTS = "calibration_router.safetensors"
CONFIG = "router.json"
ENTROPIES = "entropies.safetensors"
REPORT = "routing_report.json"
HIST = "entropy_hist.png"
CURVE = "routing_curve.png"
# The main router's entropy groups every entropies file holds.
MAIN_GROUPS = ("edit_prompts", "edit_paraphrases", "locality")
# The kinds of router (``model.router``) and the units of each one's score.
SCORE_UNITS = {"entropy": "nats", "nearest": "1 - cosine"}
ROUTER_KINDS = tuple(SCORE_UNITS)


def router_kind(cfg: dict) -> str:
    """The kind of router a ``router.json`` describes (one written before there were two: ``entropy``)."""
    kind = cfg.get("kind", "entropy")
    if kind not in ROUTER_KINDS:
        raise ArtifactError(f"{CONFIG}: unknown router kind {kind!r} ({' | '.join(ROUTER_KINDS)})")
    return kind


def max_score(kind: str, num_classes: int | None = None) -> float:
    """The largest score a router of ``kind`` gives: ln K nats of entropy, or 2 for ``1 - cosine``."""
    return MAX_SCORE if kind == "nearest" else math.log(num_classes)


def read_router_config(folder: str | Path) -> dict:
    """``router.json`` of a familiarity artifact (architecture, K, threshold and how it was chosen)."""
    return json.loads((Path(folder) / CONFIG).read_text())


def load_router(folder: str | Path, encoder_dir: str | Path | None = None,
                device: str | torch.device = "cpu") -> FamiliarityRouter | NearestRouter:
    """The router of a familiarity artifact (eval mode, frozen), of the kind its ``router.json`` names: both
    give ``.entropy(emb)`` (the score, lower = more familiar), ``.threshold``, ``.is_familiar`` and ``.kind``.

    With ``encoder_dir`` it refuses (``ArtifactError``) a router trained on another encoder
    run's embeddings: its entropies, hence its threshold, mean nothing for that encoder.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    manifest = read_manifest(folder, stage="familiarity")
    if encoder_dir is not None:
        check_upstream(manifest, "encoder", encoder_dir, where=f"familiarity router {folder}")
    cfg = read_router_config(folder)
    try:
        if router_kind(cfg) == "nearest":
            router = NearestRouter(load_file(folder / WEIGHTS)["memory"], cfg["threshold"])
        else:
            net = FamiliarityNet(**cfg["architecture"])
            net.load_state_dict(load_file(folder / WEIGHTS))
            router = FamiliarityRouter(net, cfg["threshold"])
    except (KeyError, TypeError, RuntimeError, ValueError) as exc:
        raise ArtifactError(f"{folder}: {CONFIG} and {WEIGHTS} do not describe one {router_kind(cfg)} router: "
                            f"{exc}") from exc
    return router.to(device).eval().requires_grad_(False)


def load_router_states(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """``(router.json, main net state, calibration net state or None)`` of a familiarity artifact: what a
    fine-tuning run starts from (an artifact written before the calibration router was saved has none)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    read_manifest(folder, stage="familiarity")
    calibration = folder / CALIBRATION_WEIGHTS
    return (read_router_config(folder), load_file(folder / WEIGHTS),
            load_file(calibration) if calibration.is_file() else None)


def load_entropies(folder: str | Path) -> tuple[dict[str, torch.Tensor], list[str], dict]:
    """The entropies of a familiarity artifact, the names of its calibration negative kinds, and its
    (verified) manifest."""
    from safetensors import safe_open

    folder = Path(folder)
    manifest = read_manifest(folder, stage="familiarity")
    path = folder / ENTROPIES
    if not path.is_file():
        raise ArtifactError(f"{folder}: no {ENTROPIES} (written by the familiarity stage since it saves every "
                            "entropy; re-run the stage to get it)")
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata() or {}
    missing = [f"main.{g}" for g in MAIN_GROUPS if f"main.{g}" not in tensors]
    if missing:
        raise ArtifactError(f"{path}: missing tensors {missing} (expected main.edit_prompts, main.edit_paraphrases, "
                            "main.locality)")
    kinds = [k for k in meta.get("negative_kinds", "").split(",") if k]
    if "calibration.calib_negatives" in tensors and ("calibration.negative_kind" not in tensors or not kinds):
        raise ArtifactError(f"{path}: calibration entropies without calibration.negative_kind or the "
                            "negative_kinds metadata; re-run the familiarity stage")
    return tensors, kinds, manifest


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def _save_figure(path: Path, fig) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def write_router_artifact(out_dir: str | Path, main_net: nn.Module, calib_net: nn.Module | None,
                          entropies: dict[str, torch.Tensor], negative_kinds: list[str], router_cfg: dict,
                          report: dict, hist, curve) -> list[str]:
    """Write every file of the artifact but the manifest (each atomically); returns their names, in the
    order the manifest lists them. ``main_net`` / ``calib_net``: a ``FamiliarityNet`` or a ``NearestRouter``
    (its state is its memory). ``hist`` and ``curve`` are matplotlib figures."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    nets = {WEIGHTS: main_net} | ({CALIBRATION_WEIGHTS: calib_net} if calib_net is not None else {})
    for name, net in nets.items():
        _save_tensors(out / name, net.state_dict())
    _save_tensors(out / ENTROPIES, entropies,
                  {"units": router_cfg.get("entropy_units", "nats"), "negative_kinds": ",".join(negative_kinds)})
    atomic_write_json(out / CONFIG, router_cfg)
    atomic_write_json(out / REPORT, report)
    _save_figure(out / HIST, hist)
    _save_figure(out / CURVE, curve)
    return [*nets, CONFIG, REPORT, HIST, CURVE, ENTROPIES]


def read_report(folder: str | Path) -> dict:
    """``routing_report.json`` of a familiarity artifact."""
    return json.loads((Path(folder) / REPORT).read_text())
