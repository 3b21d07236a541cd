"""The collect stage on the packaged SmolLM2 and 8 real CounterFact edits: artifact, resume after kill, DDP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megedit.artifacts import ArtifactError, read_manifest
from megedit.collect.artifact import load_collected, training_rows
from megedit.paths import REPO_ROOT

pytestmark = pytest.mark.slow

FAST = ["--data.shard_size", "3", "--model.options.capacity", "4", "--model.options.max_steps", "40",
        "--trainer.enable_progress_bar", "false"]


def _cmd(prepared_dir, out, *extra):
    return [sys.executable, str(REPO_ROOT / "stages" / "collect.py"), "--data.prepare_dir", str(prepared_dir),
            "--model.out_dir", str(out), *FAST, *extra]


def _check_artifact(out: Path, prepared_dir: Path, n: int = 8):
    weights, success, manifest = load_collected(out)
    prep = read_manifest(prepared_dir, "prepare")
    assert weights.shape == (n, 1152) and weights.dtype == torch.float32 and success.shape == (n,)
    assert manifest["lineage"] == prep["lineage"]
    assert manifest["inputs"]["upstream"]["prepare"]["dir"] == str(prepared_dir)
    rows = [json.loads(line) for line in (out / "per_edit.jsonl").read_text().splitlines()]
    edits = [json.loads(line)["id"] for line in (prepared_dir / "edits.jsonl").read_text().splitlines()][:n]
    assert [r["id"] for r in rows] == edits
    assert [r["success"] for r in rows] == success.tolist()
    assert not (out / "shards").exists()
    return weights, success, manifest, rows


def test_collect_stage_writes_verified_neurons(prepared_dir, tmp_path):
    from megedit.cli import stage_main
    from megedit.components.neuron import DynamicNeuron
    from megedit.loading import load_lm
    from megedit.prepare.artifact import load_prepared
    from megedit.scoring import greedy_match

    out = tmp_path / "collect"
    # the stage needs gradients inside predict and says so itself: a trainer asked for inference mode still works
    stage_main("collect", ["--data.prepare_dir", str(prepared_dir), "--model.out_dir", str(out), *FAST,
                           "--model.transfer_n", "4", "--trainer.inference_mode", "true"])
    weights, success, manifest, rows = _check_artifact(out, prepared_dir)
    assert success.float().mean() >= 7 / 8, rows
    report = json.loads((out / "report.json").read_text())
    assert report["success_rate"] == pytest.approx(success.float().mean().item(), abs=1e-4)
    assert report["edits_per_second"] > 0 and report["peak_rss_mib_per_rank"][0] > 100
    tr = report["transfer"]["configured"]
    assert tr["n_paraphrases"] >= 4 and 0.0 <= tr["paraphrase_exact"] <= 1.0
    assert torch.equal(training_rows(success, manifest), torch.nonzero(success).flatten())

    # Independent check with the real LM: the stored neurons make greedy decoding emit the targets,
    # zero neurons give the unedited logits bit for bit.
    prepared = load_prepared(prepared_dir)
    spec = prepared.spec
    lm, tok = load_lm(spec)
    neuron = DynamicNeuron(lm, spec)
    prompts = [spec.format_prompt(e.prompt, e.prompt_kind) for e in prepared.edits]
    targets = [e.target_new for e in prepared.edits]
    assert torch.equal(greedy_match(lm, tok, neuron, prompts, targets, weights), success)
    enc = tok(prompts[:4], return_tensors="pt", padding=True)
    with torch.no_grad():
        base = lm(**enc).logits
        with neuron.attached(torch.zeros(4, spec.neuron_dim)):
            assert torch.equal(lm(**enc).logits, base)


def test_collect_resumes_after_sigkill(prepared_dir, tmp_path):
    out = tmp_path / "collect"
    # 4 edits, one per shard and per batch, so shards land one after another and the kill falls between them.
    cmd = _cmd(prepared_dir, out, "--data.shard_size", "1", "--model.options.capacity", "1", "--model.transfer_n", "0",
               "--data.limit", "4")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    shards = out / "shards"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if shards.is_dir() and len(list(shards.glob("shard-*.safetensors"))) >= 1:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished (or died) before it could be killed: " + proc.stderr.read().decode()[-2000:]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = sorted(p.name for p in shards.glob("shard-*.safetensors"))
    assert 1 <= len(done_before) < 4 and not (out / "manifest.json").exists()

    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, success, _, rows = _check_artifact(out, prepared_dir, n=4)
    report = json.loads((out / "report.json").read_text())
    resumed = report["per_rank"][0]["shards_resumed"]
    assert resumed >= len(done_before) and report["edits_collected_this_run"] == 4 - resumed
    assert success.float().mean() >= 3 / 4

    # A shard from another configuration is refused, not silently mixed in.
    from megedit.collect.artifact import read_shard, shard_path, write_shard
    write_shard(tmp_path / "other", 0, {"weights": torch.zeros(1, 4)}, [], fingerprint="0" * 16)
    with pytest.raises(ArtifactError, match="another configuration"):
        read_shard(tmp_path / "other", 0, fingerprint="1" * 16)
    assert shard_path(tmp_path / "other", 0).is_file()


def test_collect_under_ddp_two_cpu_processes(prepared_dir, tmp_path):
    out = tmp_path / "collect"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(_cmd(prepared_dir, out, "--trainer.strategy", "ddp", "--trainer.devices", "2",
                        "--trainer.accelerator", "cpu", "--model.transfer_n", "0"),
                   check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
    _, success, _, rows = _check_artifact(out, prepared_dir)
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2
    assert {r["rank"] for r in rows} == {0, 1}  # both ranks collected shards of their own
    assert success.float().mean() >= 7 / 8


def test_collect_refuses_missing_prepare(tmp_path):
    from megedit.cli import stage_main

    with pytest.raises((FileNotFoundError, ArtifactError), match="prepare"):
        stage_main("collect", ["--data.prepare_dir", str(tmp_path / "nope"), "--model.out_dir", str(tmp_path / "o"),
                               "--trainer.enable_progress_bar", "false"])
