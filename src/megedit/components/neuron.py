"""The dynamic neuron: one extra FFN neuron per batch row, added to the edit layer's MLP by a hook.

The LM's own weights are never touched. A forward hook on ``spec.edit_layer``'s MLP adds

* gated MLPs (Llama, SmolLM2, Gemma):  ``act(h.k) * v``          (an ungated path beside the gated MLP)
* ungated MLPs (GPT-2, GPT-J, Phi):     ``act(h.k + b) * v``      (one extra fc_in row with bias + fc_out column)

to the MLP output, where ``h`` is the MLP input and ``act = ACT2FN[spec.mlp.activation]``.
Weights are a flat ``[B, D]`` tensor (``D = spec.neuron_dim``), laid out as
``[key (d), bias (1, ungated only), value (d)]``; row ``i`` edits batch row ``i``, so a batch can
carry a different neuron in every row. The hook works position-wise, so it serves full
forwards, left-padded batches and cached generation (later steps are one token long) alike.
Zero weights add exactly zero (``act(0) = 0`` for every activation used here and the value is 0),
so the logits equal the unedited model's bit for bit.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor

from megedit.loading import edit_mlp
from megedit.registry import ModelSpec


def split_neuron(weights: Tensor, spec: ModelSpec) -> tuple[Tensor, Tensor | None, Tensor]:
    """Split ``[B, D]`` (or ``[D]``) weights into ``(key [B, d], bias [B] or None, value [B, d])``."""
    d = spec.hidden_size
    if weights.shape[-1] != spec.neuron_dim:
        raise ValueError(f"neuron weights have last dimension {weights.shape[-1]}; model {spec.name} "
                         f"({spec.mlp.kind} MLP, hidden size {d}) needs {spec.neuron_dim}")
    key = weights[..., :d]
    if spec.neuron_has_bias:
        return key, weights[..., d], weights[..., d + 1:]
    return key, None, weights[..., d:]


def join_neuron(key: Tensor, value: Tensor, bias: Tensor | None, spec: ModelSpec) -> Tensor:
    """Inverse of :func:`split_neuron`."""
    parts = [key]
    if spec.neuron_has_bias:
        parts.append((bias if bias is not None else key.new_zeros(key.shape[:-1])).unsqueeze(-1))
    parts.append(value)
    return torch.cat(parts, dim=-1)


def value_emphasis(spec: ModelSpec, value_weight: float) -> Tensor:
    """Per-element weights ``[D]`` of a neuron, mean 1: ``value_weight`` times as much on the value as on the
    key (and bias). A generator's loss weighted so learns the value, which decides what the edit writes, more
    precisely than the key, which only decides where it fires."""
    d = spec.hidden_size
    weights = torch.ones(spec.neuron_dim)
    weights[spec.neuron_dim - d:] = float(value_weight)
    return weights / weights.mean()


def scale_value(weights: Tensor, spec: ModelSpec, factor: float) -> Tensor:
    """The neurons with their value vectors times ``factor`` (keys and bias unchanged): the neuron fires
    where it did, and writes ``factor`` times as much into the residual stream."""
    if factor == 1.0:
        return weights
    key, bias, value = split_neuron(weights, spec)
    return join_neuron(key, value * factor, bias, spec)


class DynamicNeuron:
    """Attach per-row neurons to ``(model, spec)``; ``set_weights(None)`` makes the hook a no-op.

    Not an ``nn.Module`` on purpose: it owns no parameters (the weights come from the caller,
    possibly with ``requires_grad``) and must never show up in the LM's ``state_dict``.
    """

    def __init__(self, model: torch.nn.Module, spec: ModelSpec):
        from transformers.activations import ACT2FN

        self.spec = spec
        self.mlp = edit_mlp(model, spec)
        try:
            self.act = ACT2FN[spec.mlp.activation]
        except KeyError:
            raise ValueError(f"model {spec.name}: mlp.activation {spec.mlp.activation!r} is not a transformers "
                             "ACT2FN key") from None
        self.weights: Tensor | None = None
        self._handle = self.mlp.register_forward_hook(self._hook)

    def set_weights(self, weights: Tensor | None) -> None:
        if weights is not None:
            if weights.dim() != 2 or weights.shape[1] != self.spec.neuron_dim:
                raise ValueError(f"neuron weights must be [B, {self.spec.neuron_dim}] for model {self.spec.name}; "
                                 f"got {tuple(weights.shape)}")
        self.weights = weights

    def clear(self) -> None:
        self.weights = None

    @contextlib.contextmanager
    def attached(self, weights: Tensor | None) -> Iterator["DynamicNeuron"]:
        previous = self.weights
        self.set_weights(weights)
        try:
            yield self
        finally:
            self.weights = previous

    def remove(self) -> None:
        self._handle.remove()
        self.weights = None

    def _hook(self, module, args, output):
        weights = self.weights
        if weights is None:
            return None
        h = args[0]  # the MLP input [B, T, d]
        if weights.shape[0] != h.shape[0]:
            if weights.shape[0] != 1:
                raise ValueError(f"neuron weights carry {weights.shape[0]} rows but the batch has {h.shape[0]} "
                                 "(beam search / num_return_sequences are not supported; give one row per sequence)")
        weights = weights.to(dtype=h.dtype, device=h.device)
        key, bias, value = split_neuron(weights, self.spec)
        pre = torch.einsum("btd,bd->bt", h, key.expand(h.shape[0], -1))
        if bias is not None:
            pre = pre + bias.expand(h.shape[0]).unsqueeze(1)
        return output + self.act(pre).unsqueeze(-1) * value.expand(h.shape[0], -1).unsqueeze(1)
