"""Batched neuron collection on tiny random models: split forward, per-row Adam with refill, freezing."""

from __future__ import annotations

import functools

import pytest
import torch

from megedit.collect.engine import CollectItem, CollectOptions, NeuronCollector, collect
from megedit.components.neuron import DynamicNeuron
from megedit.layer_split import LayerSplit
from megedit.scoring import greedy_match, target_batch, teacher_forced
from test_collect_neuron import _ToyTokenizer

PROMPTS = ["5 9 3", "7 2 8 4 6 10", "11 12", "3 3 3 3", "9", "1 2 3", "20 21 22", "30 31 32 33 34"]

# The engine's tests were written for its small-model settings (the stage defaults are for SmolLM2).
_opts = functools.partial(CollectOptions, lr=0.05, max_steps=50, stop_margin=0.0)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_cached_lower_layers_plus_upper_equal_the_full_forward(fixture, request):
    model, spec = request.getfixturevalue(fixture)
    split = LayerSplit(model, spec)
    batch = target_batch(_ToyTokenizer(), PROMPTS[:3], ["40 41", "50", "60 61 62"])
    args = (batch["input_ids"], batch["attention_mask"], batch["position_ids"])
    layer_in, _ = split.lower(*args)
    layer_in, _ = split.lower(*args)  # second call skips the layers above L
    full = model.base_model(input_ids=args[0], attention_mask=args[1], position_ids=args[2]).last_hidden_state
    real = batch["attention_mask"].bool()
    assert torch.allclose(split.upper(layer_in, args[1], args[2])[real], full[real], atol=1e-5)
    # With a neuron attached the upper half sees it too (the lower half must not).
    neuron = DynamicNeuron(model, spec)
    with neuron.attached(torch.randn(3, spec.neuron_dim)):
        edited = model.base_model(input_ids=args[0], attention_mask=args[1], position_ids=args[2]).last_hidden_state
        assert torch.allclose(split.upper(layer_in, args[1], args[2])[real], edited[real], atol=1e-5)


def _items(n):
    return [CollectItem(f"e{i}", [PROMPTS[i % len(PROMPTS)]], str(40 + i)) for i in range(n)]


@pytest.mark.parametrize("fixture,optimizer,lr", [("tiny_llama", "adam", 0.5), ("tiny_gpt2", "adam", 0.5),
                                                  ("tiny_llama", "sgd", 20.0)])
def test_batched_refill_equals_one_at_a_time(fixture, optimizer, lr, request):
    """Per-row optimiser state: batching with refill gives each edit the same trajectory as running it alone."""
    model, spec = request.getfixturevalue(fixture)
    items = _items(7)
    opts = dict(lr=lr, max_steps=60, optimizer=optimizer)
    alone = collect(model, _ToyTokenizer(), spec, items, _opts(capacity=1, **opts))
    batched = collect(model, _ToyTokenizer(), spec, items, _opts(capacity=3, **opts))
    assert [r.key for r in batched] == [it.key for it in items]
    assert sum(r.success for r in alone) >= 5  # single-token targets are reachable even on a random model
    for a, b in zip(alone, batched):
        assert (a.success, a.steps) == (b.success, b.steps)
        assert torch.allclose(a.weights, b.weights, atol=1e-4, rtol=1e-4)


def test_results_are_frozen_at_the_weights_that_passed(tiny_llama):
    model, spec = tiny_llama
    tok = _ToyTokenizer()
    items = _items(6)
    res = collect(model, tok, spec, items, _opts(lr=0.5, max_steps=60, capacity=2))
    W = torch.stack([r.weights for r in res])
    neuron = DynamicNeuron(model, spec)
    prompts, targets = [it.views[0] for it in items], [it.target for it in items]
    tf = teacher_forced(model, tok, neuron, prompts, targets, W)
    gm = greedy_match(model, tok, neuron, prompts, targets, W)
    ok = torch.tensor([r.success for r in res])
    assert ok.any()
    assert torch.equal(tf["exact"], ok) and torch.equal(gm, ok)
    # One more step would have moved them: a success is recorded before the update of that step.
    assert all(r.steps < 60 for r in res if r.success)


def test_margin_and_views(tiny_llama):
    model, spec = tiny_llama
    tok = _ToyTokenizer()
    base = collect(model, tok, spec, _items(4), _opts(lr=0.5, max_steps=80, capacity=4))
    strict = collect(model, tok, spec, _items(4), _opts(lr=0.5, max_steps=80, capacity=4, stop_margin=2.0))
    for a, b in zip(base, strict):
        if b.reached_margin:
            assert b.success and b.min_margin > 2.0 and b.steps >= a.steps
        elif b.success:  # greedy decoding already works, the slack was not reached in the step budget
            assert b.steps == 80
    views = [CollectItem(i, [PROMPTS[i], "8 8 " + PROMPTS[i]], str(40 + i)) for i in range(3)]
    res = collect(model, tok, spec, views, _opts(lr=0.5, max_steps=80, capacity=2))
    neuron = DynamicNeuron(model, spec)
    W = torch.stack([r.weights for r in res])
    exact = [teacher_forced(model, tok, neuron, [it.views[v] for it in views], [it.target for it in views], W)["exact"]
             for v in (0, 1)]
    # Success is the prompt's (view 0); stopping (stop_on=all) needs every view to pass.
    assert exact[0].tolist() == [r.success for r in res]
    assert (exact[0] & exact[1]).tolist() == [r.reached_margin for r in res]


def test_engine_cache_is_released_and_options_checked(tiny_llama):
    model, spec = tiny_llama
    done = []
    engine = NeuronCollector(model, _ToyTokenizer(), spec, _opts(lr=0.5, max_steps=5, capacity=2),
                             on_result=lambda r, extra: done.append((r.key, extra["tag"])))
    engine.add(_items(3), extra={"tag": "a"})
    assert engine.cache_bytes > 0 and engine.pending == 3
    engine.run()
    assert engine.idle and engine.cache_bytes == 0 and engine.peak_cache_bytes > 0
    assert sorted(done) == [("e0", "a"), ("e1", "a"), ("e2", "a")]
    with pytest.raises(ValueError, match="key_init"):
        _opts(key_init="middle")
    with pytest.raises(ValueError, match="stop_on"):
        _opts(stop_on="some")
    with pytest.raises(ValueError, match="optimizer"):
        _opts(optimizer="lbfgs")


class _OffsetTokenizer(_ToyTokenizer):
    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        out = super().__call__(text, add_special_tokens)
        if return_offsets_mapping:
            offsets, pos = [], 0
            for word in text.split():
                start = text.index(word, pos)
                offsets.append((start, start + len(word)))
                pos = start + len(word)
            out["offset_mapping"] = offsets
        return out


def test_key_starts_where_it_should(tiny_llama):
    """key_init last / subject: h.k = 1 exactly at that token of the prompt, value 0 (so no edit yet)."""
    model, spec = tiny_llama
    from megedit.loading import edit_mlp

    tok = _OffsetTokenizer()
    item = CollectItem("x", ["5 9 3 7"], "40", subject="9 3")
    seen = {}
    handle = edit_mlp(model, spec).register_forward_pre_hook(lambda m, args: seen.__setitem__("h", args[0][0]))
    model(torch.tensor([[5, 9, 3, 7]]))
    handle.remove()
    d = spec.hidden_size
    for key_init, pos in (("last", 3), ("subject", 2)):
        engine = NeuronCollector(model, tok, spec, _opts(key_init=key_init))
        w = engine.initial_weights([item])[0]
        assert torch.allclose(seen["h"][pos] @ w[:d], torch.tensor(1.0), atol=1e-4)
        assert torch.equal(w[d:], torch.zeros(d))
    engine = NeuronCollector(model, tok, spec, _opts(key_init="subject"))
    engine.initial_weights([CollectItem("y", ["5 9 3 7"], "40", subject="not there")])
    assert engine.subject_fallbacks == 1


def test_budget_rule_runs_every_edit_for_max_steps_and_judges_after(tiny_llama):
    """stop_rule="budget" (the authors' fixed step count): no early stop; success is checked after the last step."""
    model, spec = tiny_llama
    tok = _ToyTokenizer()
    items = _items(5)
    early = collect(model, tok, spec, items, _opts(lr=0.5, max_steps=30, capacity=2))
    fixed = collect(model, tok, spec, items, _opts(lr=0.5, max_steps=30, capacity=2, stop_rule="budget"))
    assert all(r.steps == 30 for r in fixed)
    assert any(r.steps < 30 for r in early)
    W = torch.stack([r.weights for r in fixed])
    neuron = DynamicNeuron(model, spec)
    tf = teacher_forced(model, tok, neuron, [it.views[0] for it in items], [it.target for it in items], W)
    assert [r.success for r in fixed] == tf["exact"].tolist()  # the flag belongs to the returned weights
    with pytest.raises(ValueError, match="stop_rule"):
        _opts(stop_rule="never")
