"""MEMIT / AlphaEdit baselines and their key statistics, on tiny random models (seconds each)."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
import torch
import yaml

from megedit.baselines import layer_stats
from megedit.baselines.alphaedit import alphaedit_solver, alphaedit_weights, null_space_projector
from megedit.baselines.layer_stats import StatsOptions, key_second_moments, stats_file
from megedit.baselines.memit import (EditRequest, block_outputs, compute_keys, compute_targets, memit_solver,
                                     memit_weights, requests_from_records, subject_last_token, swapped_weights)
from megedit.data.records import EditRecord
from megedit.paths import CONFIG_DIR
from megedit.registry import RegistryError, available_models, load_model_spec, spec_from_dict
from megedit.scoring import teacher_forced

SUBJECTS = ["Alba Rossi", "Bruno Keller", "Carla Duarte", "Dmitri Volkov"]
FILLER = ("the of and in a to was is for on as by with he she it from at an city river team born played "
          "album film war year school church music world known first new state people").split()
WORDS = (FILLER + [w for s in SUBJECTS for w in s.split()]
         + "Q A works as lives speaks Therefore Because I You".split()
         + [f"Person{i}" for i in range(8)] + [".", ",", ":", "?"])


class _Killed(RuntimeError):
    pass


@pytest.fixture(scope="module")
def tok():
    """A word-level fast tokenizer (offsets, BOS, pad), enough for prompts, targets and the toy corpus."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<pad>", "<s>", "</s>"] + sorted(set(WORDS)))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    t = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                eos_token="</s>")
    t.padding_side = "left"
    return t


def _spec(kind: str, layers_path: str, projections: dict, layers=(1,), **memit) -> object:
    return spec_from_dict({
        "name": f"tiny-{kind}-{layers_path.split('.')[0]}", "source": "random", "hidden_size": 32, "num_layers": 3,
        "edit_layer": 1, "mlp": {"kind": kind, "layers": layers_path, "module": "mlp",
                                 "activation": "silu" if kind == "gated" else "gelu_new", "projections": projections},
        "question_template": "Q: {question} A:", "encoder": "random",
        "memit": {"layers": list(layers), "context_prefixes": 0, "v_num_grad_steps": 8, "mom2_n_texts": 40,
                  "mom2_max_seq_len": 24, **memit},
    })


def _model(arch: str, vocab: int):
    from transformers import GPT2Config, GPT2LMHeadModel, GPTJConfig, GPTJForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        return LlamaForCausalLM(cfg).eval().requires_grad_(False), ("gated", "model.layers", {"down": "down_proj"})
    if arch == "gptj":
        cfg = GPTJConfig(vocab_size=vocab, n_embd=32, n_layer=3, n_head=4, rotary_dim=4, n_inner=64, n_positions=64)
        return GPTJForCausalLM(cfg).eval().requires_grad_(False), ("ungated", "transformer.h", {"fc_out": "fc_out"})
    cfg = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=3, n_head=4, n_inner=64, n_positions=64)
    return GPT2LMHeadModel(cfg).eval().requires_grad_(False), ("ungated", "transformer.h", {"fc_out": "c_proj"})


def _setup(arch, tok, **memit):
    lm, (kind, path, proj) = _model(arch, len(tok))
    return lm, _spec(kind, path, proj, **memit)


@pytest.fixture
def corpus(tmp_path):
    rng = random.Random(0)
    path = tmp_path / "data" / "corpus" / "wiki.jsonl"
    path.parent.mkdir(parents=True)
    with open(path, "w") as f:
        for i in range(48):
            text = " ".join(rng.choice(WORDS[:len(FILLER) + 8]) for _ in range(rng.randint(4, 30)))
            f.write(json.dumps({"id": str(i), "title": f"T{i}", "text": text}) + "\n")
    return path


def _options(corpus, **kw) -> StatsOptions:
    base = {"n_texts": 40, "max_seq_len": 24, "dtype": "float64", "corpus": str(corpus), "batch_size": 4,
            "checkpoint_every": 8}
    return StatsOptions(**{**base, **kw})


REQUESTS = [EditRequest(f"{s} works as a", s, f"Person{i}") for i, s in enumerate(SUBJECTS)]


# ------------------------------------------------------------------------------------------------ registry
@pytest.mark.parametrize("name", available_models())
def test_every_shipped_model_has_a_valid_memit_section(name):
    spec = load_model_spec(name)
    assert spec.memit is not None and spec.memit.layers
    assert all(0 <= layer < spec.num_layers for layer in spec.memit.layers)
    assert spec_from_dict(spec.to_dict()) == spec  # the spec round-trips through a manifest


@pytest.mark.parametrize("change,message", [
    ({"layers": [5, 4]}, "strictly increasing"),
    ({"layers": [30]}, "outside 0..29"),
    ({"layers": []}, "non-empty list"),
    ({"clamp": 1.0}, r"unknown field\(s\) \['memit.clamp'\]"),
    ({"v_lr": 0}, "'memit.v_lr' is 0; it must be > 0"),
    ({"context_prefixes": 6}, "'memit.context_prefixes' must be an integer in 0..5"),
    ({"mom2_dtype": "float16"}, "'memit.mom2_dtype'"),
    ({"mom2_max_tokens": 0}, "'memit.mom2_max_tokens' must be null or an integer >= 1"),
])
def test_bad_memit_sections_are_refused(change, message):
    raw = yaml.safe_load((CONFIG_DIR / "models" / "smollm2.yaml").read_text())
    raw["memit"] = {**raw["memit"], **change}
    with pytest.raises(RegistryError, match=message):
        spec_from_dict(raw, where="x.yaml")


def test_memit_section_needs_the_output_projection():
    raw = yaml.safe_load((CONFIG_DIR / "models" / "smollm2.yaml").read_text())
    raw["mlp"]["projections"] = {"gate": "gate_proj", "up": "up_proj"}
    with pytest.raises(RegistryError, match=r"needs 'mlp.projections.down'"):
        spec_from_dict(raw, where="x.yaml")


def test_requests_use_the_project_prompt_format(tok):
    spec = load_model_spec("smollm2")
    rec = EditRecord(id="x", subject="Alba Rossi", prompt="Alba Rossi works as a", prompt_kind="completion",
                     target_new="Person1", target_true=None)
    (req,) = requests_from_records([rec], spec)
    assert req.prompt == spec.format_prompt(rec.prompt, "completion") and req.target == "Person1"
    text = "Q: what does Alba Rossi do ? A:"
    ids = tok(text)["input_ids"]
    assert tok.convert_ids_to_tokens(ids[subject_last_token(tok, text, "Alba Rossi")]) == "Rossi"
    assert subject_last_token(tok, text, "Nobody") is None


# ------------------------------------------------------------------------------------------------ (c) stats cache
def test_stats_cache_is_served_only_for_the_same_request(tok, corpus, tmp_path, one_thread, capsys):
    lm, spec = _setup("llama", tok)
    root = tmp_path / "cache"
    opts = _options(corpus)
    first = key_second_moments(lm, tok, spec, [0, 1], opts, cache_root=root, progress=False)
    assert first.computed == [0, 1] and first.mom2[1].shape == (64, 64)
    req = first.manifests[1]["request"]
    assert req["module"] == "model.layers.1.mlp.down_proj" and req["layer"] == 1 and req["key_dim"] == 64
    assert req["corpus"]["sha256"] and req["corpus"]["size"] == corpus.stat().st_size
    assert (req["n_texts"], req["max_seq_len"], req["dtype"]) == (40, 24, "float64")
    assert len(req["model_weights_sha256"]) == 64
    c = first.mom2[1]
    assert torch.allclose(c, c.T) and torch.linalg.eigvalsh(c).min() > -1e-9  # a second moment

    again = key_second_moments(lm, tok, spec, [0, 1], opts, cache_root=root, progress=False)
    assert again.computed == [] and torch.equal(again.mom2[1], c)

    # Another model's weights, a changed corpus, an edited manifest, a damaged file: never served.
    other = key_second_moments(lm, tok, spec, [1], opts, cache_root=root, weights_sha256="0" * 64, progress=False)
    assert other.computed == [1] and "model_weights_sha256" in capsys.readouterr().out
    key_second_moments(lm, tok, spec, [1], opts, cache_root=root, progress=False)  # back to the real weights

    mpath = stats_file(spec, 1, opts, root).with_suffix(".json")
    manifest = json.loads(mpath.read_text())
    manifest["request"]["max_seq_len"] = 999
    mpath.write_text(json.dumps(manifest))
    assert key_second_moments(lm, tok, spec, [1], opts, cache_root=root, progress=False).computed == [1]

    stats_file(spec, 1, opts, root).write_bytes(b"not the tensors")
    assert key_second_moments(lm, tok, spec, [1], opts, cache_root=root, progress=False).computed == [1]
    assert "does not match the sha256" in capsys.readouterr().out

    with open(corpus, "a") as f:
        f.write(json.dumps({"id": "new", "title": "N", "text": "the river"}) + "\n")
    changed = key_second_moments(lm, tok, spec, [0, 1], opts, cache_root=root, progress=False)
    assert changed.computed == [0, 1] and "corpus" in capsys.readouterr().out


def test_stats_resume_after_a_kill_and_token_budget(tok, corpus, tmp_path, one_thread, monkeypatch):
    lm, spec = _setup("gpt2", tok)
    opts = _options(corpus)
    fresh = key_second_moments(lm, tok, spec, [0, 2], opts, cache_root=tmp_path / "fresh", progress=False)

    real_write, calls = layer_stats._write_partial, []

    def write_then_die(*args, **kwargs):
        real_write(*args, **kwargs)
        calls.append(args[3])
        if len(calls) == 2:
            raise _Killed("simulated kill after the second checkpoint")

    monkeypatch.setattr(layer_stats, "_write_partial", write_then_die)
    root = tmp_path / "killed"
    with pytest.raises(_Killed):
        key_second_moments(lm, tok, spec, [0, 2], opts, cache_root=root, progress=False)
    assert calls == [8, 16] and not stats_file(spec, 0, opts, root).exists()
    monkeypatch.setattr(layer_stats, "_write_partial", real_write)

    seen = []
    monkeypatch.setattr(layer_stats, "_corpus_texts",
                        lambda *a, _real=layer_stats._corpus_texts: seen.append(1) or _real(*a))
    resumed = key_second_moments(lm, tok, spec, [0, 2], opts, cache_root=root, progress=False)
    assert resumed.resumed_from_texts == 16 and resumed.computed == [0, 2]
    for layer in (0, 2):
        assert torch.allclose(resumed.mom2[layer], fresh.mom2[layer], rtol=1e-10, atol=1e-12)
        assert resumed.manifests[layer]["result"] == {**fresh.manifests[layer]["result"]}
    assert not list((root / spec.name).glob("partial-*"))

    budget = key_second_moments(lm, tok, spec, [2], replace(opts, max_tokens=100), cache_root=root, progress=False)
    assert budget.manifests[2]["result"]["tokens"] == 100 and budget.manifests[2]["request"]["max_tokens"] == 100


# ------------------------------------------------------------------------------------------------ (a) MEMIT
def test_memit_solver_is_the_regularised_least_squares_fit():
    g = torch.Generator().manual_seed(0)
    keys, resid = torch.randn(5, 12, generator=g, dtype=torch.float64), torch.randn(5, 7, generator=g,
                                                                                    dtype=torch.float64)
    a = torch.randn(40, 12, generator=g, dtype=torch.float64)
    cov = a.T @ a / 40
    delta = memit_solver({3: cov}, 2.0)(0, 3, keys, resid)
    # Normal equations of min 2·tr(ΔW C ΔWᵀ) + |ΔW Kᵀ - Rᵀ|²
    assert torch.allclose(delta @ (2.0 * cov + keys.T @ keys), resid.T @ keys, atol=1e-10)
    exact = memit_solver({3: cov}, 0.0)(0, 3, keys, resid)
    assert torch.allclose(keys @ exact.T, resid, atol=1e-10)


@pytest.mark.parametrize("arch", ["llama", "gptj", "gpt2"])
def test_memit_maps_each_key_to_its_target_value(arch, tok, corpus, tmp_path, one_thread):
    lm, spec = _setup(arch, tok, mom2_weight=1e-4)
    stats = key_second_moments(lm, tok, spec, [1], _options(corpus), cache_root=tmp_path, progress=False)
    res = memit_weights(lm, tok, spec, REQUESTS, stats=stats, progress=False)
    (name,) = res.weights
    assert name == f"{spec.mlp.layers}.1.mlp.{list(spec.mlp.projections.values())[0]}.weight"
    zs, _ = compute_targets(lm, tok, spec, spec.memit, REQUESTS, [""], progress=False)
    before = block_outputs(lm, tok, spec, 1, REQUESTS)
    with swapped_weights(lm, res.weights):
        after = block_outputs(lm, tok, spec, 1, REQUESTS)
    # The block output at each subject's last token moved to the optimised z (one layer: ΔW k = z - h).
    assert (after - zs).norm() / (zs - before).norm() < 1e-3
    assert res.diagnostics["per_layer"][1]["fit_rel_error"] < 1e-3


def test_memit_edits_a_tiny_llama_over_two_layers(tok, corpus, tmp_path, one_thread, monkeypatch):
    # A random tiny LM barely carries a signal from an earlier token to the next-token logits (near-uniform
    # attention, 0.02-scale weights), so these prompts end with the subject, and the weight decay on the
    # delta, scaled by 1/|h|^2 with |h| ~ 0.1 here, is made small.
    monkeypatch.setenv("MEGEDIT_CACHE", str(tmp_path / "cache"))
    lm, spec = _setup("llama", tok, layers=(0, 1), context_prefixes=2, context_prefix_tokens=4,
                      v_num_grad_steps=20, clamp_norm_factor=4.0, mom2_weight=100.0, v_weight_decay=1e-3)
    requests = [EditRequest(f"the album of {s}", s, f"Person{i}") for i, s in enumerate(SUBJECTS)]
    prompts, targets = [r.prompt for r in requests], [r.target for r in requests]
    assert not teacher_forced(lm, tok, None, prompts, targets)["exact"].any()
    res = memit_weights(lm, tok, spec, requests, data_dir=corpus.parent.parent,
                        stats_overrides={"corpus": "corpus/wiki.jsonl"}, progress=False)
    assert len(res.diagnostics["context_prefixes"]) == 3 and res.diagnostics["subject_not_found"] == 0
    assert set(res.weights) == {f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 1)}
    with swapped_weights(lm, res.weights):
        assert teacher_forced(lm, tok, None, prompts, targets)["exact"].all()
    assert not teacher_forced(lm, tok, None, prompts, targets)["exact"].any()


# ------------------------------------------------------------------------------------------------ (b) AlphaEdit
def test_alphaedit_update_leaves_preserved_keys_alone_exact_null_space():
    g = torch.Generator().manual_seed(1)
    basis = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))[0]
    k0 = torch.randn(200, 10, generator=g, dtype=torch.float64) @ basis[:, :10].T  # preserved keys span 10 of 16
    cov = k0.T @ k0 / 200
    proj, dim = null_space_projector(cov, 1e-8)
    assert dim == 6
    keys, resid = torch.randn(4, 16, generator=g, dtype=torch.float64), torch.randn(4, 8, generator=g,
                                                                                    dtype=torch.float64)
    delta = alphaedit_solver({0: proj}, 1.0, None)(0, 0, keys, resid)
    assert (delta @ k0.T).norm() / (delta.norm() * k0.norm()) < 1e-10
    assert delta.norm() > 1e-3  # the edits' keys have a part outside the preserved span: something is written


def test_alphaedit_on_a_tiny_llama_keeps_the_preserved_texts_outputs(tok, corpus, tmp_path, one_thread):
    # Statistics over 2 short texts: fewer tokens than the 64 key dimensions, so E[kkᵀ] has an exact null space
    # and those texts' keys K0 are exactly the preserved knowledge: ΔW K0 = 0 and the texts' outputs stay.
    lm, spec = _setup("llama", tok)
    opts = _options(corpus, n_texts=2)
    stats = key_second_moments(lm, tok, spec, [1], opts, cache_root=tmp_path, progress=False)
    tokens = stats.manifests[1]["result"]["tokens"]
    assert tokens < 64
    # the ridge term is scaled to these tiny keys (|k|^2 ~ 1e-3 against ~1e2 in a real LM)
    hp = replace(spec.memit, nullspace_threshold=1e-6 * float(torch.linalg.eigvalsh(stats.mom2[1]).max()),
                 alphaedit_l2=1e-5, mom2_weight=0.0)
    alpha = alphaedit_weights(lm, tok, spec, REQUESTS, hparams=hp, stats=stats, progress=False)
    plain = memit_weights(lm, tok, spec, REQUESTS, hparams=hp, stats=stats, progress=False)  # minimum-norm fit
    assert alpha.diagnostics["null_space_dim"][1] >= 64 - tokens
    assert alpha.diagnostics["per_layer"][1]["fit_rel_error"] < 0.5  # it does write the edits

    texts = layer_stats._corpus_texts(corpus, opts)
    batch = tok(texts, truncation=True, max_length=24, padding=True, return_tensors="pt")
    keep = batch["attention_mask"].bool()
    name = "model.layers.1.mlp.down_proj.weight"
    proj = lm.get_submodule("model.layers.1.mlp.down_proj")
    grabbed = []
    handle = proj.register_forward_pre_hook(lambda _m, args: grabbed.append(args[0][keep].double()))
    base = lm(**batch).logits[keep]
    handle.remove()
    k0 = grabbed[0]  # [tokens, 64]: the preserved keys

    def relative(result):
        d = result.weights[name].double() - lm.get_parameter(name).double()
        return float((k0 @ d.T).norm() / (d.norm() * k0.norm()))

    assert relative(alpha) < 1e-6 and relative(plain) > 1e-3
    with swapped_weights(lm, alpha.weights):
        assert (lm(**batch).logits[keep] - base).abs().max() < 1e-5 * base.abs().max()


def test_alphaedit_writes_only_below_the_threshold(tok, corpus, tmp_path, one_thread):
    # E|ΔW k0|² / |ΔW|² = tr(ΔW C ΔWᵀ) / |ΔW|² over the statistics' keys k0 is at most the threshold.
    lm, spec = _setup("llama", tok)
    stats = key_second_moments(lm, tok, spec, [1], _options(corpus), cache_root=tmp_path, progress=False)
    cov = stats.mom2[1].double()
    eig = torch.linalg.eigvalsh(cov)
    hp = replace(spec.memit, nullspace_threshold=float(eig[16]) * 1.0001)
    res = alphaedit_weights(lm, tok, spec, REQUESTS, hparams=hp, stats=stats, progress=False, return_kkt=True)
    name = "model.layers.1.mlp.down_proj.weight"
    d = res.weights[name].double() - lm.get_parameter(name).double()
    assert res.diagnostics["null_space_dim"] == {1: 17}
    energy = float(torch.trace(d @ cov @ d.T) / d.norm() ** 2)
    assert energy <= hp.nullspace_threshold * (1 + 1e-6) and energy < 0.05 * float(eig.max())
    # the cumulative term for a next batch holds the edited keys, read after the edit as AlphaEdit does
    with swapped_weights(lm, res.weights):
        keys, _ = compute_keys(lm, tok, spec, 1, REQUESTS, [""])
    assert torch.allclose(res.kkt[1], keys.T @ keys)


# ------------------------------------------------------------------------------------------------ (d) swap
def test_editing_and_swapping_restore_the_lm_bit_for_bit(tok, corpus, tmp_path, one_thread):
    lm, spec = _setup("gptj", tok, layers=(0, 1), context_prefixes=1, context_prefix_tokens=3)
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    stats = key_second_moments(lm, tok, spec, [0, 1], _options(corpus), cache_root=tmp_path, progress=False)
    res = alphaedit_weights(lm, tok, spec, REQUESTS, stats=stats, progress=False,
                            hparams=replace(spec.memit, nullspace_threshold=1e9))
    assert all(torch.equal(v, before[k]) for k, v in lm.state_dict().items())  # computing left the LM alone
    with swapped_weights(lm, res.weights):
        for name, w in res.weights.items():
            assert torch.equal(lm.get_parameter(name), w) and not torch.equal(w, before[name])
    assert all(torch.equal(v, before[k]) for k, v in lm.state_dict().items())
    with pytest.raises(RuntimeError, match="inside"):
        with swapped_weights(lm, res.weights):
            raise RuntimeError("inside")
    assert all(torch.equal(v, before[k]) for k, v in lm.state_dict().items())
    with pytest.raises(ValueError, match="does not fit"):
        with swapped_weights(lm, {name: w.T for name, w in res.weights.items()}):
            pass


@pytest.mark.parametrize("arch", ["llama", "gptj", "gpt2"])
def test_z_from_the_kept_logits_equals_z_from_all_logits(arch, tok, monkeypatch, one_thread):
    """The z optimisation asks the LM head only for the target and KL positions (``logits_to_keep``): the
    same target values as from every position's logits, with the KL term on."""
    from megedit.baselines import memit

    lm, spec = _setup(arch, tok, kl_factor=0.5)
    kept, _ = compute_targets(lm, tok, spec, spec.memit, REQUESTS, [""], progress=False)
    monkeypatch.setattr(memit, "_logits_from", lambda lm, ids, mask, pos, first: (
        lm(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits, 0))
    full, _ = compute_targets(lm, tok, spec, spec.memit, REQUESTS, [""], progress=False)
    assert torch.allclose(kept, full, atol=1e-5, rtol=1e-4)


def test_z_cache_serves_each_edit_once_and_only_for_the_same_context(tok, tmp_path, monkeypatch, one_thread):
    """Target values are cached per edit: a second call computes nothing, a larger batch computes only its new
    edits, and another setting (or model) is a different cache."""
    from dataclasses import replace

    from megedit.baselines import memit

    monkeypatch.setenv("MEGEDIT_CACHE", str(tmp_path))
    lm, spec = _setup("llama", tok)
    calls = []
    real = memit.compute_targets
    monkeypatch.setattr(memit, "compute_targets", lambda *a, **k: calls.append(len(a[4])) or real(*a, **k))
    first = memit.edit_targets(lm, tok, spec, REQUESTS[:2], progress=False)
    again = memit.edit_targets(lm, tok, spec, REQUESTS[:2], progress=False)
    assert calls == [2] and torch.equal(first.z, again.z) and again.report["z_cached"] == 2
    more = memit.edit_targets(lm, tok, spec, REQUESTS, progress=False)
    assert calls == [2, len(REQUESTS) - 2] and torch.equal(more.z[:2], first.z)
    uncached = memit.edit_targets(lm, tok, spec, REQUESTS, progress=False, cache=False)
    assert torch.allclose(uncached.z, more.z, atol=1e-6)
    other = replace(spec.memit, v_lr=spec.memit.v_lr / 2)
    memit.edit_targets(lm, tok, spec, REQUESTS[:2], hparams=other, progress=False)
    assert calls[-1] == 2 and len(list((tmp_path / "memit_z" / spec.name).iterdir())) == 2


# ------------------------------------------------------------------------------------------------ pure parts
def test_target_positions_weight_each_prompt_equally_within_its_edit():
    from megedit.baselines.memit import _Row, target_positions

    # Two prefixed prompts of edit 0 (targets of 2 tokens), a KL row (no targets), edit 1's prompt (1 token).
    rows = [_Row(ids=[5, 6], pos=1, owner=0, targets=[7, 8]), _Row(ids=[4, 5, 6], pos=2, owner=0, targets=[7, 8]),
            _Row(ids=[5, 9], pos=0, owner=0, kl=True), _Row(ids=[5, 6, 3], pos=2, owner=1, targets=[2])]
    shift = [1, 0, 3, 0]  # left padding of each row in the batch of width 5
    tr, tp, tt, tw = target_positions(rows, shift, n_prefixes=2)
    assert tr == [0, 0, 1, 1, 3] and tt == [7, 8, 7, 8, 2]
    # the logit one before each target token: row 0's first target token sits at 1 + 2 = 3
    assert tp == [2, 3, 2, 3, 2]
    assert tw == [0.25, 0.25, 0.25, 0.25, 0.5]  # 1 / (target tokens x prompts per edit)


def test_kl_and_clamp_helpers():
    from megedit.baselines.memit import clamp_scale, kl_per_edit

    p = torch.log_softmax(torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 0.0]]), -1)
    assert torch.allclose(kl_per_edit(p, p, torch.tensor([1, 1]), 3), torch.zeros(3))
    q = torch.log_softmax(torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, 0.5]]), -1)
    kl = kl_per_edit(p, q, torch.tensor([0, 2]), 3)
    want = torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1)  # KL(p || q) per row
    assert torch.allclose(kl, torch.stack([want[0], torch.tensor(0.0), want[1]]))
    scale = clamp_scale(torch.tensor([1.0, 4.0, 0.0]), torch.tensor([2.0, 2.0, 2.0]))
    assert scale.tolist() == [1.0, 0.5, 1.0]


def test_stats_chunk_stops_at_the_token_budget():
    from megedit.baselines.layer_stats import next_chunk

    texts = ["a b c", "", "d e", "f g h i", "j"]
    tokenize = lambda t: [len(w) for w in t.split()]  # noqa: E731 - one id per word
    seqs, consumed = next_chunk(tokenize, texts, 0, 5, None, 0)
    assert consumed == 5 and [len(s) for s in seqs] == [1, 2, 3, 4]  # the empty text is consumed, not kept
    # 4 tokens counted already, budget 8: "a b c" fits, "d e" is cut to 1 token, nothing after it is read.
    seqs, consumed = next_chunk(tokenize, texts, 0, 5, 8, 4)
    assert consumed == 3 and sorted(len(s) for s in seqs) == [1, 3]
    assert next_chunk(tokenize, texts, 2, 4, 8, 8) == ([], 2)  # budget spent: nothing consumed
