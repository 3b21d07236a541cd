"""The encoder artifact, as the encoder stage writes it and every later stage reads it.

``<out_dir>/``
  ``encoder/``              the tuned text encoder: an HF folder ``AutoModel`` loads, plus ``pooling.json``
                            (``TextEncoder.from_source`` reads both)
  ``heldout_groups.json``   {groups, seed, hard_negative_groups}: the pseudo groups held out of training
                            (the familiarity stage calibrates on them; the generator's and the router's
                            paraphrase shifts never use them) and the pseudo edits the hard-negative triples
                            came from. An artifact without the file held nothing out.
  ``report.json``           retrieval on the held-out pseudo pairs and on the edits' own paraphrases, tuned
                            vs frozen (``megedit.encoder.encoder_module``)
  ``manifest.json``         stage "encoder", lineage of the prepare run, upstream {"prepare": dir}
  ``checkpoints/``          while training only: ``last.ckpt``, the resume point after a kill, and
                            ``run.json``, the fingerprint of the run it belongs to (``megedit.resume``);
                            removed once the artifact is written
"""

from __future__ import annotations

import json
from pathlib import Path

from megedit.artifacts import atomic_write_json, read_manifest
from megedit.components.text_encoder import TextEncoder

ENCODER_SUBDIR = "encoder"
HELDOUT = "heldout_groups.json"
REPORT = "report.json"


def load_encoder(encoder_dir: str | Path, check: bool = True) -> TextEncoder:
    """The tuned encoder of an encoder artifact.

    With ``check`` its manifest is read first (stage "encoder", every output re-hashed), so an unfinished or
    altered artifact is refused; a caller that has read the manifest already passes ``check=False``.
    """
    if check:
        read_manifest(encoder_dir, stage="encoder")
    return TextEncoder.from_source(str(Path(encoder_dir) / ENCODER_SUBDIR))


def save_encoder(out_dir: str | Path, encoder: TextEncoder) -> list[str]:
    """Write ``encoder/``; returns its files relative to ``out_dir`` (sorted), for the manifest."""
    out_dir = Path(out_dir)
    encoder.save(out_dir / ENCODER_SUBDIR)
    return sorted(str(p.relative_to(out_dir)) for p in (out_dir / ENCODER_SUBDIR).rglob("*") if p.is_file())


def write_heldout(out_dir: str | Path, groups: list[str], seed: int, hard_negative_groups: list[str]) -> None:
    atomic_write_json(Path(out_dir) / HELDOUT, {"groups": sorted(groups), "seed": seed,
                                                "hard_negative_groups": hard_negative_groups})


def write_encoder_artifact(out_dir: str | Path, encoder: TextEncoder, heldout: list[str], seed: int,
                           hard_negative_groups: list[str], report: dict) -> list[str]:
    """Write every file of the artifact but the manifest: ``encoder/``, ``heldout_groups.json`` and
    ``report.json``; returns their names, in the order the manifest lists them."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = save_encoder(out, encoder)
    write_heldout(out, heldout, seed, hard_negative_groups)
    atomic_write_json(out / REPORT, report)
    return [*files, HELDOUT, REPORT]


def read_heldout(encoder_dir: str | Path) -> dict:
    """``heldout_groups.json`` as written, or ``{"groups": [], "hard_negative_groups": []}`` when the
    artifact has none (an encoder that held nothing out)."""
    path = Path(encoder_dir) / HELDOUT
    if not path.is_file():
        return {"groups": [], "hard_negative_groups": []}
    return json.loads(path.read_text())


def heldout_groups(encoder_dir: str | Path) -> set[str]:
    """The pseudo groups the encoder never trained on (empty when it held nothing out)."""
    return set(read_heldout(encoder_dir)["groups"])


def hard_negative_groups(encoder_dir: str | Path) -> set[str]:
    """The pseudo edits the encoder's hard-negative triples came from (it may have trained on their
    locality prompts, so calibration must not score those)."""
    return set(read_heldout(encoder_dir).get("hard_negative_groups", []))


def read_report(encoder_dir: str | Path) -> dict:
    """``report.json`` of an encoder artifact (retrieval tuned vs frozen, timings)."""
    return json.loads((Path(encoder_dir) / REPORT).read_text())
