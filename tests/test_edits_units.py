"""Incremental edits, piece by piece: run versions on disk, removed.json, the duplicate policy, the removal
rule of EditedLM, the warm-start labels of the router, the generator's favouring sampler, and the
evaluation items a removed edit is judged on. No real LM: tiny random models and hand-written artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from _diffusion_fixtures import make_prepare
from megedit.artifacts import ANCESTORS, ArtifactError, check_upstream, sha256_file, write_manifest
from megedit.components.familiarity_net import FamiliarityNet, FamiliarityRouter
from megedit.data.readers import DataFormatError
from megedit.data.records import EditRecord, Probe
from megedit.edits import versions
from megedit.edits.new_edits import EditsError, plan_additions, read_new_edits
from megedit.edits.removed import REMOVED, Removal, read_removed, write_removed
from megedit.edits.retrain import GeneratorBudget, config_flags
from megedit.familiarity.familiarity_module import keep_familiar_labels, random_labels


def _edit(i: int, subject: str | None = None, prompt: str | None = None, target: str = "X", source: str = "f.json",
          id_: str | None = None) -> EditRecord:
    subject = subject or f"Subject {i}"
    return EditRecord(id=id_ or f"f:{i}", subject=subject, prompt=prompt or f"Where was {subject} born?",
                      prompt_kind="question", target_new=target, target_true="Y",
                      paraphrases=[f"What is the birthplace of {subject}?"],
                      locality=[Probe("Who wrote Hamlet?", "Shakespeare", "question")], source=source, index=i)


def _run(tmp_path: Path, n_edits: int = 4) -> Path:
    run = tmp_path / "run"
    make_prepare(run / "prepare", n_edits, n_irrelevant=4, n_pseudo=2)
    for stage in ("encoder", "familiarity", "collect", "diffusion"):
        write_manifest(run / stage, stage, {"model": "tiny"}, config={}, outputs=[])
    return run


# ----------------------------------------------------------------------------- versions on disk
def test_a_version_is_published_whole_or_not_at_all(tmp_path):
    run = _run(tmp_path)
    assert versions.resolve_version(run) == (run, 0) and versions.latest_version(run) == 0
    with pytest.raises(RuntimeError, match="killed"):
        with versions.writing_version(run) as staging:
            (staging.dir / "half-written").write_text("x")
            raise RuntimeError("killed half way")
    assert versions.latest_version(run) == 0 and not list((run / "versions").glob(".staging-*"))
    with versions.writing_version(run) as staging:
        staging.link_unchanged()
        versions.write_record(staging, {"kind": "remove"})
    folder, n = versions.resolve_version(run)
    assert n == 1 and folder == run / "versions" / "1"
    assert (folder / "prepare").is_symlink() and (folder / "prepare" / "manifest.json").is_file()
    assert versions.resolve_version(folder) == (folder, 1) and versions.run_of(folder) == run
    assert versions.resolve_version(run, 0) == (run, 0)
    with pytest.raises(ArtifactError, match="no version 7"):
        versions.resolve_version(run, 7)


def test_a_version_links_the_folder_that_owns_a_stage_never_a_link(tmp_path):
    run = _run(tmp_path)
    for _ in range(2):
        with versions.writing_version(run) as staging:
            staging.link_unchanged()
            versions.write_record(staging, {"kind": "remove"})
    second = run / "versions" / "2"
    assert Path(second / "collect").resolve() == (run / "collect").resolve()
    assert versions.stage_owner(second, "collect") == run / "collect"
    assert json.loads((second / "version.json").read_text())["parent"] == 1


def test_a_stale_staging_folder_is_cleared_and_a_second_writer_is_refused(tmp_path):
    run = _run(tmp_path)
    (run / "versions" / ".staging-1").mkdir(parents=True)  # a killed writer's leftovers
    with versions.writing_version(run) as staging:
        with pytest.raises(ArtifactError, match="another `megedit edits` command"):
            with versions.writing_version(run):
                pass
        staging.link_unchanged()
        versions.write_record(staging, {"kind": "remove"})
    assert versions.latest_version(run) == 1


def test_a_staged_version_without_its_record_is_not_published(tmp_path):
    run = _run(tmp_path)
    with pytest.raises(ArtifactError, match="without its version.json"):
        with versions.writing_version(run) as staging:
            staging.link_unchanged()
    assert versions.latest_version(run) == 0


def test_removed_json_round_trip_and_refusal_of_a_malformed_file(tmp_path):
    write_removed(tmp_path, [Removal("a:1", "2026-01-01T00:00:00+00:00", 3, "wrong fact")])
    assert read_removed(tmp_path) == [Removal("a:1", "2026-01-01T00:00:00+00:00", 3, "wrong fact")]
    assert read_removed(tmp_path / "nowhere") == []
    (tmp_path / REMOVED).write_text(json.dumps({"removed": ["a:1"]}))
    with pytest.raises(ArtifactError, match="removed.json"):
        read_removed(tmp_path)


def test_the_encoder_accepts_a_later_version_of_its_prepare_artifact_only_when_asked(tmp_path):
    prepare = make_prepare(tmp_path / "prepare", 2)
    encoder = write_manifest(tmp_path / "encoder", "encoder", {}, config={}, outputs=[], upstream={"prepare": prepare})
    later = tmp_path / "later"
    make_prepare(later, 3)
    extended = json.loads((later / "manifest.json").read_text())
    extended[ANCESTORS] = [sha256_file(prepare / "manifest.json")]
    (later / "manifest.json").write_text(json.dumps(extended))
    check_upstream(encoder, "prepare", later, "encoder", accept_ancestors=True)
    with pytest.raises(ArtifactError, match="was built from"):
        check_upstream(encoder, "prepare", later, "encoder")
    other = make_prepare(tmp_path / "other", 3)
    with pytest.raises(ArtifactError, match="was built from"):
        check_upstream(encoder, "prepare", other, "encoder", accept_ancestors=True)


# ----------------------------------------------------------------------------- duplicate policy
def test_duplicates_are_skipped_and_conflicts_refused_unless_replaced():
    run = [_edit(0, target="Paris"), _edit(1, target="Rome")]
    same = _edit(0, target="Paris", id_="new:0")
    plan = plan_additions([same, _edit(5, id_="new:5")], run, removed=set())
    assert [r.id for r in plan.new] == ["new:5"] and plan.duplicates[0]["same_as"] == "f:0"
    conflict = _edit(1, target="Oslo", source="new.json", id_="new:1")
    with pytest.raises(DataFormatError, match=r"new.json: record 1 \(new:1\): field 'target_new'.*'Rome' \(edit f:1\)"):
        plan_additions([conflict], run, removed=set())
    plan = plan_additions([conflict], run, removed=set(), replace=True)
    assert plan.replaced == {"f:1": "new:1"}
    assert plan_additions([conflict], run, removed={"f:1"}).replaced == {"f:1": "new:1"}  # a removed edit comes back


def test_a_second_fact_about_a_subject_is_added_and_the_files_may_not_disagree():
    run = [_edit(0)]
    other_fact = _edit(1, subject="Subject 0", prompt="What does Subject 0 do?", id_="new:1")
    assert [r.id for r in plan_additions([other_fact], run, set()).new] == ["new:1"]
    a, b = _edit(7, target="A", id_="new:7"), _edit(7, target="B", id_="new:8")
    with pytest.raises(DataFormatError, match="the files disagree"):
        plan_additions([a, b], run, set())
    plan = plan_additions([a, _edit(7, target="A", id_="new:9")], run, set())
    assert len(plan.new) == 1 and plan.duplicates[0]["why"] == "repeats an earlier record of the files"


def test_ids_must_stay_unique_and_nothing_to_add_is_an_error():
    run = [_edit(0)]
    with pytest.raises(DataFormatError, match="already names another edit"):
        plan_additions([_edit(3, id_="f:0")], run, set())
    with pytest.raises(DataFormatError, match="ids must be unique"):
        plan_additions([_edit(3, id_="n:1"), _edit(4, id_="n:1")], run, set())
    with pytest.raises(EditsError, match="nothing to add"):
        plan_additions([_edit(0, id_="again:0")], run, set())


def test_new_edits_are_read_and_checked_as_prepare_reads_a_benchmark(tmp_path):
    good = tmp_path / "new.json"
    good.write_text(json.dumps([{"subject": "Zorblax", "src": "Where was Zorblax born?", "alt": "Lima",
                                 "rephrase": "What is the birthplace of Zorblax?", "loc": "nq question: who",
                                 "loc_ans": "me"}]))
    records, files = read_new_edits([good])
    assert records[0].target_new == "Lima" and files[str(good)]["format"] == "zsre_mend"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"subject": "Zorblax", "src": "Where was Zorblax born?", "alt": ""}]))
    with pytest.raises(DataFormatError, match=r"bad.json: record 0: field 'alt': expected a non-empty string"):
        read_new_edits([bad])
    corpus = tmp_path / "corpus.json"
    corpus.write_text(json.dumps([{"edit": "x", "questions": ["a?", "b?"]}]))
    with pytest.raises(DataFormatError, match="paraphrase groups"):
        read_new_edits([corpus])
    with pytest.raises(FileNotFoundError):
        read_new_edits([tmp_path / "missing.json"])


# ----------------------------------------------------------------------------- version prepare
def test_pseudo_sets_lose_what_leaks_a_new_edit(tmp_path):
    from megedit.edits.prepare_version import filter_pseudo
    from megedit.prepare.artifact import load_prepared

    parent = load_prepared(make_prepare(tmp_path / "prepare", 2, n_irrelevant=4, n_pseudo=3))
    new = EditRecord(id="n:0", subject="Town 1", prompt="The mayor of Town 1 is", prompt_kind="completion",
                     target_new="Ann", target_true=None, paraphrases=["River 2 flows into the"])
    sets, dropped = filter_pseudo(parent, [new])
    assert dropped == {"pseudo_edits": 1, "pseudo_irrelevant": 1, "pseudo_pair_groups": 0}
    assert [r["id"] for r in sets["pseudo_edits"]] == ["pseudo:0", "pseudo:2"]
    assert "River 2 flows into the" not in [r["prompt"] for r in sets["pseudo_irrelevant"]]


# ----------------------------------------------------------------------------- router warm start
def test_warm_start_keeps_the_class_of_every_point_the_router_already_knows(one_thread):
    torch.manual_seed(0)
    net = FamiliarityNet(16, num_classes=4, depth=1, hidden_mult=2)
    known = F.normalize(torch.randn(8, 16), dim=-1)
    labels = random_labels(8, 4, 0)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(net(known), labels).backward()
        opt.step()
    fresh = F.normalize(torch.randn(4, 16), dim=-1)
    emb = torch.cat([known, fresh])
    drawn = random_labels(12, 4, 1)
    ent = FamiliarityRouter(net, 0.0).entropy(emb)
    threshold = float(ent[:8].max()) + 1e-6
    got, kept = keep_familiar_labels(net, emb, drawn, threshold)
    assert torch.equal(got[:8], labels)
    new_known = ent[8:] < threshold
    assert kept == 8 + int(new_known.sum())
    assert torch.equal(got[8:][~new_known], drawn[8:][~new_known])


# ----------------------------------------------------------------------------- generator fine-tuning
def test_the_favouring_sampler_gives_the_new_edits_their_share(tmp_path):
    from megedit.diffusion.diffusion_datamodule import DiffusionDataModule

    dm = DiffusionDataModule(prepare_dir="p", encoder_dir="e", collect_dir="c", favour_from=8, favoured_share=0.5)
    dm.favoured_rows = torch.tensor([8, 9])  # two new edits among 20 training rows
    sampler = dm._favouring_sampler(20)
    assert torch.isclose(sampler.weights[[8, 9]].sum(), torch.tensor(0.5, dtype=sampler.weights.dtype))
    assert torch.isclose(sampler.weights.sum(), torch.tensor(1.0, dtype=sampler.weights.dtype))
    torch.manual_seed(0)
    draws = torch.tensor(list(iter(torch.utils.data.WeightedRandomSampler(sampler.weights, 4000))))
    assert 0.45 < float(((draws == 8) | (draws == 9)).float().mean()) < 0.55
    dm.favoured_rows = None
    assert dm._favouring_sampler(20) is None
    with pytest.raises(ValueError, match="favoured_share"):
        DiffusionDataModule(prepare_dir="p", encoder_dir="e", collect_dir="c", favoured_share=1.0)


def test_generator_budget_and_stage_flags_from_a_manifest_config():
    budget = GeneratorBudget(draws_per_new_edit=300, new_share=0.5)
    assert budget.steps(n_new=128, batch_size=32) == 2400
    with pytest.raises(ValueError, match="new_share"):
        GeneratorBudget(new_share=0.0)
    config = {"data": {"batch_size": 32, "_instantiator": "x", "gone_option": 1},
              "model": {"lr": 0.002, "value_scales": [1.0, 2.0], "threshold": "auto"}}
    flags = config_flags("diffusion", config, {"model": {"lr": 0.001, "report_edits": None},
                                               "trainer": {"max_steps": 10}})
    pairs = dict(zip(flags[::2], flags[1::2]))
    assert pairs["--data.batch_size"] == "32" and "--data.gone_option" not in pairs and "--data._instantiator" not in pairs
    assert pairs["--model.lr"] == "0.001" and pairs["--model.value_scales"] == "[1.0, 2.0]"
    assert pairs["--model.report_edits"] == "null" and pairs["--trainer.max_steps"] == "10"


# ----------------------------------------------------------------------------- the removal rule
class _Encoder:
    """Embeds a text as the unit vector its first word names (e0, e1, ...); 'mix:a,b' halfway between."""

    dim = 4

    def embed(self, texts, batch_size: int = 256, progress: bool = False):
        def one(t: str) -> torch.Tensor:
            word = t.split()[0]
            if word.startswith("mix:"):
                a, b = (int(x) for x in word[4:].split(","))
                v = torch.zeros(self.dim)
                v[a], v[b] = 1.0, 0.9
                return F.normalize(v, dim=0)
            return F.one_hot(torch.tensor(int(word[1:])), self.dim).float()

        return torch.stack([one(t) for t in texts])


class _Router:
    threshold = 0.5

    def entropy(self, emb):  # every query the tests send is familiar but "far" (last coordinate)
        return torch.where(emb[:, 3] > 0.5, torch.tensor(1.0), torch.tensor(0.0))


class _Generator:
    value_scale = 1.0

    def __init__(self, dim: int):
        self.dim = dim

    def sample(self, emb, **kwargs):
        return torch.ones(len(emb), self.dim)


def _edited(tiny_llama, removed=()):
    from megedit.edited_model import EditedLM
    from megedit.prepare.artifact import Prepared

    model, spec = tiny_llama
    edits = [EditRecord(id=f"e:{i}", subject=f"e{i}", prompt=f"e{i} is", prompt_kind="completion",
                        target_new="x", target_true=None) for i in range(3)]
    prepared = Prepared(dir=Path("."), manifest={"model_spec": spec.to_dict()}, edits=edits, pre_edit=[{}] * 3,
                        pseudo_edits=[], pseudo_pairs=[], pseudo_irrelevant=[])
    return EditedLM(prepared, model, None, _Encoder(), _Router(), _Generator(spec.neuron_dim), removed=removed)


def test_a_familiar_query_nearest_to_a_removed_edit_is_not_routed(tiny_llama):
    lm = _edited(tiny_llama, removed=["e:1"])
    routing = lm.route(["e0 prompt", "e1 prompt", "mix:1,0 a paraphrase of e1", "mix:0,1 a paraphrase of e0",
                        "e3 unrelated"])
    assert routing.familiar.tolist() == [True, False, False, True, False]
    assert routing.removed.tolist() == [False, True, True, False, False]
    assert (routing.weights[~routing.familiar] == 0).all()
    nearest = lm.nearest_edits(routing.embeddings)
    assert [n["id"] for n in nearest] == ["e:0", "e:0", "e:0", "e:0", "e:0"]  # e:1 is never named
    assert _edited(tiny_llama).route(["e1 prompt"]).familiar.tolist() == [True]


def test_every_edit_removed_leaves_no_nearest_edit_and_unknown_ids_are_refused(tiny_llama):
    lm = _edited(tiny_llama, removed=["e:0", "e:1", "e:2"])
    routing = lm.route(["e2 prompt"])
    assert not routing.familiar.any() and lm.nearest_edits(routing.embeddings) == [None]
    with pytest.raises(ArtifactError, match="not edits of"):
        _edited(tiny_llama, removed=["e:9"])


# ----------------------------------------------------------------------------- evaluation items
def test_restoration_items_judge_an_edits_own_prompts_against_the_pre_edit_answers(tmp_path):
    from megedit.evaluate.items import edit_items, restoration_items, summarise_rows
    from megedit.prepare.artifact import Prepared

    rec = _edit(0)
    pre = {"prompt": {"tokens": [5, 6], "text": "a"}, "paraphrases": [{"tokens": [7], "text": "b"}],
           "locality": [{"tokens": [8], "text": "c"}]}
    prepared = Prepared(dir=tmp_path, manifest={}, edits=[rec], pre_edit=[pre], pseudo_edits=[], pseudo_pairs=[],
                        pseudo_irrelevant=[])
    items = restoration_items(prepared, [0])
    assert [(i["query"], i["pre_tokens"], i["locality_kind"]) for i in items] == [
        (rec.prompt, [5, 6], "own_prompt"), (rec.paraphrases[0], [7], "own_paraphrase")]
    assert all(i["group"] == "locality" for i in items)
    rows = [{**it, "tf": 1.0, "ag": True, "familiar": False} for it in edit_items(prepared, [0])]
    rows[0].update(tf=0.5, ag=False)
    m = summarise_rows(rows)
    assert (m["rel_tf"], m["rel_ag"], m["gen_ag"], m["loc_ag"]) == (50.0, 0.0, 100.0, 100.0)
    assert m["score"] == 0.0 and m["n"] == {"rel": 1, "gen": 1, "loc": 1}


def test_a_version_warm_starts_its_routers_only_where_the_parent_saved_both(tmp_path):
    from megedit.edits.retrain import warm_router
    from megedit.familiarity.artifact import CALIBRATION_WEIGHTS

    assert not warm_router(tmp_path)  # an older artifact: main router only, so both are trained cold
    (tmp_path / CALIBRATION_WEIGHTS).write_bytes(b"")
    (tmp_path / "router.json").write_text(json.dumps({"threshold": 0.3}))  # no kind: written before nearest
    assert warm_router(tmp_path)
    (tmp_path / "router.json").write_text(json.dumps({"kind": "nearest", "threshold": 0.3}))
    assert not warm_router(tmp_path)  # a memory has nothing to fine-tune


@pytest.mark.parametrize("kind", ["entropy", "nearest"])
def test_a_version_keeps_its_parents_router_kind(tmp_path, monkeypatch, kind):
    """``megedit edits add`` runs the familiarity stage with the parent's recorded config: a nearest parent gives
    a nearest version (its memory rebuilt, its threshold recalibrated), an entropy parent a warm-started net."""
    from megedit.edits import retrain
    from megedit.familiarity.artifact import CALIBRATION_WEIGHTS

    parent = tmp_path / "familiarity"
    parent.mkdir()
    (parent / CALIBRATION_WEIGHTS).write_bytes(b"")
    (parent / "router.json").write_text(json.dumps({"kind": kind, "threshold": 0.3}))
    config = {"data": {"batch_size": 256}, "model": {"router": kind, "threshold": "auto", "lr": 0.001},
              "trainer": {"max_epochs": 400}}
    write_manifest(parent, "familiarity", {"run": "x"}, config, ["router.json", CALIBRATION_WEIGHTS])
    ran = []
    monkeypatch.setattr(retrain, "run_stage_with", lambda stage, flags: ran.append((stage, flags)))
    retrain.fine_tune_router(parent, tmp_path / "v1/prepare", tmp_path / "encoder", tmp_path / "v1/familiarity",
                             tmp_path / "tb", quiet=True)
    (stage, flags), = ran
    pairs = dict(zip(flags[::2], flags[1::2]))
    assert stage == "familiarity" and pairs["--model.router"] == kind
    assert pairs["--model.out_dir"] == str(tmp_path / "v1/familiarity")
    assert ("--model.init_from" in pairs) == (kind == "entropy")
