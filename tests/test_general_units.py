"""The general-ability stage's pieces on tiny inputs: benchmark readers and their errors, prompt formats,
answer reading, the LM scorers (tiny random Llama, one token per character), the item cache, the summary,
the report and the peers' weight files. The shared benchmark files are read once, whole, for their counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megedit.data.readers import DataFormatError
from megedit.general import bbh, glue, gsm8k, mmlu
from megedit.general.answers import extract, is_correct
from megedit.general.items import Item, seeded_subset


class CharTok:
    """One token per character (printable ASCII and newline): enough tokenizer for the tiny random models."""

    pad_token_id, eos_token_id = 0, 1

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [98 if c == "\n" else ord(c) - 29 for c in text]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join("\n" if i == 98 else chr(i + 29) if 3 <= i < 98 else "?" for i in map(int, ids) if i > 2)

    def batch_decode(self, rows, skip_special_tokens=False):
        return [self.decode(r) for r in rows]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# ---------------------------------------------------------------- readers and prompts
def test_gsm8k_reads_the_final_number_and_names_a_bad_record(tmp_path):
    f = _write(tmp_path / gsm8k.FILE, json.dumps({"question": "2+2?", "answer": "2+2=4\n#### 1,004"}) + "\n")
    [item] = gsm8k.load(tmp_path)
    assert item.gold == "1004" and item.prompt() == "Question: 2+2?\nAnswer: Let's think step by step."
    assert item.query == "2+2?" and not item.choices
    f.write_text(f.read_text() + json.dumps({"question": "x", "answer": "no marker"}) + "\n")
    with pytest.raises(DataFormatError, match=r"test.jsonl: record 1: field 'answer': does not end with '#### "):
        gsm8k.load(tmp_path)
    f.write_text(json.dumps({"question": 3, "answer": "#### 1"}) + "\n")
    with pytest.raises(DataFormatError, match=r"record 0: field 'question': expected non-empty text, got int"):
        gsm8k.load(tmp_path)


def test_rte_and_sst2_use_the_papers_prompts_and_label_words(tmp_path):
    _write(tmp_path / glue.RTE_FILE, json.dumps({"premise": "A cat sat.", "hypothesis": "A cat exists.",
                                                 "label": "entailment", "idx": 0}) + "\n")
    [rte] = glue.load_rte(tmp_path)
    assert rte.prompt() == "A cat sat. entails the A cat exists. True or False? answer:"
    assert rte.choices == (" True", " False") and rte.gold == " True"
    _write(tmp_path / glue.SST2_FILE, "sentence\tlabel\na fine film \t1\n")
    [sst] = glue.load_sst2(tmp_path)
    assert sst.prompt().endswith("\ntext: a fine film\nanswer:") and sst.gold == " positive"
    _write(tmp_path / glue.SST2_FILE, "sentence\tlabel\nmeh\t2\n")
    with pytest.raises(DataFormatError, match=r"dev.tsv: record 0: field 'label': expected one of \['1', '0'\]"):
        glue.load_sst2(tmp_path)
    _write(tmp_path / glue.RTE_FILE, json.dumps({"premise": "p", "hypothesis": "h", "label": "maybe"}) + "\n")
    with pytest.raises(DataFormatError, match="field 'label'"):
        glue.load_rte(tmp_path)


def _mmlu(tmp_path, test_rows: str):
    head = "question,choice0,choice1,choice2,choice3,answer\n"
    _write(tmp_path / mmlu.DIR / "dev" / "high_school_math_dev.csv", head + "1+1?,1,2,3,4,1\n2+2?,4,5,6,7,0\n")
    _write(tmp_path / mmlu.DIR / "test" / "high_school_math_test.csv", head + test_rows)


def test_mmlu_is_five_shot_with_letters(tmp_path):
    _mmlu(tmp_path, '"3+3, really?",5,6,7,8,1\n')
    [item] = mmlu.load(tmp_path)
    assert item.header == "The following are multiple choice questions (with answers) about high school math.\n\n"
    assert item.shots[0] == "1+1?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
    assert item.body == "3+3, really?\nA. 5\nB. 6\nC. 7\nD. 8\nAnswer:"
    assert item.gold == " B" and item.choices == (" A", " B", " C", " D") and item.id == "high_school_math/0"
    assert item.prompt(0) == item.header + item.body and item.prompt().count("Answer:") == 3
    _mmlu(tmp_path, "q,a,b,c,d,4\n")
    with pytest.raises(DataFormatError, match=r"high_school_math_test.csv: record 0: field 'answer': expected 0-3"):
        mmlu.load(tmp_path)


COT_FILE = """canary line
-----
Tell truth from lies.

Q: Is it (A) yes or (B) no?
A: Let's think step by step.
It is yes. So the answer is (A).

Q: 1 + 1 is
A: Let's think step by step.
One and one.
So the answer is 2."""


def test_bbh_exemplars_answer_only_and_chain_of_thought(tmp_path):
    _write(tmp_path / bbh.DIR / "cot-prompts" / "toy.txt", COT_FILE)
    _write(tmp_path / bbh.DIR / "toy.json", json.dumps({"canary": "c", "examples": [{"input": "2 + 2 is", "target": "4"}]}))
    [plain] = bbh.load(tmp_path, "answer_only")
    assert plain.prompt() == ("Tell truth from lies.\n\nQ: Is it (A) yes or (B) no?\nA: (A)\n\nQ: 1 + 1 is\nA: 2\n\n"
                              "Q: 2 + 2 is\nA:")
    assert plain.answer_format == "first_line" and plain.stops == ("\n",) and plain.id == "toy/0"
    [cot] = bbh.load(tmp_path, "cot")
    assert cot.shots[1] == "Q: 1 + 1 is\nA: Let's think step by step.\nOne and one.\nSo the answer is 2.\n\n"
    assert cot.body == "Q: 2 + 2 is\nA: Let's think step by step." and cot.answer_format == "answer_is"
    _write(tmp_path / bbh.DIR / "cot-prompts" / "toy.txt", COT_FILE.replace("So the answer is 2.", "Two."))
    with pytest.raises(DataFormatError, match=r"toy.txt: record 1: needs"):
        bbh.load(tmp_path)


def test_a_missing_benchmark_file_says_where_the_data_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match="General-ability benchmarks"):
        gsm8k.load(tmp_path)


def test_the_shared_benchmarks_load_whole(data_dir):
    from megedit.general.benchmarks import BENCHMARKS, load_benchmark

    counts = {name: load_benchmark(name, data_dir) for name in BENCHMARKS}
    assert {k: len(v) for k, v in counts.items()} == {"bbh": 6511, "gsm8k": 1319, "mmlu": 14042, "rte": 277, "sst2": 872}
    for items in counts.values():
        assert len({it.key for it in items}) == len(items)
    assert {len(it.shots) for it in counts["mmlu"]} == {5} and {len(it.shots) for it in counts["bbh"]} == {3}


def test_the_seeded_subset_is_fixed_and_in_file_order():
    items = [Item("rte", str(i), "q", "b", " True", (" True", " False")) for i in range(50)]
    a, b = seeded_subset(items, 10, seed=0), seeded_subset(items, 10, seed=0)
    assert a == b and len(a) == 10 and [int(i.id) for i in a] == sorted(int(i.id) for i in a)
    assert seeded_subset(items, 10, seed=1) != a
    assert seeded_subset(items, None, 0) == items and seeded_subset(items, 99, 0) == items


# ---------------------------------------------------------------- answers
@pytest.mark.parametrize("fmt, text, answer", [
    ("last_number", " 3 + 4 = 7 apples, so 1,250 dollars.", "1250"),
    ("last_number", "no digits", None),
    ("last_number", "It is -2.5.", "-2.5"),
    ("first_line", "\n (B).\nQ: next", "(B)"),
    ("first_line", "   ", None),
    ("answer_is", "Think... So the answer is (C). The answer is valid.\nQ: x", "valid"),
    ("answer_is", "no conclusion", None),
])
def test_answers_are_read_from_the_continuation(fmt, text, answer):
    assert extract(fmt, text) == answer


def test_answers_are_judged_against_the_reference():
    assert is_correct("last_number", "18.00", "18") and not is_correct("last_number", "17", "18")
    assert not is_correct("last_number", None, "18")
    assert is_correct("first_line", "(B)", "(B)") and is_correct("first_line", "B", "(B)")
    assert is_correct("first_line", "(B) the red one", "(B)") and not is_correct("first_line", "Because", "(B)")
    assert is_correct("first_line", "valid", "valid") and not is_correct("first_line", "invalid", "valid")


# ---------------------------------------------------------------- LM scoring
@pytest.fixture
def tiny(tiny_llama, one_thread):
    from megedit.components.neuron import DynamicNeuron

    model, spec = tiny_llama
    return model, CharTok(), DynamicNeuron(model, spec), spec


def _manual_logprob(model, tok, prompt: str, continuation: str) -> float:
    ids = tok(prompt)["input_ids"] + tok(continuation)["input_ids"]
    logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
    n = len(tok(prompt)["input_ids"])
    return float(sum(logp[p - 1, ids[p]] for p in range(n, len(ids))))


def test_choice_logprobs_match_a_plain_forward_on_both_paths(tiny):
    from megedit.general.lm_scoring import choice_logprobs

    model, tok, neuron, _ = tiny
    prompts = ["Is it so? answer:", "Hi:"]
    for options in ([["A", "B"], ["A", "B"]], [[" yes", " no"], [" yes", " no"]]):  # one token each / several
        got = choice_logprobs(model, tok, neuron, prompts, options, batch_size=2)
        want = [[_manual_logprob(model, tok, p, o) for o in opts] for p, opts in zip(prompts, options)]
        assert torch.allclose(torch.tensor(got), torch.tensor(want), atol=1e-4)


def test_a_zero_neuron_changes_nothing_and_a_real_one_changes_the_scores(tiny):
    from megedit.general.lm_scoring import choice_logprobs

    model, tok, neuron, spec = tiny
    prompts, options = ["Q: a\nA:", "Q: bb\nA:"], [["A", "B"], ["A", "B"]]
    plain = choice_logprobs(model, tok, neuron, prompts, options)
    assert choice_logprobs(model, tok, neuron, prompts, options, torch.zeros(2, spec.neuron_dim)) == plain
    torch.manual_seed(1)
    edited = choice_logprobs(model, tok, neuron, prompts, options, torch.randn(2, spec.neuron_dim) * 3)
    assert edited != plain and neuron.weights is None  # detached after use


def test_generation_is_greedy_and_cut_at_the_stop(tiny):
    from megedit.general.lm_scoring import cut_at_stop, generate

    model, tok, neuron, _ = tiny
    prompts = ["Q: 1\nA:", "Question: longer one\nAnswer:"]
    free = generate(model, tok, neuron, prompts, max_new_tokens=6, batch_size=2)
    alone = generate(model, tok, neuron, prompts[1:], max_new_tokens=6)
    ids = tok(prompts[0])["input_ids"]
    out = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=1)
    assert free[0] == tok.decode(out[0, len(ids):].tolist()) and free[1] == alone[0]
    stop = free[0].strip()[:1]  # a stop string that occurs: the answer ends before it
    if stop:
        assert generate(model, tok, neuron, prompts[:1], max_new_tokens=6, stops=[stop]) == [cut_at_stop(free[0], [stop])]
    assert cut_at_stop("\n 42\nQuestion: next", ["\n"]) == "\n 42"
    assert cut_at_stop("abc", ["\nQ:"]) == "abc" and cut_at_stop("x\nQ: y", ["\nQ:", "y"]) == "x"


def test_answer_items_judges_choices_and_generations(tiny):
    from megedit.general.answering import answer_items, fit_prompt

    model, tok, neuron, _ = tiny
    choice = [Item("rte", "0", "q", "Q: x\nA:", "B", ("A", "B"))]
    [row] = answer_items(model, tok, neuron, choice, ["Q: x\nA:"], None, 0, 4)
    assert row["prediction"] in ("A", "B") and row["correct"] == (row["prediction"] == "B") and len(row["output"]) == 2
    gen = [Item("gsm8k", "0", "q", "Q: 1\nA:", "7", answer_format="last_number", stops=("\n",))]
    [row] = answer_items(model, tok, neuron, gen, ["Q: 1\nA:"], None, 4, 4)
    assert isinstance(row["output"], str) and row["prediction"] == extract("last_number", row["output"])
    with pytest.raises(ValueError, match="one benchmark"):
        answer_items(model, tok, neuron, choice + gen, ["a", "b"], None, 4, 4)
    shots = Item("mmlu", "0", "q", "Q?", " A", (" A", " B"), header="H\n", shots=("x" * 20, "y" * 20))
    assert fit_prompt(tok, shots, None) == (shots.prompt(), 2)
    assert fit_prompt(tok, shots, 30) == ("H\n" + "x" * 20 + "Q?", 1) and fit_prompt(tok, shots, 5)[1] == 0


# ---------------------------------------------------------------- cache, summary, report
def test_item_cache_resumes_and_ignores_other_fingerprints(tmp_path):
    from megedit.general.item_cache import ItemCache

    cache = ItemCache(tmp_path)
    cache.add("base", [{"key": "rte/0", "fingerprint": "f1", "correct": True}])
    with open(tmp_path / "base.jsonl", "a") as f:
        f.write('{"key": "rte/1", "finger')  # a kill mid-line
    fresh = ItemCache(tmp_path)
    assert fresh.get("base", "f1", "rte/0")["correct"] and fresh.get("base", "f2", "rte/0") is None
    assert fresh.get("base", "f1", "rte/1") is None
    fresh.add("base", [{"key": "rte/1", "fingerprint": "f1", "correct": False}])
    assert ItemCache(tmp_path).get("base", "f1", "rte/1") == {"key": "rte/1", "fingerprint": "f1", "correct": False}


def _rows(variant, correct, predictions, routed=None):
    return [{"key": f"rte/{i}", "benchmark": "rte", "variant": variant, "correct": c, "prediction": p,
             "routed": None if routed is None else routed[i]} for i, (c, p) in enumerate(zip(correct, predictions))]


def _summary(tmp_path=None):
    from megedit.general.summary import PROTOCOLS, summarise

    rows = {"base": _rows("base", [True, False, True, True], ["a", "b", "a", "a"]),
            "meg": _rows("meg", [True, False, False, True], ["a", "b", "b", "a"], [False, False, True, False])}
    return {"lineage": {"model": "m", "dataset": "d"}, "n_edits": 12, "results": summarise(rows, ["rte"]),
            "settings": {"items": {"rte": 4}, "of": {"rte": 277}, "seed": 0, "protocols": PROTOCOLS,
                         "meg": {"route_on": "item", "router_threshold": 0.3, "sampler": "ddim", "steps": 50}},
            "peers": {}}


def test_summary_counts_accuracy_changes_and_routing():
    from megedit.general.summary import wilson

    res = _summary()["results"]
    assert res["base"]["rte"] == {"accuracy": 75.0, "correct": 3, "n": 4, "ci95": wilson(3, 4)}
    assert res["meg"]["rte"]["accuracy"] == 50.0 and res["meg"]["rte"]["changed_vs_base"] == 1
    assert res["meg"]["rte"]["routed"] == 1 and res["meg"]["average"] == 50.0
    lo, hi = wilson(100, 200)
    assert lo < 50 < hi and hi - lo == pytest.approx(13.7, abs=0.2)


def test_report_is_shaped_like_table_3(tmp_path):
    from megedit.general.artifact import read_results, read_table, write_results

    write_results(tmp_path, _summary(), [])
    assert read_results(tmp_path) == _summary()
    text = read_table(tmp_path)
    assert "| Variant | RTE | Average |" in text and "| Before edit (base LM) | 75.00 | **75.00** |" in text
    assert "| MeG | 1 (routed 1) |" in text and "RTE 4 of 277" in text
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"


# ---------------------------------------------------------------- peers' weights
class _FakeEdited:
    def __init__(self, n):
        from types import SimpleNamespace

        self.prepared = SimpleNamespace(lineage={"model": "m", "n": n}, edits=list(range(n)))


def test_peer_weights_round_trip_and_refuse_another_run(tmp_path):
    from megedit.artifacts import ArtifactError
    from megedit.evaluate.artifact import load_peer_weights, peer_file, save_peer_weights
    from megedit.general.peer_weights import peer_weights

    lineage, w = {"model": "m", "n": 4}, {"model.layers.1.mlp.down_proj.weight": torch.randn(3, 2)}
    save_peer_weights(peer_file(tmp_path / "a", "memit"), "memit", w, lineage, 4, {"layers": [1]})
    got = load_peer_weights(peer_file(tmp_path / "a", "memit"), "memit", lineage, 4)
    assert torch.equal(got["model.layers.1.mlp.down_proj.weight"], w["model.layers.1.mlp.down_proj.weight"])
    for method, lin, n in (("ft", lineage, 4), ("memit", {"model": "other"}, 4), ("memit", lineage, 5)):
        with pytest.raises(ArtifactError, match="not the"):
            load_peer_weights(peer_file(tmp_path / "a", "memit"), method, lin, n)
    # found in the first folder that has it: nothing is computed
    found = peer_weights(["memit"], _FakeEdited(4), tmp_path / "run", [tmp_path / "none", tmp_path / "a"], tmp_path / "c")
    assert found["memit"][1] == peer_file(tmp_path / "a", "memit") and not (tmp_path / "c").exists()


def test_peers_are_edited_as_the_evaluate_stage_edited_them(tmp_path):
    from megedit.general.peer_weights import evaluate_options

    options, limit = evaluate_options(tmp_path)  # no evaluate stage yet: its code defaults
    assert options["ft_epochs"] == 30 and options["seed"] == 0 and limit is None
    _write(tmp_path / "evaluate" / "manifest.json", json.dumps(
        {"config": {"model": {"ft_epochs": 3, "peer_stats_texts": 16, "variants": ["meg"]}, "data": {"limit": 8}}}))
    options, limit = evaluate_options(tmp_path)
    assert options["ft_epochs"] == 3 and options["peer_stats_texts"] == 16 and "variants" not in options and limit == 8


def test_batches_never_mix_benchmarks_and_cover_each_item_once(tmp_path):
    from megedit.general.general_datamodule import GeneralDataModule

    _write(tmp_path / glue.RTE_FILE, "".join(json.dumps({"premise": f"p{i}", "hypothesis": "h", "label": "entailment"})
                                             + "\n" for i in range(5)))
    _write(tmp_path / glue.SST2_FILE, "sentence\tlabel\n" + "".join(f"s{'x' * i}\t0\n" for i in range(3)))
    dm = GeneralDataModule(run_dir="unused", benchmarks=["rte", "sst2"], items_per_benchmark=4, data_dir=str(tmp_path),
                           batch_size=2)
    batches = list(dm.test_dataloader())
    assert all(len({it.benchmark for it in b}) == 1 for b in batches) and all(len(b) <= 2 for b in batches)
    keys = [it.key for b in batches for it in b]
    assert len(keys) == len(set(keys)) == 4 + 3 and dm.totals == {"rte": 5, "sst2": 3}
    assert set(dm.input_files) == {"general/rte/val.jsonl", "general/sst2/dev.tsv"}
    with pytest.raises(ValueError, match="unknown benchmarks"):
        GeneralDataModule(benchmarks=["squad"])
