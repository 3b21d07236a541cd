"""Atomic writes, manifests that catch tampering, and refusal of mixed runs."""

from __future__ import annotations

import json

import pytest

from megedit.artifacts import (ArtifactError, atomic_path, atomic_write_json, check_lineage, check_upstream,
                               read_manifest, write_manifest)


def test_atomic_write_leaves_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "out.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_manifest_detects_changed_outputs_and_wrong_stage(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    write_manifest(tmp_path, "prepare", {"model": "m", "seed": 0}, {"x": 1}, ["a.txt"])
    assert read_manifest(tmp_path, "prepare")["lineage"] == {"model": "m", "seed": 0}
    with pytest.raises(ArtifactError, match="expected a 'collect' artifact, found stage 'prepare'"):
        read_manifest(tmp_path, "collect")
    (tmp_path / "a.txt").write_text("changed")
    with pytest.raises(ArtifactError, match="output a.txt does not match its sha256"):
        read_manifest(tmp_path)
    with pytest.raises(ArtifactError, match="no manifest.json"):
        read_manifest(tmp_path / "missing")


def test_lineage_and_upstream_checks(tmp_path):
    up_a, up_b, down = tmp_path / "a", tmp_path / "b", tmp_path / "down"
    for d, seed in [(up_a, 0), (up_b, 1)]:
        d.mkdir()
        write_manifest(d, "encoder", {"model": "m", "seed": seed}, {}, [])
    with pytest.raises(ArtifactError, match=r"come from different runs: \{'seed': \(0, 1\)\}"):
        check_lineage({"a": read_manifest(up_a), "b": read_manifest(up_b)})
    down.mkdir()
    m = write_manifest(down, "familiarity", {"model": "m", "seed": 0}, {}, [], upstream={"encoder": up_a})
    check_upstream(m, "encoder", up_a, "familiarity")
    with pytest.raises(ArtifactError, match="was built from the 'encoder' artifact at"):
        check_upstream(m, "encoder", up_b, "familiarity")


def test_manifest_records_what_the_stage_cost(tmp_path):
    import time

    from megedit import artifacts

    artifacts.mark_stage_start()
    time.sleep(0.2)
    (tmp_path / "a.txt").write_text("x")
    res = artifacts.write_manifest(tmp_path, "prepare", {"m": 1}, config={}, outputs=["a.txt"])["resources"]
    assert 0.2 <= res["wall_seconds"] < 60  # since the mark, not since the test process started
    assert res["peak_rss_mib_process"] > 10 and res["cpu_seconds_process"] > 0
    assert res["cpu_count"] >= 1 and len(res["load_average_1_5_15"]) == 3
    assert json.loads((tmp_path / "manifest.json").read_text())["resources"] == res


def test_git_commit_short_is_the_full_hash_prefix(monkeypatch):
    from megedit import artifacts

    full, short = artifacts.git_commit(short=False), artifacts.git_commit()
    if full is not None:  # a git checkout (CI clones one)
        assert len(full) == 40 and full.startswith(short)
    monkeypatch.setattr(artifacts.subprocess, "run", lambda *a, **k: (_ for _ in ()).throw(OSError("no git")))
    assert artifacts.git_commit() is None
