"""Run a causal LM in two halves around its edit layer.

Whatever trains at the edit layer or above (a collected neuron, FT's MLP) leaves the layers below it
unchanged, so their output can be computed once (``lower``) and every training step runs only the edit
layer and those above it (``upper``). Used by batched collection and the FT baseline.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
from torch import Tensor

from megedit.loading import decoder_layers, edit_mlp
from megedit.registry import ModelSpec


class _Skip(torch.nn.Module):
    """Stands in for a decoder layer whose output is not needed (or is replaced by the cache)."""

    def __init__(self, original: torch.nn.Module, returns_tuple: bool):
        super().__init__()
        self.returns_tuple = returns_tuple
        for attr in ("attention_type", "layer_idx", "is_sliding"):  # read by some decoders' loops
            if hasattr(original, attr):
                setattr(self, attr, getattr(original, attr))

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states,) if self.returns_tuple else hidden_states


class LayerSplit:
    """Run a causal LM in two halves around the edit layer: ``lower`` (cached once) and ``upper``."""

    def __init__(self, model: torch.nn.Module, spec: ModelSpec):
        self.model, self.spec = model, spec
        self.layers = decoder_layers(model, spec)
        self.L = spec.edit_layer
        self.base = model.base_model
        self.head = model.get_output_embeddings()
        if self.head is None:
            raise ValueError(f"model {spec.name}: no output embeddings (LM head) found")
        self._returns_tuple: bool | None = None

    @contextlib.contextmanager
    def _skipping(self, indices: Sequence[int]):
        saved = {i: self.layers[i] for i in indices}
        try:
            for i in indices:
                self.layers[i] = _Skip(saved[i], bool(self._returns_tuple))
            yield
        finally:
            for i, layer in saved.items():
                self.layers[i] = layer

    @torch.no_grad()
    def lower(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> tuple[Tensor, Tensor]:
        """Return ``(input of the edit layer, input of its MLP)``, both ``[B, T, d]``; layers above are skipped."""
        got = {}

        def grab_layer_input(module, args, kwargs):
            got["layer"] = args[0] if args else kwargs["hidden_states"]

        def grab_layer_output(module, args, output):
            if self._returns_tuple is None:
                self._returns_tuple = isinstance(output, tuple)

        def grab_mlp_input(module, args):
            got["mlp"] = args[0]

        layer = self.layers[self.L]
        handles = [layer.register_forward_pre_hook(grab_layer_input, with_kwargs=True),
                   layer.register_forward_hook(grab_layer_output),
                   edit_mlp(self.model, self.spec).register_forward_pre_hook(grab_mlp_input)]
        try:
            # Layers above L are skipped only once we know what a layer returns (first call runs them).
            skip = range(self.L + 1, len(self.layers)) if self._returns_tuple is not None else ()
            with self._skipping(skip):
                self.base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False)
        finally:
            for h in handles:
                h.remove()
        return got["layer"], got["mlp"]

    def upper(self, hidden: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        """Final hidden states (after the final norm) from the cached edit-layer input ``hidden`` [B, T, d]."""

        def inject(module, args, kwargs):
            if args:
                return (hidden,) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        handle = self.layers[self.L].register_forward_pre_hook(inject, with_kwargs=True)
        try:
            with self._skipping(range(self.L)):
                # The embeddings below are thrown away by ``inject``; zeros keep them cheap and shaped right.
                dummy = hidden.new_zeros(hidden.shape).detach()
                out = self.base(inputs_embeds=dummy, attention_mask=attention_mask, position_ids=position_ids,
                                use_cache=False)
        finally:
            handle.remove()
        return out.last_hidden_state
