"""The dynamic neuron: exact no-op at zero, the documented formula, per-row weights in batches and generate."""

from __future__ import annotations

import pytest
import torch

from megedit.components.neuron import DynamicNeuron, join_neuron, split_neuron
from megedit.loading import edit_mlp
from megedit.scoring import greedy_generate, greedy_match, left_pad, positions_from_mask, teacher_forced


def _ids(batch=3, length=7, vocab=128, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, length), generator=g)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_zero_weights_give_exactly_the_original_logits(fixture, request):
    model, spec = request.getfixturevalue(fixture)
    ids = _ids()
    before = model(ids).logits
    neuron = DynamicNeuron(model, spec)
    with neuron.attached(torch.zeros(3, spec.neuron_dim)):
        during = model(ids).logits
    assert torch.equal(before, during)
    with neuron.attached(torch.randn(3, spec.neuron_dim)):
        assert not torch.allclose(before, model(ids).logits)
    neuron.remove()
    assert torch.equal(before, model(ids).logits)


def test_gated_neuron_matches_the_formula(tiny_llama):
    model, spec = tiny_llama
    mlp = edit_mlp(model, spec)
    h = torch.randn(2, 5, spec.hidden_size)
    w = torch.randn(2, spec.neuron_dim)
    key, bias, value = split_neuron(w, spec)
    assert bias is None and key.shape == value.shape == (2, spec.hidden_size)
    expected = mlp(h) + torch.nn.functional.silu(torch.einsum("btd,bd->bt", h, key))[..., None] * value[:, None]
    neuron = DynamicNeuron(model, spec)
    with neuron.attached(w):
        assert torch.allclose(mlp(h), expected, atol=1e-6)


def test_ungated_neuron_equals_an_mlp_with_one_more_hidden_unit(tiny_gpt2):
    """GPT-2: the neuron is exactly one extra c_fc row (with bias) and one extra c_proj column."""
    model, spec = tiny_gpt2
    mlp = edit_mlp(model, spec)
    w = torch.randn(1, spec.neuron_dim)
    key, bias, value = split_neuron(w, spec)
    assert bias.shape == (1,) and spec.neuron_dim == 2 * spec.hidden_size + 1
    # Conv1D stores weight as [in, out]: append a column to c_fc and a row to c_proj.
    big_fc_w = torch.cat([mlp.c_fc.weight, key.T], dim=1)
    big_fc_b = torch.cat([mlp.c_fc.bias, bias])
    big_proj_w = torch.cat([mlp.c_proj.weight, value], dim=0)
    h = torch.randn(1, 4, spec.hidden_size)
    act = mlp.act
    expected = act(h @ big_fc_w + big_fc_b) @ big_proj_w + mlp.c_proj.bias
    neuron = DynamicNeuron(model, spec)
    with neuron.attached(w):
        assert torch.allclose(mlp(h), expected, atol=1e-5)
    assert torch.equal(join_neuron(key, value, bias, spec), w)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_each_batch_row_gets_its_own_neuron_even_left_padded(fixture, request):
    model, spec = request.getfixturevalue(fixture)
    seqs = [[5, 9, 3], [7, 1, 2, 8, 4, 6], [11, 12, 13, 14]]
    w = torch.randn(3, spec.neuron_dim) * 0.5
    neuron = DynamicNeuron(model, spec)
    ids, mask = left_pad(seqs, 0)
    with neuron.attached(w):
        batched = model(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask)).logits
        for i, s in enumerate(seqs):
            with neuron.attached(w[i:i + 1]):
                alone = model(torch.tensor([s])).logits[0]
            assert torch.allclose(batched[i, -len(s):], alone, atol=1e-4), f"row {i}"


class _ToyTokenizer:
    """Whitespace tokenizer over integer words, enough for the scoring helpers on tiny models."""

    pad_token_id = 0
    eos_token_id = 1

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [int(t) for t in text.split()]}


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_generate_follows_the_rows_with_kv_cache(fixture, request):
    model, spec = request.getfixturevalue(fixture)
    tok = _ToyTokenizer()
    prompts = ["5 9 3", "7 2 8 4 6 10", "11 12 13 14"]
    w = torch.randn(3, spec.neuron_dim) * 2.0
    neuron = DynamicNeuron(model, spec)
    batched = greedy_generate(model, tok, neuron, prompts, w, max_new_tokens=6, batch_size=3)
    alone = [greedy_generate(model, tok, neuron, [p], w[i:i + 1], max_new_tokens=6)[0] for i, p in enumerate(prompts)]
    assert batched == alone
    base = greedy_generate(model, tok, None, prompts, None, max_new_tokens=6)
    assert batched != base  # the neurons change the answers (weights are large on purpose)
    assert greedy_generate(model, tok, neuron, prompts, torch.zeros(3, spec.neuron_dim), max_new_tokens=6) == base
    assert neuron.weights is None  # the context manager detached them again


def test_teacher_forced_exact_agrees_with_greedy_match(tiny_llama):
    model, spec = tiny_llama
    tok = _ToyTokenizer()
    prompts = ["5 9 3", "7 2 8 4 6 10", "11 12 13 14", "20 21"]
    # Targets = the model's own greedy answers for rows 0 and 2 (so both metrics say yes), others wrong.
    own = greedy_generate(model, tok, None, prompts, max_new_tokens=3)
    targets = [" ".join(map(str, own[0])), "3 3 3", " ".join(map(str, own[2])), "4"]
    targets = [t if t else "2" for t in targets]
    tf = teacher_forced(model, tok, None, prompts, [t for t in targets], batch_size=2)
    gm = greedy_match(model, tok, None, prompts, targets, batch_size=3)
    assert tf["exact"].tolist() == gm.tolist()
    assert tf["exact"][0] and tf["token_acc"][0] == 1.0
    assert ((tf["token_acc"] == 1.0) == tf["exact"]).all()


def test_bad_weights_are_refused(tiny_llama):
    model, spec = tiny_llama
    neuron = DynamicNeuron(model, spec)
    with pytest.raises(ValueError, match="needs|must be"):
        neuron.set_weights(torch.zeros(2, spec.neuron_dim + 1))
    with pytest.raises(ValueError, match="needs"):
        split_neuron(torch.zeros(3), spec)
    neuron.set_weights(torch.zeros(2, spec.neuron_dim))
    with pytest.raises(ValueError, match="rows but the batch has"):
        model(_ids(batch=3))
    neuron.clear()
    model(_ids(batch=3))


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_scale_value_scales_only_the_value_and_scales_the_neurons_output(fixture, request):
    from megedit.components.neuron import scale_value

    model, spec = request.getfixturevalue(fixture)
    torch.manual_seed(0)
    w = torch.randn(3, spec.neuron_dim)
    scaled = scale_value(w, spec, 2.0)
    (k, b, v), (k2, b2, v2) = split_neuron(w, spec), split_neuron(scaled, spec)
    assert torch.equal(k, k2) and (b is None or torch.equal(b, b2)) and torch.equal(v2, 2 * v)
    assert scale_value(w, spec, 1.0) is w
    # the neuron adds act(h.k) v: doubling v doubles what it adds to the MLP output
    ids = torch.randint(0, model.config.vocab_size, (3, 5))
    mlp = edit_mlp(model, spec)
    outs = []
    neuron = DynamicNeuron(model, spec)  # its hook first, so the probe below sees the neuron's addition
    hook = mlp.register_forward_hook(lambda m, a, o: outs.append(o.detach().clone()))
    with torch.no_grad():
        model(ids)
        for weights in (w, scaled):
            with neuron.attached(weights):
                model(ids)
    hook.remove()
    base, one, two = outs[0], outs[1], outs[2]
    assert (one - base).abs().max() > 1e-4
    torch.testing.assert_close(two - base, 2 * (one - base), atol=1e-5, rtol=1e-4)
