"""The prepare stage on the packaged SmolLM2, the real shared files, and its refusals."""

from __future__ import annotations

import json

import pytest

from megedit.artifacts import read_manifest
from megedit.data.datasets import load_dataset_config, read_dataset
from megedit.data.readers import read_file
from megedit.paths import CONFIG_DIR
from megedit.prepare.artifact import load_prepared


@pytest.mark.parametrize("path", sorted(p.name for p in (CONFIG_DIR / "datasets").glob("*.yaml")))
def test_every_shared_dataset_reads_cleanly(path, data_dir):
    cfg = load_dataset_config(str(CONFIG_DIR / "datasets" / path))
    records, groups, files = read_dataset(cfg, data_dir)
    assert records and all(r.target_new and r.subject for r in records)
    assert all((data_dir / f).is_file() for f in files)


def test_shared_counterfact_counts(data_dir):
    fmt, recs = read_file(data_dir / "counterfact/easyedit/counterfact-edit.json")
    assert fmt == "counterfact_easyedit" and len(recs) == 10000
    from megedit.data.readers import DataFormatError

    path = data_dir / "zsre/mend/zsre_mend_train-1k.json"
    with pytest.raises(DataFormatError, match="record 534: field 'alt': expected a non-empty string, got ''"):
        read_file(path)
    invalid: list = []
    fmt, recs = read_file(path, on_invalid="drop", invalid=invalid)
    assert fmt == "zsre_mend" and len(recs) == 998 and [i for i, _ in invalid] == [534, 723]


@pytest.mark.slow
def test_prepare_stage_writes_a_complete_artifact(prepared_dir):
    manifest = read_manifest(prepared_dir, "prepare")
    lineage = manifest["lineage"]
    assert lineage["model"] == "smollm2" and lineage["n_edits"] == 8 and len(lineage["model_weights_sha256"]) == 64
    assert set(manifest["inputs"]["files"]) >= {"counterfact/easyedit/counterfact-edit.json"}
    assert all(len(v["sha256"]) == 64 for v in manifest["inputs"]["files"].values())
    assert manifest["config"]["data"]["seed"] == 0 and manifest["megedit_version"]
    prep = load_prepared(prepared_dir)
    assert len(prep.edits) == 8 and prep.spec.name == "smollm2"
    answered = []
    for rec, pre in zip(prep.edits, prep.pre_edit):
        assert len(pre["paraphrases"]) == len(rec.paraphrases) >= 1
        assert len(pre["locality"]) == len(rec.locality) >= 1
        # Asked as a question, the base LM sometimes answers nothing at all (EOS first): an empty answer is a
        # real pre-edit answer (locality then checks the edited LM still stops), but most prompts get words.
        for p in [pre["prompt"], *pre["paraphrases"], *pre["locality"]]:
            assert isinstance(p["tokens"], list) and isinstance(p["text"], str)
            answered.append(bool(p["tokens"]))
    assert sum(answered) > len(answered) / 2
    edit_subjects = {r.subject for r in prep.edits}
    assert not edit_subjects & {r.subject for r in prep.pseudo_edits}
    assert not edit_subjects & {r["subject"] for r in prep.pseudo_irrelevant}
    report = json.loads((prepared_dir / "report.json").read_text())
    assert report["drops"]["total_dropped"]["conflicting_edit"] > 0  # the shared CounterFact has conflicts


@pytest.mark.slow
def test_prepare_refuses_a_target_that_tokenises_to_nothing(tmp_path, data_dir):
    from megedit.cli import stage_main
    from megedit.data.readers import DataFormatError

    bad = tmp_path / "cf.json"
    rows = [{"case_id": i, "prompt": f"Person{i} speaks", "subject": f"Person{i}", "target_new": "French",
             "ground_truth": "English", "rephrase_prompt": f"Person{i} talks", "locality_prompt": "Bob speaks",
             "locality_ground_truth": "English"} for i in range(3)]
    rows[0]["target_new"] = "<|im_end|>"  # a non-empty string that is only a special token
    bad.write_text(json.dumps(rows))
    cfg = tmp_path / "ds.yaml"
    cfg.write_text(f"name: tiny\nfiles:\n  - path: {bad}\n")
    with pytest.raises(DataFormatError, match=r"record 0 \(cf:0\): field 'target_new': target '<\|im_end\|>' tokenises to nothing"):
        stage_main("prepare", ["--data.dataset", str(cfg), "--data.n_edits", "3", "--data.n_pseudo_irrelevant", "0",
                               "--data.data_dir", str(data_dir), "--model.out_dir", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "manifest.json").exists()
