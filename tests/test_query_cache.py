"""CachedQueries (the diffusion stage's scorer) gives teacher_forced's answers with the lower layers run once."""

import pytest
import torch

from megedit.components.neuron import DynamicNeuron
from megedit.query_cache import CachedQueries
from megedit.scoring import greedy_tokens, teacher_forced


class CharTok:
    """One token per character (ids 3..102); a target's leading space is dropped, so any greedy answer made of
    those ids can be written back as a target text."""
    pad_token_id, eos_token_id = 0, 1

    def __call__(self, text, add_special_tokens=True):
        text = text if add_special_tokens else text.lstrip(" ")
        return {"input_ids": [3 + (ord(c) % 100) for c in text]}

    @staticmethod
    def text(ids):
        return "".join(chr(100 + i - 3) for i in ids)


def _queries(model, neuron, weights):
    """Prompts with targets that are their greedy answer (hits), one token off, or random."""
    prompts = [f"q{i} {'ab' * (i % 3)} x" for i in range(12)]
    greedy = greedy_tokens(model, CharTok(), neuron, prompts, weights, 3, 4)
    g = torch.Generator().manual_seed(0)
    targets = []
    for i, out in enumerate(greedy):
        out = [t if 3 <= t <= 102 else 3 for t in out]
        if i % 3 == 1:
            out = out[:1] + [(out[1] - 3 + 7) % 100 + 3] + out[2:]
        elif i % 3 == 2:
            out = torch.randint(3, 103, (3,), generator=g).tolist()
        targets.append(CharTok.text(out))
    return prompts, targets


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_cached_queries_score_as_teacher_forcing(fixture, request):
    model, spec = request.getfixturevalue(fixture)
    model.generation_config.pad_token_id = 0
    neuron = DynamicNeuron(model, spec)
    torch.manual_seed(1)
    weights = torch.randn(12, spec.neuron_dim) * 0.5
    prompts, targets = _queries(model, neuron, weights)
    cached = CachedQueries(model, CharTok(), spec, prompts, targets, batch_size=5)
    for w in (weights, weights * 2, None):  # the same cache under several neuron sets, and none
        want = teacher_forced(model, CharTok(), None if w is None else neuron, prompts, targets, w, batch_size=5)
        got = cached.score(neuron if w is not None else None, w)
        assert torch.equal(got["exact"], want["exact"])
        assert torch.allclose(got["token_acc"], want["token_acc"])
    first = cached.score(neuron, weights)["exact"]
    assert 0 < int(first.sum()) < len(prompts)  # the comparison saw hits and misses


def test_cached_queries_refuse_wrong_row_count(tiny_llama):
    model, spec = tiny_llama
    cached = CachedQueries(model, CharTok(), spec, ["a b", "c d"], ["x", "y"])
    with pytest.raises(ValueError, match="2 queries but 3 neuron rows"):
        cached.score(DynamicNeuron(model, spec), torch.zeros(3, spec.neuron_dim))


def test_cached_queries_on_token_targets_give_teacher_forced_ids_greedy_prefixes(tiny_llama):
    """The evaluate stage's use: targets as token ids (pre-edit answers), one batch, greedy tokens for the answer."""
    from megedit.scoring import teacher_forced_ids

    model, spec = tiny_llama
    model.generation_config.pad_token_id = 0
    neuron = DynamicNeuron(model, spec)
    torch.manual_seed(2)
    weights = torch.randn(12, spec.neuron_dim) * 0.5
    prompts, texts = _queries(model, neuron, weights)
    tokens = [CharTok()(" " + t, add_special_tokens=False)["input_ids"] for t in texts]
    cached = CachedQueries(model, CharTok(), spec, prompts, batch_size=len(prompts), target_tokens=tokens)
    want = teacher_forced_ids(model, CharTok(), neuron, prompts, tokens, weights, batch_size=len(prompts))
    got = cached.score(neuron, weights, greedy=True)
    assert torch.equal(got["exact"], want["exact"]) and torch.allclose(got["token_acc"], want["token_acc"])
    assert got["greedy"] == want["greedy"]
    with pytest.raises(ValueError, match="either targets"):
        CachedQueries(model, CharTok(), spec, prompts)
