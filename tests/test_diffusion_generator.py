"""The diffusers schedule/samplers checked against our own reference computation, normalisation,
persistence, and that training actually fits a few conditioned vectors."""

from __future__ import annotations

import math

import json

import pytest
import torch

from megedit.artifacts import ArtifactError
from megedit.diffusion.artifact import load_generator, save_generator
from megedit.diffusion.generator import WeightGenerator, make_sampler, make_training_scheduler


pytestmark = pytest.mark.usefixtures("one_thread")


def reference_alphas_cumprod(schedule: str, n: int = 1000) -> torch.Tensor:
    if schedule == "linear":  # Ho et al. 2020
        betas = torch.linspace(1e-4, 0.02, n, dtype=torch.float64)
    else:  # Nichol & Dhariwal 2021, s = 0.008, betas capped at 0.999
        f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = torch.tensor([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)], dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_schedule_and_v_target_match_reference(schedule):
    sched = make_training_scheduler(schedule)
    ab = reference_alphas_cumprod(schedule)
    torch.testing.assert_close(sched.alphas_cumprod.double(), ab, atol=1e-6, rtol=1e-5)
    x0, eps, t = torch.randn(6, 9), torch.randn(6, 9), torch.tensor([0, 1, 250, 500, 998, 999])
    a = ab[t].float().sqrt()[:, None]
    s = (1 - ab[t]).float().sqrt()[:, None]
    torch.testing.assert_close(sched.add_noise(x0, eps, t), a * x0 + s * eps, atol=1e-5, rtol=1e-5)
    # paper eq. 7-8: v = sqrt(ᾱ) ε − sqrt(1 − ᾱ) x0
    torch.testing.assert_close(sched.get_velocity(x0, eps, t), a * eps - s * x0, atol=1e-5, rtol=1e-5)


def test_ddim_trajectory_matches_reference_update():
    """Our own eta=0 DDIM update on v-predictions, step by step, against diffusers' DDIMScheduler."""
    torch.manual_seed(0)
    train = make_training_scheduler("linear")
    ab = reference_alphas_cumprod("linear")
    sampler = make_sampler("ddim", train, 10)
    w = torch.randn(7, 7) * 0.3
    model = lambda x, t: torch.tanh(x @ w) * (1 + t / 1000)  # noqa: E731 - any fixed function of (x, t)
    x = x_ref = torch.randn(3, 7, dtype=torch.float64)
    timesteps = sampler.timesteps.tolist()
    assert timesteps[0] == 999 and len(timesteps) == 10  # trailing spacing starts at pure noise
    for k, t in enumerate(timesteps):
        x = sampler.step(model(x.float(), t), t, x.float()).prev_sample.double()
        v = model(x_ref.float(), t).double()
        a_t = ab[t]
        a_prev = ab[timesteps[k + 1]] if k + 1 < len(timesteps) else torch.tensor(1.0, dtype=torch.float64)
        x0 = a_t.sqrt() * x_ref - (1 - a_t).sqrt() * v
        eps = a_t.sqrt() * v + (1 - a_t).sqrt() * x_ref
        x_ref = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
        torch.testing.assert_close(x, x_ref, atol=1e-4, rtol=1e-4)


class _Oracle(torch.nn.Module):
    """Returns the exact v for a known x0: v = (sqrt(ᾱ) x_t − x0) / sqrt(1 − ᾱ)."""

    def __init__(self, x0, alphas_cumprod):
        super().__init__()
        self.x0, self.ab = x0, alphas_cumprod

    def forward(self, x, t, cond):
        a = self.ab[t].float()[:, None]
        return (a.sqrt() * x - self.x0) / (1 - a).sqrt()


@pytest.mark.parametrize("sampler", ["ddim", "ancestral"])
@pytest.mark.parametrize("steps", [1, 10, 50])
def test_samplers_recover_x0_with_an_oracle(sampler, steps):
    gen = WeightGenerator("dit-tiny", input_dim=12, cond_dim=3, normalisation="global")
    x0 = torch.randn(4, 12)
    gen.net = _Oracle(x0, gen.scheduler.alphas_cumprod)
    out = gen.sample(torch.zeros(4, 3), steps=steps, sampler=sampler, seed=0, normalised=True)
    torch.testing.assert_close(out, x0, atol=2e-3, rtol=2e-3)


def test_sampling_seeds_and_errors():
    torch.manual_seed(0)
    gen = WeightGenerator("dit-tiny", input_dim=12, cond_dim=3)
    for p in gen.net.final_layer.parameters():  # leave the zero init so samples depend on the network
        torch.nn.init.normal_(p, std=0.5)
    c = torch.randn(2, 3)
    assert torch.equal(gen.sample(c, steps=5, seed=1), gen.sample(c, steps=5, seed=1))
    assert not torch.equal(gen.sample(c, steps=5, seed=1), gen.sample(c, steps=5, seed=2))
    assert not torch.equal(gen.sample(c, steps=5, seed=1), gen.sample(c, steps=5, seed=1, sampler="ancestral"))
    torch.testing.assert_close(gen.sample(c, steps=5, seed=3, batch_size=1)[:1], gen.sample(c[:1], steps=5, seed=3))
    with pytest.raises(ValueError, match="conditions"):
        gen.sample(torch.randn(2, 4))
    with pytest.raises(ValueError, match="sampler"):
        gen.sample(c, sampler="euler")
    with pytest.raises(ValueError, match="steps"):
        gen.sample(c, steps=0)


def test_noise_scale_zero_is_deterministic_and_saved_as_the_default(tmp_path):
    torch.manual_seed(0)
    gen = WeightGenerator("dit-tiny", input_dim=12, cond_dim=3, noise_scale=0.0)
    for p in gen.net.final_layer.parameters():
        torch.nn.init.normal_(p, std=0.5)
    c = torch.randn(2, 3)
    # From the origin, DDIM has no randomness left: the seed no longer matters.
    assert torch.equal(gen.sample(c, steps=5, seed=1), gen.sample(c, steps=5, seed=2))
    assert not torch.equal(gen.sample(c, steps=5, seed=1, noise_scale=1.0), gen.sample(c, steps=5, seed=2, noise_scale=1.0))
    with pytest.raises(ValueError, match="noise_scale"):
        gen.sample(c, noise_scale=1.5)
    gen.fit_normalisation(torch.randn(8, 12))
    save_generator(tmp_path, gen)
    loaded = load_generator(tmp_path)
    assert loaded.noise_scale == 0.0
    torch.testing.assert_close(loaded.sample(c, steps=4, seed=7), gen.sample(c, steps=4, seed=3))


@pytest.mark.parametrize("mode", ["scale", "standardise", "global"])
def test_normalisation_round_trip(mode):
    w = torch.randn(50, 6) * torch.tensor([0.01, 0.1, 1.0, 2.0, 0.5, 0.02]) + 0.3
    gen = WeightGenerator("mlp-tiny", input_dim=6, cond_dim=2, normalisation=mode, scale=100.0)
    gen.fit_normalisation(w)
    z = gen.normalise(w)
    torch.testing.assert_close(gen.denormalise(z), w, atol=1e-5, rtol=1e-5)
    if mode == "scale":
        torch.testing.assert_close(z, w * 100, atol=1e-4, rtol=1e-5)
    elif mode == "standardise":
        torch.testing.assert_close(z.mean(0), torch.zeros(6), atol=1e-5, rtol=0)
        torch.testing.assert_close(z.std(0, unbiased=False), torch.ones(6), atol=1e-4, rtol=0)
    else:
        assert abs(float(z.mean())) < 1e-5 and abs(float(z.std(unbiased=False)) - 1) < 1e-4
    with pytest.raises(ValueError, match="normalisation"):
        WeightGenerator("mlp-tiny", 6, 2, normalisation="minmax")


def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    gen = WeightGenerator("dit-tiny", input_dim=30, cond_dim=5, normalisation="standardise", schedule="cosine")
    gen.fit_normalisation(torch.randn(20, 30) * 0.1)
    for p in gen.parameters():
        torch.nn.init.normal_(p, std=0.05)
    save_generator(tmp_path, gen)
    loaded = load_generator(tmp_path)
    c = torch.randn(3, 5)
    assert loaded.config()["schedule"]["name"] == "cosine"
    torch.testing.assert_close(loaded.sample(c, steps=4, seed=0), gen.sample(c, steps=4, seed=0))
    with pytest.raises(ArtifactError, match="no generator"):
        load_generator(tmp_path / "missing")


def test_training_fits_conditioned_vectors():
    """A few hundred steps on 4 (condition, vector) pairs: samples land near their own vector."""
    torch.manual_seed(0)
    targets = torch.randn(4, 24)
    cond = torch.eye(4)
    gen = WeightGenerator({"kind": "dit", "hidden": 32, "depth": 2, "num_heads": 4, "patch_size": 4},
                          input_dim=24, cond_dim=4, normalisation="global")
    gen.fit_normalisation(targets)
    before = (gen.sample(cond, steps=20, seed=123) - targets).norm(dim=1).mean()
    opt = torch.optim.AdamW(gen.parameters(), lr=3e-3)
    for _ in range(500):
        loss = gen.training_loss(gen.normalise(targets), cond)
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = gen.sample(cond, steps=20, seed=123)
    after = (out - targets).norm(dim=1)
    assert after.mean() < 0.4 * before
    # each sample is closest to its own target, not to another edit's
    assert torch.equal(torch.cdist(out, targets).argmin(1), torch.arange(4))


def test_value_scale_is_saved_with_the_generator_and_old_generators_load_at_one(tmp_path):
    gen = WeightGenerator("mlp-tiny", input_dim=6, cond_dim=2, value_scale=1.5)
    save_generator(tmp_path / "new", gen)
    assert load_generator(tmp_path / "new").value_scale == 1.5
    cfg = json.loads((tmp_path / "new" / "generator.json").read_text())
    del cfg["schedule"]["default_value_scale"]  # a generator saved before the option
    (tmp_path / "new" / "generator.json").write_text(json.dumps(cfg))
    assert load_generator(tmp_path / "new").value_scale == 1.0


def test_value_scale_rule_takes_the_best_harmonic_mean_and_the_smallest_on_a_tie():
    from megedit.diffusion.generator import choose_value_scale

    table = [{"value_scale": 1.0, "harmonic_mean": 0.80}, {"value_scale": 2.0, "harmonic_mean": 0.90},
             {"value_scale": 1.5, "harmonic_mean": 0.90}, {"value_scale": 2.5, "harmonic_mean": 0.85}]
    assert choose_value_scale(table) == 1.5


def test_value_emphasis_weighs_the_value_and_keeps_the_loss_scale():
    from megedit.components.neuron import value_emphasis
    from megedit.registry import load_model_spec

    spec = load_model_spec("smollm2")
    w = value_emphasis(spec, 4.0)
    d = spec.hidden_size
    assert w.shape == (spec.neuron_dim,) and torch.isclose(w.mean(), torch.tensor(1.0))
    assert torch.allclose(w[-d:] / w[0], torch.full((d,), 4.0)) and torch.equal(value_emphasis(spec, 1.0),
                                                                                torch.ones(spec.neuron_dim))


def test_weighted_training_loss_is_the_plain_loss_under_uniform_weights():
    from megedit.diffusion.generator import WeightGenerator

    torch.manual_seed(0)
    gen = WeightGenerator("dit-tiny", 200, 8)
    x0, cond = torch.randn(4, 200), torch.randn(4, 8)
    plain = gen.training_loss(x0, cond, generator=torch.Generator().manual_seed(1))
    uniform = gen.training_loss(x0, cond, generator=torch.Generator().manual_seed(1), element_weights=torch.ones(200))
    assert torch.allclose(plain, uniform)
    heavy = torch.ones(200)
    heavy[100:] = 3.0
    weighted = gen.training_loss(x0, cond, generator=torch.Generator().manual_seed(1), element_weights=heavy / heavy.mean())
    assert not torch.allclose(plain, weighted)


def test_training_states_of_a_folder_and_a_checkpoint(tmp_path):
    """``init_from`` reads a folder's resume point first, else its saved EMA generator, else refuses."""
    from megedit.artifacts import ArtifactError
    from megedit.diffusion.artifact import training_states
    from megedit.resume import last_checkpoint

    gen = WeightGenerator("mlp-tiny", input_dim=16, cond_dim=8)
    save_generator(tmp_path, gen)
    raw, ema, source = training_states(tmp_path)
    assert source.name == "generator.safetensors" and raw is ema and set(raw) == set(gen.state_dict())
    ckpt = last_checkpoint(tmp_path)
    ckpt.parent.mkdir()
    state = {f"generator.{k}": v for k, v in gen.state_dict().items()}
    state |= {f"ema.{k}": v + 1 for k, v in gen.state_dict().items()}
    torch.save({"state_dict": state}, ckpt)
    raw, ema, source = training_states(tmp_path)
    assert source == ckpt and all(torch.equal(ema[k], raw[k] + 1) for k in raw)
    with pytest.raises(ArtifactError, match="neither checkpoints/last.ckpt nor generator.safetensors"):
        training_states(tmp_path / "empty")


def test_selection_of_validated_favoured_and_reported_edits():
    from megedit.diffusion.diffusion_datamodule import favoured_rows, validation_indices
    from megedit.diffusion.diffusion_module import report_indices

    a = validation_indices(10, 4, seed=0)
    assert a == sorted(a) and len(set(a)) == 4 and a == validation_indices(10, 4, seed=0)
    assert validation_indices(3, 8, seed=0) == [0, 1, 2] and validation_indices(5, 0, seed=0) == []
    keep = torch.tensor([True, False, True, True, False, True])  # training rows are edits 0, 2, 3, 5
    assert favoured_rows(keep, None) is None
    assert favoured_rows(keep, 3).tolist() == [2, 3]  # edits 3 and 5 sit at training rows 2 and 3
    assert report_indices(10, 0, None) == list(range(10))
    assert report_indices(10, 8, None) == [8, 9] and report_indices(10, 2, 3) == [2, 3, 4]
    assert report_indices(10, 12, 5) == []
