"""AlphaEdit (Fang et al., ICLR 2025): MEMIT with the update projected onto the null space of preserved knowledge.

Keys, target values ``z`` and the residual spread over the layers are MEMIT's (``memit.run_batch_edit``).
Only the solve differs. With ``C = E[k kᵀ]`` over Wikipedia (``layer_stats``), ``U`` the eigenvectors of
``C`` whose eigenvalue is below ``nullspace_threshold`` and ``P = U Uᵀ``, the update of a layer is

    ΔWᵀ = (P (KᵀK + K_pᵀK_p) + alphaedit_l2 · I)⁻¹ P Kᵀ R

where ``K_pᵀK_p`` sums the keys of edits made earlier (zero for one batch; ``prior_kkt`` carries it between
sequential batches and ``return_kkt`` hands back the new sum). Because ``alphaedit_l2 > 0``,
``ΔWᵀ = P ΔWᵀ``, so ``ΔW k ≈ 0`` for every key ``k`` that ``C`` spans: the outputs on ordinary text are kept.
"""

from __future__ import annotations

import os
from typing import Mapping, Sequence

import torch
from torch import Tensor

from megedit.baselines.layer_stats import KeyStats
from megedit.baselines.memit import EditRequest, EditResult, EditTargets, Solver, _hparams, run_batch_edit, second_moments
from megedit.registry import MemitSpec, ModelSpec


def null_space_projector(mom2: Tensor, threshold: float) -> tuple[Tensor, int]:
    """``(P, dim)``: the projector onto the eigenvectors of the symmetric ``mom2`` with eigenvalue < threshold."""
    values, vectors = torch.linalg.eigh(mom2.double())
    keep = vectors[:, values < threshold]
    return keep @ keep.T, int(keep.shape[1])


def alphaedit_solver(projectors: Mapping[int, Tensor], l2: float, prior_kkt: Mapping[int, Tensor] | None) -> Solver:
    def solve(_i: int, layer: int, keys: Tensor, resid: Tensor) -> Tensor:
        keys, resid = keys.double(), resid.double()
        proj = projectors[layer].to(keys.device)
        gram = keys.T @ keys
        if prior_kkt is not None and layer in prior_kkt:
            gram = gram + prior_kkt[layer].to(keys.device, torch.float64)
        eye = torch.eye(proj.shape[0], dtype=torch.float64, device=keys.device)
        upd_t = torch.linalg.solve(proj @ gram + l2 * eye, proj @ keys.T @ resid)  # [D, d]
        return upd_t.T
    return solve


def alphaedit_weights(lm, tokenizer, spec: ModelSpec, requests: Sequence[EditRequest], *,
                      hparams: MemitSpec | None = None, stats: KeyStats | Mapping[int, Tensor] | None = None,
                      stats_overrides: Mapping | None = None, prior_kkt: Mapping[int, Tensor] | None = None,
                      return_kkt: bool = False, data_dir: str | os.PathLike | None = None,
                      weights_sha256: str | None = None, z_batch_size: int = 8, batch_size: int = 32,
                      progress: bool = True, targets: EditTargets | None = None) -> EditResult:
    """AlphaEdit's edited weights for all ``requests`` at once; the LM is left unchanged.

    Same arguments as ``memit_weights`` (``hparams.nullspace_threshold`` and ``hparams.alphaedit_l2`` are
    AlphaEdit's), plus ``prior_kkt`` / ``return_kkt`` for sequential batches (``EditResult.kkt``).
    """
    hp = _hparams(spec, hparams)
    mom2 = second_moments(lm, tokenizer, spec, hp, stats, data_dir=data_dir, weights_sha256=weights_sha256,
                          progress=progress, stats_overrides=stats_overrides)
    projectors, dims = {}, {}
    for layer in hp.layers:
        projectors[layer], dims[layer] = null_space_projector(mom2[layer], hp.nullspace_threshold)
        if dims[layer] == 0:
            print(f"AlphaEdit: layer {layer}: no eigenvalue of E[kk^T] is below {hp.nullspace_threshold}; "
                  "the null space is empty and the layer is not edited")
    weights, diag, after = run_batch_edit(lm, tokenizer, spec, hp, requests,
                                          alphaedit_solver(projectors, hp.alphaedit_l2, prior_kkt),
                                          z_batch_size=z_batch_size, batch_size=batch_size, final_keys=return_kkt,
                                          progress=progress, method="AlphaEdit", targets=targets,
                                          weights_sha256=weights_sha256)
    diag["null_space_dim"] = dims
    kkt = None
    if return_kkt:
        kkt = {}
        for layer in hp.layers:
            k = after[layer].double()
            base = prior_kkt[layer].double() if prior_kkt is not None and layer in prior_kkt else 0
            kkt[layer] = (base + k.T @ k).cpu()
    return EditResult(weights=weights, diagnostics=diag, kkt=kkt)
