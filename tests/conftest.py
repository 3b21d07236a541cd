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


QUIET = ["--trainer.enable_progress_bar", "false"]
PIPELINE_EDITS = 12


@pytest.fixture(scope="session")
def served_run(tmp_path_factory, data_dir) -> Path:
    """A real servable run (prepare, encoder, familiarity, collect, diffusion) on the packaged SmolLM2 + MiniLM
    with 12 ZsRE edits, built once per session (a few minutes): what EditedLM and megedit serve load.

    ZsRE questions go through the model's question template, so a paraphrase ends like its original
    question; that is where a collected neuron transfers to paraphrases at all on a 135M model."""
    from megedit.cli import stage_main

    run = tmp_path_factory.mktemp("pipeline") / f"smollm2-zsre-{PIPELINE_EDITS}"
    stage_main("prepare", ["--data.dataset", "zsre", "--data.n_edits", str(PIPELINE_EDITS),
                           "--data.n_pseudo_irrelevant", "64", "--data.max_pseudo_edits", "256",
                           "--data.data_dir", str(data_dir), "--model.out_dir", str(run / "prepare"), *QUIET])
    p = ["--data.prepare_dir", str(run / "prepare")]
    tb = ["--trainer.logger.init_args.save_dir", str(run / "tb")]
    stage_main("encoder", [*p, "--model.out_dir", str(run / "encoder"), "--data.max_train_groups", "128",
                           "--data.batch_size", "32", "--data.min_val_per_source", "32", "--data.max_val_per_source",
                           "32", "--trainer.max_epochs", "1", *tb, *QUIET])
    stage_main("familiarity", [*p, "--data.encoder_dir", str(run / "encoder"), "--model.out_dir",
                               str(run / "familiarity"), *tb, *QUIET])
    stage_main("collect", [*p, "--model.out_dir", str(run / "collect"), "--model.transfer_n", "8",
                           "--model.relation_views", "2", *QUIET])
    stage_main("diffusion", [*p, "--data.encoder_dir", str(run / "encoder"), "--data.collect_dir", str(run / "collect"),
                             "--model.out_dir", str(run / "diffusion"), "--model.preset", "dit-cpu",
                             "--data.batch_size", str(PIPELINE_EDITS), "--trainer.max_epochs", "1500",
                             "--trainer.check_val_every_n_epoch", "1500", "--data.val_edits", str(PIPELINE_EDITS),
                             "--model.report_steps", "20", "--data.paraphrase_shifts", "64", *tb, *QUIET])
    return run


@pytest.fixture(scope="session")
def pipeline_run(served_run) -> Path:
    """``served_run`` evaluated: MeG and every baseline scored on its 12 edits (evaluate/ inside the run)."""
    from megedit.cli import stage_main

    stage_main("evaluate", ["--data.run_dir", str(served_run), "--model.out_dir", str(served_run / "evaluate"),
                            "--model.steps", "20", "--model.variants",
                            "[meg, meg_no_router, meg_retrieval, ft, memit, alphaedit]",
                            "--model.peer_stats_texts", "16",
                            "--trainer.logger.init_args.save_dir", str(served_run / "tb"), *QUIET])
    return served_run


def copy_run(run: Path, dest: Path) -> Path:
    """A private copy of a run folder, for a test that changes it (links inside it stay links)."""
    import shutil

    shutil.copytree(run, dest, symlinks=True)
    return dest
