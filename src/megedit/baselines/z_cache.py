"""A disk cache of MEMIT / AlphaEdit target values ``z``, one file per edit.

Computing ``z`` (an Adam optimisation per edit) is most of the two editors' cost: seconds per edit on a
CPU. Each edit's ``z`` depends only on the model's weights, the z settings, the context prefixes and the
edit itself, never on the other edits of the batch, so it is cached per edit under

    $MEGEDIT_CACHE/memit_z/<model>/<context id>/<edit id>.safetensors

where the context id hashes everything the optimisation depends on except the edit (weights sha256, the
layer, the z settings, the prefixes) and the edit id hashes the edit (prompt, subject, target). A killed
run resumes from the edits already written; a larger batch reuses a smaller one's; a changed setting or
model lands in another folder and is never served. Files are written atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from megedit.artifacts import atomic_path, sha256_json
from megedit.paths import cache_dir
from megedit.registry import MemitSpec

# The MemitSpec fields the z optimisation reads (the solve's settings and the statistics are not among them).
Z_FIELDS = ("v_num_grad_steps", "v_lr", "v_weight_decay", "kl_factor", "clamp_norm_factor")
PER_EDIT = ("z_nll", "z_steps", "delta_ratio")  # the per-edit diagnostics kept beside each z


class ZCache:
    def __init__(self, model_name: str, weights_sha256: str, hp: MemitSpec, prefixes: Sequence[str],
                 root: Path | None = None):
        context = {"weights_sha256": weights_sha256, "layer": hp.layers[-1], "prefixes": list(prefixes),
                   **{f: getattr(hp, f) for f in Z_FIELDS}}
        self.dir = (root or cache_dir() / "memit_z") / model_name / sha256_json(context)[:16]
        self.context = context

    @staticmethod
    def edit_id(prompt: str, subject: str, target: str) -> str:
        return sha256_json({"prompt": prompt, "subject": subject, "target": target})[:24]

    def get(self, edit_id: str) -> tuple[Tensor, dict] | None:
        path = self.dir / f"{edit_id}.safetensors"
        if not path.is_file():
            return None
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata().get("diagnostics", "{}"))
        return load_file(str(path))["z"], meta

    def put(self, edit_id: str, z: Tensor, diagnostics: dict) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        context_file = self.dir / "context.json"
        if not context_file.is_file():
            with atomic_path(context_file) as tmp:
                tmp.write_text(json.dumps(self.context, indent=1) + "\n")
        with atomic_path(self.dir / f"{edit_id}.safetensors") as tmp:
            save_file({"z": z.detach().cpu().contiguous()}, str(tmp),
                      metadata={"diagnostics": json.dumps(diagnostics)})


def split_report(report: dict, n: int) -> list[dict]:
    """``compute_targets``' report as one diagnostics dict per edit."""
    return [{k: report[k][i] for k in PER_EDIT} for i in range(n)]
