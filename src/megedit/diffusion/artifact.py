"""The diffusion artifact, as the diffusion stage writes it and every later stage reads it.

``<out_dir>/``
  ``generator.safetensors``  the EMA weights of the weight generator (metadata ``format``)
  ``generator.json``         ``WeightGenerator.config()``: format, preset, sizes, noise schedule with the
                             sampling defaults (noise scale, value scale), normalisation statistics; plus
                             ``trained_on`` and the ``checkpoint`` the weights come from
  ``report.json``            generated vs collected neurons on the edits, the value-scale calibration, the
                             pseudo edits' generality, timings (``megedit.diffusion.diffusion_module``)
  ``manifest.json``          stage "diffusion", upstream {"prepare", "encoder", "collect"}
  ``checkpoints/``           ``last.ckpt`` (the resume point, kept: a larger ``max_epochs`` continues the run;
                             ``megedit.resume``) and the best checkpoint of the validation score
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megedit.artifacts import ArtifactError, atomic_path, atomic_write_json
from megedit.diffusion.generator import FORMAT, WeightGenerator
from megedit.resume import CHECKPOINT_DIR, LAST_CKPT, last_checkpoint

WEIGHTS_FILE = "generator.safetensors"
CONFIG_FILE = "generator.json"
REPORT_FILE = "report.json"
FILES = (WEIGHTS_FILE, CONFIG_FILE, REPORT_FILE)  # the manifest's outputs


def save_generator(folder: str | Path, generator: WeightGenerator, extra: dict | None = None) -> None:
    """Write ``generator.safetensors`` (float32) and ``generator.json`` (its config, ``extra`` merged in)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in generator.state_dict().items()}
    with atomic_path(folder / WEIGHTS_FILE) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT})
    atomic_write_json(folder / CONFIG_FILE, {**generator.config(), **(extra or {})})


def read_generator_config(folder: str | Path) -> dict:
    """``generator.json`` of a diffusion artifact, its format checked."""
    folder = Path(folder)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            raise ArtifactError(f"{folder}: no {name}; is this a diffusion stage output (--model.out_dir)?")
    cfg = json.loads((folder / CONFIG_FILE).read_text())
    if cfg.get("format") != FORMAT:
        raise ArtifactError(f"{folder / CONFIG_FILE}: unknown format {cfg.get('format')!r}")
    return cfg


def load_generator(folder: str | Path, device: str | torch.device = "cpu") -> WeightGenerator:
    """The trained generator in ``folder`` (a diffusion artifact: ``generator.safetensors`` + ``generator.json``)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    gen = WeightGenerator.from_config(read_generator_config(folder))
    state = load_file(str(folder / WEIGHTS_FILE))
    missing, unexpected = gen.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ArtifactError(f"{folder / WEIGHTS_FILE} does not match {CONFIG_FILE}: missing {missing[:5]}, "
                            f"unexpected {unexpected[:5]}")
    return gen.to(device).eval().requires_grad_(False)


def training_states(source: str | Path) -> tuple[dict, dict, Path]:
    """``(generator state, EMA state, the file they came from)`` of a trained generator: a diffusion artifact
    folder (its ``checkpoints/last.ckpt``, the full training state, else its saved EMA generator, which then
    gives both) or a Lightning ``.ckpt`` file of the diffusion module."""
    from safetensors.torch import load_file

    source = Path(source)
    ckpt = last_checkpoint(source) if source.is_dir() else source
    if ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        return prefixed(state, "generator."), prefixed(state, "ema."), ckpt
    if (source / WEIGHTS_FILE).is_file():
        ema = load_file(str(source / WEIGHTS_FILE))
        return ema, ema, source / WEIGHTS_FILE
    raise ArtifactError(f"model.init_from {source}: neither {CHECKPOINT_DIR}/{LAST_CKPT} nor {WEIGHTS_FILE} "
                        "there; point it at a diffusion artifact folder or a .ckpt file")


def prefixed(state: dict, prefix: str) -> dict:
    """The entries of a Lightning ``state_dict`` under ``prefix`` (a submodule's), with the prefix dropped."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def write_report(folder: str | Path, report: dict) -> None:
    atomic_write_json(Path(folder) / REPORT_FILE, report)


def read_report(folder: str | Path) -> dict:
    """``report.json`` of a diffusion artifact."""
    return json.loads((Path(folder) / REPORT_FILE).read_text())
