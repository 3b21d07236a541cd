"""The strict input schemas of the readers (docs/input-checks.md): types, templates, BOM, JSON Lines."""

from __future__ import annotations

import copy
import json
import re

import pytest

from megedit.data.readers import READERS, DataFormatError, read_file
from test_readers import CF_EASYEDIT, CF_ROME, MQUAKE, PARAPHRASES, ZSRE_KNOWEDIT, ZSRE_MEND, broken, write

RW = CF_ROME["requested_rewrite"]


def rewrite(**changes):
    """CF_ROME with its requested_rewrite changed."""
    return broken(CF_ROME, requested_rewrite={**RW, **changes})


def mquake_rewrite(j, **changes):
    row = copy.deepcopy(MQUAKE)
    row["requested_rewrite"][j].update(changes)
    return row


# (base row, bad row, format, text the error must hold after "record 1 (...): ")
WRONG_TYPES = [
    # EasyEdit CounterFact
    (CF_EASYEDIT, broken(CF_EASYEDIT, rephrase_prompt=["a", "b"]), "counterfact_easyedit",
     "field 'rephrase_prompt': expected a string, got list"),
    (CF_EASYEDIT, broken(CF_EASYEDIT, subject=None), "counterfact_easyedit",
     "field 'subject': expected a string, got null"),
    (CF_EASYEDIT, broken(CF_EASYEDIT, prompt=3), "counterfact_easyedit",
     "field 'prompt': expected a string, got int 3"),
    (CF_EASYEDIT, broken(CF_EASYEDIT, target_new=None), "counterfact_easyedit",
     "field 'target_new': expected a non-empty string, got null"),
    (CF_EASYEDIT, broken(CF_EASYEDIT, ground_truth=["French", 3]), "counterfact_easyedit",
     "field 'ground_truth[1]': expected a non-empty string, got 3"),
    (CF_EASYEDIT, broken(CF_EASYEDIT, locality_prompt=None), "counterfact_easyedit",
     "field 'locality_prompt': expected a string, got null"),
    (CF_EASYEDIT, broken(CF_EASYEDIT, locality_prompt=KeyError), "counterfact_easyedit",
     "field 'locality_prompt': is missing, but 'locality_ground_truth' is given"),
    (CF_EASYEDIT, broken(CF_EASYEDIT, case_id=7.5), "counterfact_easyedit",
     "field 'case_id': expected an integer or a non-empty string, got float 7.5"),
    (CF_EASYEDIT, broken(CF_EASYEDIT, case_id=True), "counterfact_easyedit",
     "field 'case_id': expected an integer or a non-empty string, got bool true"),
    # ROME/MEMIT CounterFact
    (CF_ROME, broken(CF_ROME, paraphrase_prompts="Spike Hughes is native to"), "counterfact_rome",
     "field 'paraphrase_prompts': expected a list of strings, got str 'Spike Hughes is native to'"),
    (CF_ROME, broken(CF_ROME, neighborhood_prompts=None), "counterfact_rome",
     "field 'neighborhood_prompts': expected a list of strings, got null"),
    (CF_ROME, broken(CF_ROME, paraphrase_prompts=["ok", 4]), "counterfact_rome",
     "field 'paraphrase_prompts[1]': expected a string, got int 4"),
    (CF_ROME, rewrite(target_new="Philadelphia"), "counterfact_rome",
     "field 'requested_rewrite.target_new': expected an object, got str 'Philadelphia'"),
    (CF_ROME, rewrite(target_new={"str": 12}), "counterfact_rome",
     "field 'requested_rewrite.target_new.str': expected a string, got int 12"),
    (CF_ROME, rewrite(target_true=None), "counterfact_rome",
     "field 'requested_rewrite.target_true': expected an object, got null"),
    (CF_ROME, rewrite(subject=["Spike Hughes"]), "counterfact_rome",
     "field 'requested_rewrite.subject': expected a string, got list"),
    (CF_ROME, broken(CF_ROME, requested_rewrite="{} originates from"), "counterfact_rome",
     "field 'requested_rewrite': expected an object, got str"),
    (CF_ROME, broken(CF_ROME, portability={"New Question": "Which food?", "New Answer": None}), "counterfact_rome",
     "field 'portability.New Answer': expected a string, got null"),
    (CF_ROME, broken(CF_ROME, portability="Cheesesteaks"), "counterfact_rome",
     "field 'portability': expected an object of lists of {prompt, ground_truth}, got str"),
    # MEND ZsRE
    (ZSRE_MEND, broken(ZSRE_MEND, rephrase=["What does UniFirst make?"]), "zsre_mend",
     "field 'rephrase': expected a string, got list"),
    (ZSRE_MEND, broken(ZSRE_MEND, src=None), "zsre_mend", "field 'src': expected a string, got null"),
    (ZSRE_MEND, broken(ZSRE_MEND, loc=5), "zsre_mend", "field 'loc': expected a string, got int 5"),
    (ZSRE_MEND, broken(ZSRE_MEND, answers=[]), "zsre_mend", "field 'answers': expected a string or a non-empty list"),
    (ZSRE_MEND, broken(ZSRE_MEND, loc=KeyError), "zsre_mend", "field 'loc': is missing, but 'loc_ans' is given"),
    # KnowEdit ZsRE
    (ZSRE_KNOWEDIT, broken(ZSRE_KNOWEDIT, locality=None), "zsre_knowedit",
     "field 'locality': expected an object of lists of {prompt, ground_truth}, got null"),
    (ZSRE_KNOWEDIT, broken(ZSRE_KNOWEDIT, locality={"Relation_Specificity": "genus"}), "zsre_knowedit",
     "field 'locality.Relation_Specificity': expected a list of {prompt, ground_truth} objects, got str"),
    (ZSRE_KNOWEDIT, broken(ZSRE_KNOWEDIT, locality={"R": ["The taxon rank is"]}), "zsre_knowedit",
     "field 'locality.R[0]': expected an object, got str"),
    (ZSRE_KNOWEDIT, broken(ZSRE_KNOWEDIT, locality={"R": [{"prompt": "rank?", "ground_truth": [[5]]}]}),
     "zsre_knowedit",
     "field 'locality.R[0].ground_truth[0][0]': expected a non-empty string, got 5"),
    (ZSRE_KNOWEDIT, broken(ZSRE_KNOWEDIT, rephrase_prompt=1), "zsre_knowedit",
     "field 'rephrase_prompt': expected a string, got int 1"),
    # MQuAKE
    (MQUAKE, broken(MQUAKE, questions="Which country?"), "mquake",
     "field 'questions': expected a list of strings, got str"),
    (MQUAKE, broken(MQUAKE, new_answer=3), "mquake", "field 'new_answer': expected a string, got int 3"),
    (MQUAKE, broken(MQUAKE, requested_rewrite=[]), "mquake",
     "field 'requested_rewrite': expected a non-empty list of rewrites, got list []"),
    (MQUAKE, broken(MQUAKE, requested_rewrite=[MQUAKE["requested_rewrite"][0], "Madonna is a citizen of India"]),
     "mquake", "field 'requested_rewrite[1]': expected an object, got str"),
    (MQUAKE, mquake_rewrite(0, question=["Who performed Hey Jude?"]), "mquake",
     "field 'requested_rewrite[0].question': expected a string, got list"),
    # paraphrase corpus
    (PARAPHRASES, broken(PARAPHRASES, questions="Who employs Carl Sagan?"), "paraphrase_groups",
     "field 'questions': expected a list of strings, got str"),
    (PARAPHRASES, broken(PARAPHRASES, questions=["Who employs Carl Sagan?", None]), "paraphrase_groups",
     "field 'questions[1]': expected a string, got null"),
    (PARAPHRASES, broken(PARAPHRASES, edit=5), "paraphrase_groups", "field 'edit': expected a string, got int 5"),
]


@pytest.mark.parametrize("base,row,fmt,expected", WRONG_TYPES)
def test_a_wrong_type_names_file_record_field_and_expectation(tmp_path, base, row, fmt, expected):
    path = write(tmp_path, [base, row], "bad.json")
    with pytest.raises(DataFormatError) as err:
        read_file(path, fmt)
    assert str(err.value).startswith(f"{path}: record 1")
    assert expected in str(err.value)


def test_the_case_id_is_named_with_the_record():
    with pytest.raises(DataFormatError, match=r"x.json: record 0 \(case_id=3\): field 'paraphrase_prompts'"):
        READERS["counterfact_rome"]([broken(CF_ROME, paraphrase_prompts="one")], "x.json")


@pytest.mark.parametrize("fmt,row,field,holes", [
    ("counterfact_rome", rewrite(prompt="Spike Hughes originates from"), "requested_rewrite.prompt", 0),
    ("counterfact_rome", rewrite(prompt="{} moved from {} to"), "requested_rewrite.prompt", 2),
    ("mquake", mquake_rewrite(1, prompt="Madonna is a citizen of"), "requested_rewrite[1].prompt", 0),
    ("mquake", mquake_rewrite(1, prompt="{} and {} are citizens of"), "requested_rewrite[1].prompt", 2),
])
def test_a_template_needs_exactly_one_subject_slot(tmp_path, fmt, row, field, holes):
    with pytest.raises(DataFormatError, match=rf"record 0 .*field '{re.escape(field)}': expected a template with "
                                              rf"'{{}}' exactly once, where the subject goes; got {holes} in"):
        read_file(write(tmp_path, [row]), fmt)


def test_a_missing_key_still_reads_as_missing_and_null_as_a_type_error(tmp_path):
    with pytest.raises(DataFormatError, match="field 'src': is missing"):
        read_file(write(tmp_path, [broken(ZSRE_MEND, src=KeyError)]), "zsre_mend")
    with pytest.raises(DataFormatError, match="field 'src': expected a string, got null"):
        read_file(write(tmp_path, [broken(ZSRE_MEND, src=None)]), "zsre_mend")


def test_answers_may_be_a_string_or_a_list_of_aliases(tmp_path):
    rows = [broken(ZSRE_MEND, answers="uniform"), broken(ZSRE_MEND, answers=[["uniform", "uniforms"]])]
    _, recs = read_file(write(tmp_path, rows), "zsre_mend")
    assert [r.target_true for r in recs] == ["uniform", "uniform"]


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_byte_order_mark_is_skipped(tmp_path, suffix):
    rows = [CF_EASYEDIT, CF_EASYEDIT]
    text = json.dumps(rows) if suffix == ".json" else "\n".join(json.dumps(r) for r in rows)
    plain, bom = tmp_path / f"plain{suffix}", tmp_path / f"bom{suffix}"
    plain.write_text(text, encoding="utf-8")
    bom.write_text(text, encoding="utf-8-sig")
    assert bom.read_bytes().startswith(b"\xef\xbb\xbf")
    fmt, recs = read_file(bom)
    assert fmt == "counterfact_easyedit" and [r.to_dict() for r in recs] == [
        {**r.to_dict(), "id": r.id.replace("plain", "bom"), "source": str(bom)} for r in read_file(plain)[1]]


def test_a_file_that_is_not_utf8_is_refused(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(json.dumps([CF_EASYEDIT]).replace("Darrieux", "Darri\u00e9ux").encode("latin-1"))
    with pytest.raises(DataFormatError, match=r"latin1.json: expected UTF-8 text, got byte 0xe9 at offset \d+"):
        read_file(path)


@pytest.mark.parametrize("name", ["cf.jsonl", "cf.json"])
def test_json_lines_are_read_as_records(tmp_path, name):
    odd = broken(CF_EASYEDIT, rephrase_prompt="Danielle Darrieux\u2028speaks")  # U+2028 is no line break in JSON
    path = tmp_path / name
    path.write_text(json.dumps(CF_EASYEDIT) + "\n\n" + json.dumps(odd, ensure_ascii=False) + "\r\n", encoding="utf-8")
    fmt, recs = read_file(path)
    assert fmt == "counterfact_easyedit" and len(recs) == 2 and recs[1].paraphrases == [odd["rephrase_prompt"]]


def test_broken_json_lines_in_a_json_file_say_they_look_like_json_lines(tmp_path):
    path = tmp_path / "cf.json"
    path.write_text(json.dumps(CF_EASYEDIT) + "\n" + json.dumps(CF_EASYEDIT) + "\n{oops\n")
    with pytest.raises(DataFormatError, match=r"cf.json: invalid JSON at line 3, column 2: .*looks like JSON Lines"):
        read_file(path)


def test_one_record_alone_in_a_json_file_hints_at_jsonl(tmp_path):
    with pytest.raises(DataFormatError, match=r"got dict \(if this is JSON Lines holding one record, name the file"):
        read_file(write(tmp_path, CF_EASYEDIT))
    jsonl = tmp_path / "one.jsonl"
    jsonl.write_text(json.dumps(CF_EASYEDIT) + "\n")
    assert len(read_file(jsonl)[1]) == 1


def test_a_bad_rewrite_loses_its_whole_mquake_case_and_nothing_else(tmp_path):
    bad = mquake_rewrite(1, target_new="India")  # the first rewrite is fine, the second is not
    path = write(tmp_path, [MQUAKE, bad], "mq.json")
    with pytest.raises(DataFormatError, match=r"record 1 \(case_id=11\): field 'requested_rewrite\[1\].target_new'"):
        read_file(path)
    invalid: list = []
    _, recs = read_file(path, on_invalid="drop", invalid=invalid)
    assert [r.id for r in recs] == ["mq:11"] and [i for i, _ in invalid] == [1]


@pytest.mark.parametrize("fmt,row,field", [
    ("counterfact_easyedit", CF_EASYEDIT, "subject"), ("counterfact_rome", CF_ROME, "paraphrase_prompts"),
    ("zsre_mend", ZSRE_MEND, "subject"), ("zsre_knowedit", ZSRE_KNOWEDIT, "subject"), ("mquake", MQUAKE, "questions"),
    ("paraphrase_groups", PARAPHRASES, "questions")])
def test_readers_only_read(fmt, row, field):
    rows = [copy.deepcopy(row), broken(row, **{field: 5})]
    before = copy.deepcopy(rows)
    with pytest.raises(DataFormatError, match=f"record 1.*field '{field}'"):
        READERS[fmt](rows, "x.json")
    assert READERS[fmt](rows[:1], "x.json") and rows == before
