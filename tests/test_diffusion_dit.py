"""The denoisers: timm-compatible blocks, adaLN-Zero initialisation, patching, presets."""

from __future__ import annotations

import pytest
import torch

from megedit.components import dit
from megedit.components.dit import (PRESETS, DiT1D, LocalAttention, LocalMlp, MLPDenoiser, build_denoiser,
                                    resolve_preset)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_local_blocks_use_timm_parameter_names():
    attn = LocalAttention(32, num_heads=4, qkv_bias=True)
    mlp = LocalMlp(in_features=32, hidden_features=64)
    assert {k: tuple(v.shape) for k, v in attn.state_dict().items()} == {
        "qkv.weight": (96, 32), "qkv.bias": (96,), "proj.weight": (32, 32), "proj.bias": (32,)}
    assert {k: tuple(v.shape) for k, v in mlp.state_dict().items()} == {
        "fc1.weight": (64, 32), "fc1.bias": (64,), "fc2.weight": (32, 64), "fc2.bias": (32,)}


def test_local_attention_matches_explicit_softmax_attention():
    torch.manual_seed(0)
    attn = LocalAttention(16, num_heads=2, qkv_bias=True).eval()
    x = torch.randn(3, 5, 16)
    q, k, v = attn.qkv(x).reshape(3, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / 8 ** 0.5, dim=-1)
    ref = attn.proj((weights @ v).transpose(1, 2).reshape(3, 5, 16))
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not dit.USING_TIMM, reason="timm does not import here (no matching torchvision)")
def test_timm_and_local_checkpoints_are_interchangeable():
    torch.manual_seed(0)
    a = DiT1D(50, 8, hidden=32, depth=2, num_heads=4, patch_size=10, prefer_timm=True)
    b = DiT1D(50, 8, hidden=32, depth=2, num_heads=4, patch_size=10, prefer_timm=False)
    b.load_state_dict(a.state_dict())
    for p in a.parameters():
        torch.nn.init.normal_(p, std=0.1)
    b.load_state_dict(a.state_dict())
    x, t, c = torch.randn(2, 50), torch.tensor([3, 700]), torch.randn(2, 8)
    torch.testing.assert_close(a(x, t, c), b(x, t, c), atol=1e-5, rtol=1e-5)


def test_dit_is_zero_at_init_and_blocks_are_identity():
    torch.manual_seed(0)
    net = DiT1D(input_dim=230, cond_dim=12, hidden=32, depth=3, num_heads=4, patch_size=100, prefer_timm=False)
    assert net.num_patches == 3 and net.padded_dim == 300
    x, t, c = torch.randn(4, 230), torch.randint(0, 1000, (4,)), torch.randn(4, 12)
    assert torch.count_nonzero(net(x, t, c)) == 0
    h, cc = torch.randn(4, 3, 32), torch.randn(4, 32)
    for block in net.blocks:
        torch.testing.assert_close(block(h, cc), h)


def test_dit_learns_and_uses_condition_time_and_padding():
    torch.manual_seed(0)
    net = DiT1D(input_dim=23, cond_dim=6, hidden=32, depth=2, num_heads=4, patch_size=5, prefer_timm=False)
    target = torch.randn(8, 23)
    x, t, c = torch.randn(8, 23), torch.randint(0, 1000, (8,)), torch.randn(8, 6)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss = torch.nn.functional.mse_loss(net(x, t, c), target)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss) < 0.2 * first
    out = net(x, t, c)
    assert out.shape == (8, 23)
    assert not torch.allclose(out, net(x, t, torch.randn(8, 6)))  # the condition matters
    assert not torch.allclose(out, net(x, (t + 500) % 1000, c))  # the timestep matters


def test_mlp_denoiser_same_interface_and_zero_init():
    net = MLPDenoiser(input_dim=40, cond_dim=6, hidden=32, depth=2)
    out = net(torch.randn(3, 40), torch.tensor([0, 10, 999]), torch.randn(3, 6))
    assert out.shape == (3, 40) and torch.count_nonzero(out) == 0


def test_presets_and_overrides():
    assert (PRESETS["dit-b"].hidden, PRESETS["dit-b"].depth, PRESETS["dit-b"].num_heads,
            PRESETS["dit-b"].patch_size) == (768, 12, 12, 100)
    p = resolve_preset("dit-cpu", patch_size=50, depth=None)
    assert p.patch_size == 50 and p.depth == PRESETS["dit-cpu"].depth
    assert isinstance(build_denoiser(resolve_preset("mlp-tiny"), 20, 4), MLPDenoiser)
    with pytest.raises(ValueError, match="unknown generator preset"):
        resolve_preset("dit-xxl")
    with pytest.raises(ValueError, match="kind"):
        resolve_preset({"kind": "unet", "hidden": 4, "depth": 1})
    with pytest.raises(ValueError, match="divisible"):
        DiT1D(10, 4, hidden=30, depth=1, num_heads=4, patch_size=5)
