"""bench/causal_trace.py on a tiny random Llama: the restores are exact, zero noise has no effect, the classes."""

from __future__ import annotations

import sys

import pytest
import torch

from megedit.paths import REPO_ROOT


@pytest.fixture(scope="module")
def ct():
    sys.path.insert(0, str(REPO_ROOT / "bench"))
    try:
        import causal_trace
    finally:
        sys.path.remove(str(REPO_ROOT / "bench"))
    return causal_trace


def _setup(ct, tiny_llama, scale: float):
    model, spec = tiny_llama
    modules = ct.trace_modules(model, spec)
    tr = ct.Traced(torch.tensor([5, 17, 42, 9, 77, 3, 31, 64, 8]), b=2, e=5, answer=11)
    noise = torch.randn(4, tr.e - tr.b, 32, generator=torch.Generator().manual_seed(0)) * scale
    with torch.no_grad():
        p, clean = ct.clean_run(model, modules, tr.ids, tr.answer)
    return model, spec, modules, tr, noise, p, clean


def test_token_classes_of_a_known_span(ct):
    assert ct.token_classes(2, 5, 9) == {"first_subject": [2], "middle_subject": [3], "last_subject": [4],
                                         "first_subsequent": [5], "further": [6, 7], "last": [8]}
    # a one-token subject is first and last; right before the last token there is no 'further'
    assert ct.token_classes(0, 1, 3) == {"first_subject": [0], "middle_subject": [], "last_subject": [0],
                                         "first_subsequent": [1], "further": [], "last": [2]}
    with pytest.raises(ValueError):
        ct.token_classes(1, 3, 3)  # the subject may not reach the last token


def test_restoring_every_residual_gives_the_clean_probability(ct, tiny_llama, one_thread):
    model, spec, modules, tr, noise, p, clean = _setup(ct, tiny_llama, 5.0)
    everything = [[(("block", layer), tuple(range(len(tr.ids)))) for layer in range(spec.num_layers)]]
    with torch.no_grad():
        p_star = ct.corrupted_probs(model, modules, clean, tr, noise, 0, [[]])
        restored = ct.corrupted_probs(model, modules, clean, tr, noise, 0, everything)
    assert abs(float(p_star[0]) - p) > 1e-4  # the noise does move the prediction
    torch.testing.assert_close(restored, torch.tensor([p]), rtol=1e-5, atol=1e-7)


def test_starting_from_the_corrupted_cache_matches_the_full_run(ct, tiny_llama, one_thread):
    model, spec, modules, tr, noise, p, clean = _setup(ct, tiny_llama, 5.0)
    t = tr.e - 1
    configs = [c for kind in ("block", "mlp", "attn", "mlp_window")
               for c in ct.kind_configs(kind, spec.num_layers, 2, t)]
    with torch.no_grad():
        full = ct.corrupted_probs(model, modules, clean, tr, noise, 0, configs)
        cache = ct.corrupted_cache(model, modules, tr, noise, t)
        cached = torch.cat([ct.corrupted_probs(model, modules, clean, tr, noise, t, configs[i:i + 5], cache)
                            for i in range(0, len(configs), 5)])
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-7)


def test_zero_noise_has_no_indirect_effect(ct, tiny_llama, one_thread):
    model, spec, modules, tr, noise, p, clean = _setup(ct, tiny_llama, 0.0)
    kinds = ("block", "mlp", "attn", "mlp_window")
    with torch.no_grad():
        p_star, ie = ct.trace_prompt(model, modules, clean, tr, noise, kinds, spec.num_layers, 2, 7,
                                     list(range(tr.b, len(tr.ids))))
    assert p_star == pytest.approx(p, abs=1e-6)
    assert ie[:, :, : tr.b].isnan().all()  # before the subject: not traced
    torch.testing.assert_close(ie[:, :, tr.b:], torch.zeros(len(kinds), spec.num_layers, len(tr.ids) - tr.b),
                               rtol=0, atol=1e-6)
    classes = ct.token_classes(tr.b, tr.e, len(tr.ids))
    assert ct.class_means(ie, classes).abs().max() < 1e-6


def test_mean_ci_ignores_missing_classes(ct):
    x = torch.tensor([[1.0, float("nan")], [3.0, 2.0]])
    mean, half, n = ct.mean_ci(x)
    assert mean.tolist() == [2.0, 2.0] and n.tolist() == [2, 1]
    assert half[0] == pytest.approx(1.96 * (2.0 / 2) ** 0.5) and half[1] == 0
