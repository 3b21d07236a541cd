"""Integration on ZsRE (KnowEdit records ask other facts about the edited subject): the encoder's hard
negatives and the router's fences, end to end on the packaged MiniLM, on one process and under DDP."""

from __future__ import annotations

import json

import pytest
import torch

from megedit.artifacts import read_manifest
from megedit.cli import stage_main

pytestmark = pytest.mark.slow

# Every training group stays (a subsample would rarely keep a ZsRE pseudo edit among the corpus's groups);
# max_steps bounds the run instead.
ENCODER_SMALL = ["--data.batch_size", "16", "--data.hard_negative_batch_size", "8", "--data.min_val_per_source", "24",
                 "--data.max_val_per_source", "24", "--trainer.max_epochs", "1", "--trainer.max_steps", "6",
                 "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]


@pytest.fixture(scope="module")
def zsre_prepared_dir(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("zsre") / "prepare"
    stage_main("prepare", ["--data.dataset", "zsre", "--data.n_edits", "8", "--data.n_pseudo_irrelevant", "64",
                           "--data.max_pseudo_edits", "400", "--data.data_dir", str(data_dir), "--model.out_dir",
                           str(out), "--trainer.enable_progress_bar", "false"])
    return out


def test_hard_negatives_and_fences_on_zsre(zsre_prepared_dir, tmp_path):
    from megedit.data.locality_kinds import mentions_subject
    from megedit.familiarity.familiarity_datamodule import FamiliarityDataModule
    from megedit.prepare.artifact import load_prepared

    prep = load_prepared(zsre_prepared_dir)
    enc, fam = tmp_path / "encoder", tmp_path / "familiarity"
    stage_main("encoder", ["--data.prepare_dir", str(zsre_prepared_dir), "--model.out_dir", str(enc), *ENCODER_SMALL])
    report = json.loads((enc / "report.json").read_text())
    hard = report["hard_negatives"]
    assert report["steps"] == 6 and hard["sources"] > 0 and hard["templates"] > 0 and hard["natural"] > 0
    split = json.loads((enc / "heldout_groups.json").read_text())
    assert split["hard_negative_groups"] and not set(split["hard_negative_groups"]) & set(split["groups"])
    same = report["tuned"]["same_subject_locality"]
    assert same["n"] > 0 and 0.0 <= same["auc_paraphrase_closer"] <= 1.0

    stage_main("familiarity", ["--data.prepare_dir", str(zsre_prepared_dir), "--data.encoder_dir", str(enc),
                               "--model.out_dir", str(fam), "--trainer.max_epochs", "150", "--model.min_epochs", "5",
                               "--model.hidden_mult", "2", "--trainer.logger", "false",
                               "--trainer.enable_progress_bar", "false"])
    routing = json.loads((fam / "routing_report.json").read_text())
    assert routing["fences"]["main"] > 0 and routing["calibration"]["counts"]["fences"] > 0
    assert sum(routing["n_locality_by_kind"].values()) == sum(len(e.locality) for e in prep.edits)
    assert routing["n_locality_by_kind"]["same_subject"] > 0
    read_manifest(fam, stage="familiarity")

    # What the routers saw and scored: no fence is an evaluation text, and the same-subject prompts the
    # encoder trained on are never calibration negatives.
    dm = FamiliarityDataModule(str(zsre_prepared_dir), str(enc))
    dm._check_inputs()
    texts = dm._texts()
    evaluation = set(texts["edit_prompts"]) | set(texts["edit_paraphrases"]) | set(texts["locality"])
    assert texts["fences"] and not set(texts["fences"]) & evaluation
    assert not set(texts["calib_fences"]) & (set(texts["calib_negatives"]) | set(texts["calib_positives"]))
    trained = {p.prompt for r in prep.pseudo_edits if r.id in set(split["hard_negative_groups"])
               for p in r.locality if mentions_subject(r.subject, p.prompt)}
    assert trained and not trained & set(texts["calib_negatives"])
    # Fences are other facts about the edited subjects, at most fences_per_edit per edit.
    assert len(texts["fences"]) <= dm.hparams.fences_per_edit * len(prep.edits)
    assert all(any(e.subject in t for e in prep.edits) for t in texts["fences"])

    # A nearest router learns nothing from negatives, fences or shifts: its datamodule draws the same texts and
    # counts (so calibration is the same) but embeds none of those groups.
    from megedit.familiarity.familiarity_datamodule import NET_ONLY_GROUPS

    drawn = {}
    for net_groups in (True, False):
        dm = FamiliarityDataModule(str(zsre_prepared_dir), str(enc), paraphrase_shifts=20)
        dm.setup()
        dm.request(net_groups=net_groups)
        drawn[net_groups] = (dm, dict(dm.calibration_counts))
    (full, full_counts), (lean, lean_counts) = drawn[True], drawn[False]
    assert lean_counts == full_counts and lean.fences_drawn == full.fences_drawn > 0
    assert all(full.texts[g] for g in NET_ONLY_GROUPS) and not any(lean.texts[g] for g in NET_ONLY_GROUPS)
    assert {g: t for g, t in lean.texts.items() if g not in NET_ONLY_GROUPS} == \
        {g: t for g, t in full.texts.items() if g not in NET_ONLY_GROUPS}
    handed = lean.handover()
    assert all(len(handed.emb[g]) == 0 for g in (*NET_ONLY_GROUPS, "shifts"))
    assert handed.fences["main"] == full.fences_drawn and handed.fences["embedded"] is False
    with pytest.raises(RuntimeError, match="before handover"):
        lean.request(net_groups=True)


@pytest.mark.ddp
def test_encoder_hard_negatives_under_ddp_gloo(zsre_prepared_dir, tmp_path):
    """Two CPU processes with the pair and triple loaders (Lightning shards both): the run completes and writes one artifact."""
    import subprocess
    import sys

    from megedit.paths import REPO_ROOT

    enc = tmp_path / "encoder"
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "stages" / "encoder.py"), "--data.prepare_dir",
                           str(zsre_prepared_dir), "--model.out_dir", str(enc), *ENCODER_SMALL, "--trainer.strategy",
                           "ddp", "--trainer.devices", "2", "--trainer.accelerator", "cpu"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((enc / "report.json").read_text())
    assert report["world_size"] == 2 and report["steps"] == 6 and report["hard_negatives"]["sources"] > 0
