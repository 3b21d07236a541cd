"""Denoisers over one neuron's weight vector: a 1-D DiT (adaLN-Zero) and an MLP ablation.

Both map ``(x_t [B, D], t [B], cond [B, C]) -> v̂ [B, D]`` so the diffusion code does not care
which one it trains. The DiT cuts the (padded) vector into patches of ``patch_size`` values,
one token each, and modulates every block with (timestep embedding + projected condition).

The attention and MLP blocks come from timm when it imports; otherwise local copies with the
same parameter names (``qkv``, ``proj``, ``fc1``, ``fc2``) and the same maths are used, so a
checkpoint trained with one loads into the other.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


class LocalAttention(nn.Module):
    """Multi-head self-attention laid out like ``timm.models.vision_transformer.Attention``."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, **_):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class LocalMlp(nn.Module):
    """Two-layer MLP laid out like ``timm.layers.Mlp`` (fc1 -> act -> fc2)."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 act_layer=nn.GELU, drop: float = 0.0, **_):
        super().__init__()
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_features, out_features or in_features)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


def _timm_blocks():
    """timm's (Attention, Mlp) or None. timm pulls in torchvision, which may not match torch, so any
    import failure (not only ImportError) means: use the local blocks."""
    try:
        from timm.models.vision_transformer import Attention, Mlp
    except Exception:  # noqa: BLE001 - a broken torchvision raises RuntimeError/AttributeError too
        return None
    return Attention, Mlp


_TIMM = _timm_blocks()
USING_TIMM = _TIMM is not None


def attention_mlp_classes(prefer_timm: bool = True):
    return _TIMM if (prefer_timm and _TIMM is not None) else (LocalAttention, LocalMlp)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the (integer) diffusion step, then a 2-layer MLP."""

    def __init__(self, hidden: int, freq_dim: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.freq_dim, self.max_period = freq_dim, max_period
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class ConditionEmbedder(nn.Module):
    """Projects the encoder embedding of the query into the timestep-embedding space."""

    def __init__(self, cond_dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(cond_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, cond: torch.Tensor) -> torch.Tensor:
        return self.mlp(cond)


class DiTBlock(nn.Module):
    """Pre-norm transformer block whose norms are modulated (shift, scale, gate) by the conditioning;
    the modulation starts at zero, so each block starts as the identity (adaLN-Zero)."""

    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float = 4.0, prefer_timm: bool = True):
        super().__init__()
        attn_cls, mlp_cls = attention_mlp_classes(prefer_timm)
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = attn_cls(hidden, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = mlp_cls(in_features=hidden, hidden_features=int(hidden * mlp_ratio),
                           act_layer=lambda: nn.GELU(approximate="tanh"), drop=0.0)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_a.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_m, scale_m))


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch_size: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch_size)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def sincos_1d(num_positions: int, dim: int) -> torch.Tensor:
    pos = torch.arange(num_positions, dtype=torch.float64)[:, None]
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    out = pos * omega[None]
    emb = torch.cat([torch.sin(out), torch.cos(out)], dim=1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros(num_positions, 1, dtype=torch.float64)], dim=1)
    return emb.float()


class DiT1D(nn.Module):
    def __init__(self, input_dim: int, cond_dim: int, hidden: int = 768, depth: int = 12, num_heads: int = 12,
                 patch_size: int = 100, mlp_ratio: float = 4.0, prefer_timm: bool = True):
        super().__init__()
        if input_dim < 1 or cond_dim < 1 or patch_size < 1:
            raise ValueError(f"input_dim, cond_dim and patch_size must be positive "
                             f"(got {input_dim}, {cond_dim}, {patch_size})")
        self.input_dim, self.patch_size = input_dim, patch_size
        self.num_patches = math.ceil(input_dim / patch_size)
        self.padded_dim = self.num_patches * patch_size
        self.x_embedder = nn.Linear(patch_size, hidden)
        # Learnable, but initialised with fixed 1-D sin-cos so that patch order is known from step 0.
        self.pos_embed = nn.Parameter(sincos_1d(self.num_patches, hidden)[None])
        self.t_embedder = TimestepEmbedder(hidden)
        self.c_embedder = ConditionEmbedder(cond_dim, hidden)
        self.blocks = nn.ModuleList([DiTBlock(hidden, num_heads, mlp_ratio, prefer_timm) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden, patch_size)
        self._init_weights()

    def _init_weights(self) -> None:
        def xavier(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(xavier)
        # Timestep MLP as in DiT; the condition MLP keeps its Xavier init: with std 0.02 the (unit-norm)
        # encoder embedding starts ~50x weaker than the timestep signal and memorisation starts late.
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block is the identity and the output is 0 at initialisation.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        x = F.pad(x, (0, self.padded_dim - self.input_dim)).view(b, self.num_patches, self.patch_size)
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.c_embedder(cond)
        for block in self.blocks:
            h = block(h, c)
        return self.final_layer(h, c).reshape(b, self.padded_dim)[:, : self.input_dim]


class MLPBlock(nn.Module):
    """Residual block modulated like a DiT block (shift/scale/gate from the conditioning)."""

    def __init__(self, hidden: int, mlp_ratio: float):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = LocalMlp(hidden, int(hidden * mlp_ratio), act_layer=nn.SiLU)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 3 * hidden))

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(c).chunk(3, dim=1)
        return h + gate * self.mlp(self.norm(h) * (1 + scale) + shift)


class MLPDenoiser(nn.Module):
    """The paper's Table 7 ablation: the whole vector is one token, no attention over patches."""

    def __init__(self, input_dim: int, cond_dim: int, hidden: int = 1024, depth: int = 4, mlp_ratio: float = 2.0):
        super().__init__()
        self.input_dim = input_dim
        self.x_embedder = nn.Linear(input_dim, hidden)
        self.t_embedder = TimestepEmbedder(hidden)
        self.c_embedder = ConditionEmbedder(cond_dim, hidden)
        self.blocks = nn.ModuleList([MLPBlock(hidden, mlp_ratio) for _ in range(depth)])
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.out = nn.Linear(hidden, input_dim)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.x_embedder(x)
        c = self.t_embedder(t) + self.c_embedder(cond)
        for block in self.blocks:
            h = block(h, c)
        return self.out(self.norm_final(h))


@dataclass(frozen=True)
class DenoiserPreset:
    kind: str  # "dit" | "mlp"
    hidden: int
    depth: int
    num_heads: int = 0  # DiT only
    patch_size: int = 100  # DiT only
    mlp_ratio: float = 4.0

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS: dict[str, DenoiserPreset] = {
    "dit-b": DenoiserPreset("dit", hidden=768, depth=12, num_heads=12),  # the paper's DiT-B
    "dit-s": DenoiserPreset("dit", hidden=384, depth=12, num_heads=6),
    "dit-cpu": DenoiserPreset("dit", hidden=128, depth=4, num_heads=4),  # the CPU default (~1 M parameters)
    "dit-tiny": DenoiserPreset("dit", hidden=64, depth=2, num_heads=4),  # unit tests
    "mlp": DenoiserPreset("mlp", hidden=1024, depth=4, mlp_ratio=2.0),  # Table 7 ablation
    "mlp-tiny": DenoiserPreset("mlp", hidden=64, depth=2, mlp_ratio=2.0),
}


def resolve_preset(preset: str | dict | DenoiserPreset, **overrides) -> DenoiserPreset:
    if isinstance(preset, DenoiserPreset):
        base = preset.to_dict()
    elif isinstance(preset, dict):
        base = dict(preset)
    elif preset in PRESETS:
        base = PRESETS[preset].to_dict()
    else:
        raise ValueError(f"unknown generator preset {preset!r}; known: {', '.join(PRESETS)}")
    base.update({k: v for k, v in overrides.items() if v is not None})
    if base.get("kind") not in ("dit", "mlp"):
        raise ValueError(f"generator kind must be 'dit' or 'mlp', got {base.get('kind')!r}")
    return DenoiserPreset(**base)


def build_denoiser(preset: DenoiserPreset, input_dim: int, cond_dim: int, prefer_timm: bool = True) -> nn.Module:
    if preset.kind == "dit":
        return DiT1D(input_dim, cond_dim, hidden=preset.hidden, depth=preset.depth, num_heads=preset.num_heads,
                     patch_size=preset.patch_size, mlp_ratio=preset.mlp_ratio, prefer_timm=prefer_timm)
    return MLPDenoiser(input_dim, cond_dim, hidden=preset.hidden, depth=preset.depth, mlp_ratio=preset.mlp_ratio)
