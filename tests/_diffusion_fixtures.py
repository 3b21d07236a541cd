"""Synthetic prepare / encoder / collect artifacts for the diffusion-stage unit tests.

The prepare artifact is hand-written (a few edits of a tiny random model spec), the encoder a
tiny random BERT with the packaged MiniLM tokenizer, and the neurons are random vectors with a
per-edit structure the generator has to learn. Every artifact carries a real manifest, so the
datamodule's lineage and upstream checks run as on real inputs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from megedit.artifacts import atomic_write_json, atomic_write_jsonl, write_manifest
from megedit.data.records import EditRecord
from megedit.prepare.artifact import FILES

TINY_SPEC = {"name": "tiny-gated", "source": "random", "hidden_size": 8, "num_layers": 2, "edit_layer": 1,
             "mlp": {"kind": "gated", "layers": "model.layers", "module": "mlp", "activation": "silu",
                     "projections": {}},
             "question_template": "Q: {question}\nA:", "encoder": "random", "dtype": "float32", "neuron_dim": 16}
SUBJECTS = ["Paris", "Berlin", "Tokyo", "Lima", "Oslo", "Rome", "Cairo", "Delhi", "Quito", "Hanoi", "Dakar", "Seoul"]


def pseudo_mayor_edits(n: int) -> list[dict]:
    """Pseudo edits of the edits' relation ("The mayor of {} is"): each lends one rephrasing that is an
    edits' evaluation paraphrase behind a context (a leak) and one that is not."""
    out = []
    for j in range(n):
        subject = f"Town {j}"
        rec = EditRecord(id=f"pseudo:{j}", subject=subject, prompt=f"The mayor of {subject} is",
                         prompt_kind="completion", target_new=f"Mayor{j}", target_true="Nobody",
                         paraphrases=[f"It rained all day. {subject}'s mayor is",
                                      f"Elections were held in May. The office of mayor of {subject} is held by"])
        out.append(rec.to_dict())
    return out


def make_prepare(out: Path, n_edits: int, n_irrelevant: int = 4, n_pseudo: int = 0) -> Path:
    edits = []
    for i in range(n_edits):
        subject = f"{SUBJECTS[i % len(SUBJECTS)]} {i}"
        rec = EditRecord(id=f"syn:{i}", subject=subject, prompt=f"The mayor of {subject} is", prompt_kind="completion",
                         target_new=f"Person{i}", target_true="Someone", paraphrases=[f"{subject}'s mayor is"])
        edits.append({**rec.to_dict(), "pre_edit": {"prompt": {"tokens": [], "text": ""}, "paraphrases": [None],
                                                    "locality": []}, "base_correct": False})
    irrelevant = [{"id": f"irr:{j}", "subject": f"River {j}", "prompt": f"River {j} flows into the",
                   "prompt_kind": "completion", "source": "syn"} for j in range(n_irrelevant)]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_jsonl(out / FILES["edits"], edits)
    atomic_write_jsonl(out / FILES["pseudo_edits"], pseudo_mayor_edits(n_pseudo))
    atomic_write_jsonl(out / FILES["pseudo_pairs"], [])
    atomic_write_jsonl(out / FILES["pseudo_irrelevant"], irrelevant)
    atomic_write_json(out / FILES["report"], {})
    lineage = {"model": TINY_SPEC["name"], "dataset": "synthetic", "n_edits": n_edits, "seed": 0}
    write_manifest(out, "prepare", lineage, config={}, outputs=list(FILES.values()),
                   extra={"model_spec": TINY_SPEC})
    return out


def make_encoder(out: Path, prepare_dir: Path, lineage: dict) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertModel

    from megedit.components.text_encoder import TextEncoder
    from megedit.loading import resolve_source
    from megedit.registry import load_model_spec

    tokenizer = AutoTokenizer.from_pretrained(resolve_source(load_model_spec("smollm2").encoder))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)
    TextEncoder(BertModel(cfg).eval(), tokenizer).save(out / "encoder")
    write_manifest(out, "encoder", lineage, config={}, outputs=[], upstream={"prepare": prepare_dir})
    return out


def make_collect(out: Path, prepare_dir: Path, lineage: dict, n: int, dim: int = 16, seed: int = 0) -> Path:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    weights = 0.05 * torch.randn(n, dim, generator=g)
    success = torch.ones(n, dtype=torch.uint8)
    out.mkdir(parents=True, exist_ok=True)
    save_file({"weights": weights, "success": success}, str(out / "neurons.safetensors"))
    write_manifest(out, "collect", lineage, config={}, outputs=["neurons.safetensors"],
                   upstream={"prepare": prepare_dir})
    return out


def make_run(root: Path, n_edits: int = 6, n_pseudo: int = 0) -> dict[str, Path]:
    """prepare/encoder/collect folders of one synthetic run under ``root``."""
    prepare = make_prepare(root / "prepare", n_edits, n_pseudo=n_pseudo)
    import json

    lineage = json.loads((prepare / "manifest.json").read_text())["lineage"]
    return {"prepare": prepare, "encoder": make_encoder(root / "encoder", prepare, lineage),
            "collect": make_collect(root / "collect", prepare, lineage, n_edits)}


def stage_args(run: dict[str, Path], out: Path, *extra: str) -> list[str]:
    return ["--data.prepare_dir", str(run["prepare"]), "--data.encoder_dir", str(run["encoder"]),
            "--data.collect_dir", str(run["collect"]), "--model.out_dir", str(out),
            "--model.preset", "dit-tiny", "--model.patch_size", "4", "--model.reliability", "false",
            "--data.batch_size", "4", "--data.val_edits", "4", "--data.val_batch_size", "2",
            "--model.val_steps", "5", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.accelerator", "cpu", *extra]
