"""Shared fixtures: tiny random models for unit tests, the real packaged models for integration tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from megedit.paths import REPO_ROOT
from megedit.registry import spec_from_dict

SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    path = Path(os.environ.get("MEGEDIT_DATA_DIR", SHARED_DATA))
    if not path.is_dir():
        pytest.fail(f"benchmark data not found at {path}; set MEGEDIT_DATA_DIR (see README, 'Data')")
    return path


def _tiny_spec(kind: str, hidden: int, layers: int, layers_path: str, activation: str) -> object:
    return spec_from_dict({
        "name": f"tiny-{kind}", "source": "random", "hidden_size": hidden, "num_layers": layers, "edit_layer": 1,
        "mlp": {"kind": kind, "layers": layers_path, "module": "mlp", "activation": activation},
        "question_template": "Q: {question}\nA:", "encoder": "random",
    })


@pytest.fixture
def one_thread():
    """Tiny matrices: a second OpenMP thread only adds contention on shared CI cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_llama():
    """(model, spec): a 3-layer random Llama (gated MLP)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    return model, _tiny_spec("gated", 32, 3, "model.layers", "silu")


@pytest.fixture
def tiny_gpt2():
    """(model, spec): a 3-layer random GPT-2 (ungated MLP with Conv1D projections)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=3, n_head=4, n_positions=64)
    model = GPT2LMHeadModel(cfg).eval().requires_grad_(False)
    return model, _tiny_spec("ungated", 32, 3, "transformer.h", "gelu_new")


@pytest.fixture(scope="session")
def prepared_dir(tmp_path_factory, data_dir) -> Path:
    """The real prepare stage on the packaged SmolLM2 with 8 CounterFact edits (shared by integration tests)."""
    from megedit.cli import stage_main

    out = tmp_path_factory.mktemp("run") / "prepare"
    stage_main("prepare", ["--data.n_edits", "8", "--data.n_pseudo_irrelevant", "64", "--data.max_pseudo_edits",
                           "256", "--data.data_dir", str(data_dir), "--model.out_dir", str(out),
                           "--trainer.enable_progress_bar", "false"])
    return out
