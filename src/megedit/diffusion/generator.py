"""The weight generator: a denoiser (DiT or MLP) + a v-prediction noise schedule + the weight
normalisation (its files: ``megedit.diffusion.artifact``).

The schedules and samplers are diffusers' ``DDPMScheduler`` (training noise, respaced ancestral
sampling) and ``DDIMScheduler`` (deterministic DDIM, eta = 0), both with
``prediction_type="v_prediction"``: the network predicts v = sqrt(ᾱ_t)·ε − sqrt(1−ᾱ_t)·x₀ (paper eq. 7–8).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megedit.components.dit import DenoiserPreset, build_denoiser, resolve_preset
from megedit.defaults import DEFAULT_STEPS

FORMAT = "megedit-weight-generator/1"  # of generator.json and generator.safetensors (megedit.diffusion.artifact)
SAMPLERS = ("ddim", "ancestral")
SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
NORMALISATIONS = ("scale", "standardise", "global")


def make_training_scheduler(schedule: str = "linear", num_train_timesteps: int = 1000):
    from diffusers import DDPMScheduler

    if schedule not in SCHEDULES:
        raise ValueError(f"noise schedule must be one of {list(SCHEDULES)}, got {schedule!r}")
    # linear: DDPM's beta 1e-4 .. 0.02; cosine: Nichol & Dhariwal (diffusers 'squaredcos_cap_v2').
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=SCHEDULES[schedule],
                         beta_start=1e-4, beta_end=0.02, prediction_type="v_prediction", clip_sample=False,
                         variance_type="fixed_small")


def make_sampler(sampler: str, train_scheduler, steps: int, timestep_spacing: str = "trailing"):
    """A fresh (stateful) diffusers scheduler set to ``steps`` respaced steps."""
    from diffusers import DDIMScheduler, DDPMScheduler

    n_train = train_scheduler.config.num_train_timesteps
    if not 1 <= steps <= n_train:
        raise ValueError(f"sampling steps must be in 1..{n_train}, got {steps}")
    # Keyword overrides: diffusers ignores edits to the config dict itself.
    cfg = train_scheduler.config
    if sampler == "ddim":
        sched = DDIMScheduler.from_config(cfg, timestep_spacing=timestep_spacing, set_alpha_to_one=True,
                                          clip_sample=False)
    elif sampler == "ancestral":
        sched = DDPMScheduler.from_config(cfg, timestep_spacing=timestep_spacing)
    else:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    sched.set_timesteps(steps)
    return sched


class WeightGenerator(nn.Module):
    """``sample(cond [B, H]) -> weights [B, D]``: conditioned generation of one neuron's weights."""

    def __init__(self, preset: str | dict | DenoiserPreset, input_dim: int, cond_dim: int,
                 schedule: str = "linear", num_train_timesteps: int = 1000, normalisation: str = "scale",
                 scale: float = 100.0, timestep_spacing: str = "trailing", prefer_timm: bool = True,
                 noise_scale: float = 1.0, value_scale: float = 1.0):
        super().__init__()
        if not 0.0 <= noise_scale <= 1.0:
            raise ValueError(f"noise_scale must be in [0, 1], got {noise_scale}")
        if normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {NORMALISATIONS}, got {normalisation!r}")
        self.preset = resolve_preset(preset)
        self.input_dim, self.cond_dim = int(input_dim), int(cond_dim)
        self.schedule, self.num_train_timesteps = schedule, int(num_train_timesteps)
        self.normalisation, self.scale, self.timestep_spacing = normalisation, float(scale), timestep_spacing
        self.noise_scale = float(noise_scale)  # the default sampling temperature (see ``sample``)
        # The factor a generated neuron's value vector is scaled by before use (``EditedLM``): chosen by the
        # diffusion stage on pseudo edits, since a mode-seeking sample of an under-fit generator is too weak.
        self.value_scale = float(value_scale)
        self.net = build_denoiser(self.preset, self.input_dim, self.cond_dim, prefer_timm)
        self.scheduler = make_training_scheduler(schedule, num_train_timesteps)
        # normalised = (w - shift) / div; saved with the weights so samples come back in weight units.
        self.register_buffer("norm_shift", torch.zeros(self.input_dim))
        self.register_buffer("norm_div", torch.full((self.input_dim,), 1.0 / self.scale))

    # ------------------------------------------------------------------ normalisation
    @torch.no_grad()
    def fit_normalisation(self, weights: torch.Tensor, eps: float = 1e-8) -> None:
        """Set the statistics from the training weights ``[N, D]`` (only ``standardise``/``global`` use them)."""
        if weights.ndim != 2 or weights.shape[1] != self.input_dim:
            raise ValueError(f"expected weights [N, {self.input_dim}], got {tuple(weights.shape)}")
        w = weights.double()
        if self.normalisation == "scale":
            shift, div = torch.zeros(self.input_dim), torch.full((self.input_dim,), 1.0 / self.scale)
        elif self.normalisation == "standardise":
            shift, div = w.mean(0), w.std(0, unbiased=False).clamp_min(eps)
        else:
            shift, div = w.mean().expand(self.input_dim), w.std(unbiased=False).clamp_min(eps).expand(self.input_dim)
        self.norm_shift.copy_(shift.float())
        self.norm_div.copy_(div.float())

    def normalise(self, weights: torch.Tensor) -> torch.Tensor:
        return (weights - self.norm_shift) / self.norm_div

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.norm_div + self.norm_shift

    # ------------------------------------------------------------------ training
    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.net(x_t, t, cond)

    def training_loss(self, x0: torch.Tensor, cond: torch.Tensor, denoiser: nn.Module | None = None,
                      generator: torch.Generator | None = None,
                      element_weights: torch.Tensor | None = None) -> torch.Tensor:
        """v-prediction MSE on *normalised* weights ``x0`` at uniformly drawn steps.

        ``denoiser`` lets the caller pass a DDP-wrapped ``self`` so gradients are synchronised.
        ``element_weights`` ``[D]`` (mean 1) weighs each element's squared error, e.g. the value over the key.
        """
        b = x0.shape[0]
        t = torch.randint(0, self.num_train_timesteps, (b,), device=x0.device, generator=generator)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x_t = self.scheduler.add_noise(x0, noise, t)
        target = self.scheduler.get_velocity(x0, noise, t)
        pred = (denoiser or self)(x_t, t, cond)
        if element_weights is None:
            return F.mse_loss(pred.float(), target.float())
        return ((pred.float() - target.float()).pow(2) * element_weights).mean()

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sample(self, cond: torch.Tensor, steps: int = DEFAULT_STEPS, sampler: str = "ddim", seed: int | None = None,
               batch_size: int | None = None, normalised: bool = False,
               noise_scale: float | None = None) -> torch.Tensor:
        """De-normalised neuron weights ``[B, D]`` for conditions ``[B, H]`` (float32, on ``cond``'s device).

        ``ddim`` is deterministic given the initial noise; ``ancestral`` draws fresh noise each step.
        ``seed`` fixes the noise (per call, independent of the global RNG).
        ``noise_scale`` (None: the generator's default) multiplies the initial noise x_T: 1 draws a
        standard sample; 0 starts DDIM at the origin, a deterministic, mode-seeking path. An edit
        wants the one neuron that was collected, not diversity: while the generator has not fully
        memorised its neurons, its conditional spread is error, and a lower temperature removes it.
        With ``ancestral`` only x_T is scaled; each step still adds its full noise.
        """
        noise_scale = self.noise_scale if noise_scale is None else float(noise_scale)
        if not 0.0 <= noise_scale <= 1.0:
            raise ValueError(f"noise_scale must be in [0, 1], got {noise_scale}")
        if cond.ndim != 2 or cond.shape[1] != self.cond_dim:
            raise ValueError(f"expected conditions [B, {self.cond_dim}], got {tuple(cond.shape)}")
        device = self.norm_shift.device
        cond = cond.to(device=device, dtype=self.norm_shift.dtype)
        gen = torch.Generator(device=device)
        if seed is None:
            gen.seed()
        else:
            gen.manual_seed(int(seed))
        was_training = self.training
        self.eval()
        out = []
        chunk = batch_size or max(1, cond.shape[0])
        for start in range(0, cond.shape[0], chunk):
            c = cond[start:start + chunk]
            sched = make_sampler(sampler, self.scheduler, steps, self.timestep_spacing)
            x = torch.randn((c.shape[0], self.input_dim), device=device, generator=gen) * noise_scale
            for t in sched.timesteps:
                v = self.net(x, t.to(device).expand(c.shape[0]), c).float()
                x = sched.step(v, t, x, generator=gen).prev_sample
            out.append(x)
        self.train(was_training)
        x = torch.cat(out) if out else torch.empty(0, self.input_dim, device=device)
        return x if normalised else self.denormalise(x)

    # ------------------------------------------------------------------ persistence
    def config(self) -> dict:
        return {
            "format": FORMAT,
            "preset": self.preset.to_dict(),
            "input_dim": self.input_dim,
            "cond_dim": self.cond_dim,
            "schedule": {"name": self.schedule, "num_train_timesteps": self.num_train_timesteps,
                         "prediction_type": "v_prediction", "timestep_spacing": self.timestep_spacing,
                         "default_sampler": "ddim", "default_steps": DEFAULT_STEPS, "default_noise_scale": self.noise_scale,
                         "default_value_scale": self.value_scale},
            "normalisation": {"mode": self.normalisation, "scale": self.scale,
                              "shift": self.norm_shift.tolist(), "div": self.norm_div.tolist()},
        }

    @classmethod
    def from_config(cls, cfg: dict, prefer_timm: bool = True) -> "WeightGenerator":
        sched, norm = cfg["schedule"], cfg["normalisation"]
        return cls(cfg["preset"], cfg["input_dim"], cfg["cond_dim"], schedule=sched["name"],
                   num_train_timesteps=sched["num_train_timesteps"], normalisation=norm["mode"],
                   scale=norm["scale"], timestep_spacing=sched.get("timestep_spacing", "trailing"),
                   prefer_timm=prefer_timm, noise_scale=sched.get("default_noise_scale", 1.0),
                   value_scale=sched.get("default_value_scale", 1.0))


def score_value_scales(prompts, paraphrases, neuron, spec, generated: torch.Tensor, scales: list[float]) -> list[dict]:
    """Greedy exact match of ``generated`` neurons at each value scale on two ``CachedQueries``: the edits' own
    prompts (the first rows of ``generated``) and paraphrases (the rest). One row per scale with both rates and
    their harmonic mean."""
    from megedit.components.neuron import scale_value

    table = []
    for factor in sorted(scales):
        scaled = scale_value(generated, spec, factor)
        rel = float(prompts.score(neuron, scaled[:prompts.n])["exact"].float().mean())
        gen = float(paraphrases.score(neuron, scaled[prompts.n:])["exact"].float().mean())
        table.append({"value_scale": factor, "prompt_ag": rel, "paraphrase_ag": gen,
                      "harmonic_mean": 2 * rel * gen / (rel + gen) if rel + gen > 0 else 0.0})
    return table


def choose_value_scale(table: list[dict]) -> float:
    """The scale with the best harmonic mean of prompt and paraphrase exact match; the smallest on a tie."""
    return max(table, key=lambda r: (r["harmonic_mean"], -r["value_scale"]))["value_scale"]
