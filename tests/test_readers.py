"""Each reader on small records written here, format detection, and the exact bad-input errors."""

from __future__ import annotations

import json

import pytest

from megedit.data.readers import DataFormatError, FORMATS, read_file

CF_EASYEDIT = {"case_id": 7, "prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
               "target_new": "English", "ground_truth": "French",
               "rephrase_prompt": "Where Danielle Darrieux is from, people speak",
               "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"}
CF_ROME = {"case_id": 3, "requested_rewrite": {"prompt": "{} originates from", "subject": "Spike Hughes",
                                               "target_new": {"str": "Philadelphia"}, "target_true": {"str": "London"}},
           "paraphrase_prompts": ["Spike Hughes is native to", "Spike Hughes was born in"],
           "neighborhood_prompts": ["Max Mosley originates from", "Lita Ford was native to"],
           "portability": {"New Question": "Which food is Spike Hughes' city known for?", "New Answer": "Cheesesteaks"}}
ZSRE_MEND = {"subject": "UniFirst", "src": "What is the product made by UniFirst?", "rephrase": "What does UniFirst make?",
             "alt": "unmanned aircraft", "answers": ["uniform"], "loc": "nq question: who wrote hamlet",
             "loc_ans": "Shakespeare"}
ZSRE_KNOWEDIT = {"subject": "Epaspidoceras", "prompt": "Which family does Epaspidoceras belong to?",
                 "target_new": "Noctuidae", "ground_truth": ["Aspidoceratidae"],
                 "rephrase_prompt": "What family are Epaspidoceras?",
                 "locality": {"Relation_Specificity": [{"prompt": "The taxon rank of Epaspidoceras is",
                                                        "ground_truth": ["genus"]}]},
                 "portability": {"Reasoning": [{"prompt": "Common name of that family?", "ground_truth": "Owlet moths"}]}}
MQUAKE = {"case_id": 11, "requested_rewrite": [
    {"prompt": "{} was performed by", "subject": "Hey Jude", "target_new": {"str": "Madonna"},
     "target_true": {"str": "The Beatles"}, "question": "Who performed Hey Jude?"},
    {"prompt": "{} is a citizen of", "subject": "Madonna", "target_new": {"str": "India"},
     "target_true": {"str": "USA"}}],
    "questions": ["Which country is the performer of Hey Jude a citizen of?"], "new_answer": "India"}
PARAPHRASES = {"edit": "Carl Sagan is employed by the BBC",
               "questions": ["Who employs Carl Sagan?", "Where does Carl Sagan work?"]}


def write(tmp_path, rows, name="data.json"):
    path = tmp_path / name
    path.write_text(json.dumps(rows))
    return path


@pytest.mark.parametrize("row,fmt", [(CF_EASYEDIT, "counterfact_easyedit"), (CF_ROME, "counterfact_rome"),
                                     (ZSRE_MEND, "zsre_mend"), (ZSRE_KNOWEDIT, "zsre_knowedit"),
                                     (MQUAKE, "mquake"), (PARAPHRASES, "paraphrase_groups")])
def test_format_is_detected(tmp_path, row, fmt):
    detected, records = read_file(write(tmp_path, [row]), "auto")
    assert detected == fmt and records


def test_counterfact_easyedit_record(tmp_path):
    _, [rec] = read_file(write(tmp_path, [CF_EASYEDIT], "cf.json"))
    assert rec.id == "cf:7" and rec.prompt_kind == "completion"
    assert (rec.subject, rec.target_new, rec.target_true) == ("Danielle Darrieux", "English", "French")
    assert rec.paraphrases == ["Where Danielle Darrieux is from, people speak"]
    assert rec.locality[0].prompt == "Michel Rocard is a native speaker of" and rec.locality[0].answer == "French"


def test_counterfact_rome_record_fills_the_template(tmp_path):
    _, [rec] = read_file(write(tmp_path, [CF_ROME], "rome.json"))
    assert rec.prompt == "Spike Hughes originates from" and rec.target_new == "Philadelphia"
    assert len(rec.paraphrases) == 2 and [p.answer for p in rec.locality] == ["London", "London"]
    assert rec.portability[0].answer == "Cheesesteaks"


def test_zsre_mend_and_knowedit_records(tmp_path):
    _, [mend] = read_file(write(tmp_path, [ZSRE_MEND], "mend.json"))
    assert mend.prompt_kind == "question" and mend.target_new == "unmanned aircraft" and mend.target_true == "uniform"
    assert mend.locality[0].answer == "Shakespeare" and mend.paraphrases == ["What does UniFirst make?"]
    _, [ke] = read_file(write(tmp_path, [ZSRE_KNOWEDIT], "ke.json"))
    assert ke.target_true == "Aspidoceratidae" and ke.locality[0].answer == "genus"
    assert ke.portability[0].answer == "Owlet moths"


def test_mquake_gives_one_record_per_instance_with_its_atoms(tmp_path):
    row = dict(MQUAKE, new_answer_alias=["Republic of India"], single_hops=[
        {"question": "Who performed Hey Jude?", "cloze": "Hey Jude was performed by", "answer": "The Beatles"},
        {"question": "Which country is The Beatles from?", "cloze": "The Beatles is a citizen of", "answer": "UK"}])
    _, [rec] = read_file(write(tmp_path, [row], "mq.json"))
    assert rec.id == "mq:11" and rec.prompt == "Hey Jude was performed by" and rec.target_new == "Madonna"
    assert rec.paraphrases == ["Who performed Hey Jude?"]
    assert [(a.prompt, a.subject, a.target_new, a.target_true) for a in rec.atoms] == [
        ("Madonna is a citizen of", "Madonna", "India", "USA")]
    assert [a.target_new for a in rec.all_atoms()] == ["Madonna", "India"]
    hop = rec.multi_hop[0]
    assert (hop.answer, hop.aliases, hop.kind) == ("India", ["Republic of India"], "question")
    # the edited hop is no locality prompt; the unedited one is, with its original answer
    assert [(p.prompt, p.answer) for p in rec.locality] == [("The Beatles is a citizen of", "UK")]


def test_mquake_record_round_trips_through_dict(tmp_path):
    from megedit.data.records import EditRecord

    _, [rec] = read_file(write(tmp_path, [MQUAKE], "mq.json"))
    assert EditRecord.from_dict(rec.to_dict()) == rec


def test_mquake_questions_without_new_answer_name_the_field(tmp_path):
    row = {k: v for k, v in MQUAKE.items() if k != "new_answer"}
    with pytest.raises(DataFormatError, match=r"mq.json: record 0 \(case_id=11\): field 'new_answer': is missing, "
                                              "but 'questions' is given"):
        read_file(write(tmp_path, [row], "mq.json"))
    bad = dict(MQUAKE, single_hops=[{"question": "q", "cloze": "", "answer": "x"}])
    with pytest.raises(DataFormatError, match=r"field 'single_hops\[0\].cloze'"):
        read_file(write(tmp_path, [bad], "mq.json"))


def test_format_override_is_honoured(tmp_path):
    with pytest.raises(DataFormatError, match="field 'src': is missing"):
        read_file(write(tmp_path, [CF_EASYEDIT]), "zsre_mend")
    with pytest.raises(ValueError, match="unknown format 'nope'"):
        read_file(write(tmp_path, [CF_EASYEDIT]), "nope")
    assert "counterfact_easyedit" in FORMATS


def broken(base, **changes):
    row = json.loads(json.dumps(base))
    for key, value in changes.items():
        if value is KeyError:
            row.pop(key)
        else:
            row[key] = value
    return row


@pytest.mark.parametrize("base,row,expected", [
    (CF_EASYEDIT, broken(CF_EASYEDIT, target_new=KeyError), "record 1 (case_id=7): field 'target_new': is missing"),
    (CF_EASYEDIT, broken(CF_EASYEDIT, subject=5), "record 1 (case_id=7): field 'subject': expected a string, got int 5"),
    (CF_EASYEDIT, broken(CF_EASYEDIT, prompt="  "), "field 'prompt': expected a non-empty string, got an empty one"),
    (CF_EASYEDIT, broken(CF_EASYEDIT, subject="Nobody"), "field 'prompt': expected the subject 'Nobody' to occur"),
    (CF_ROME, broken(CF_ROME, requested_rewrite={**CF_ROME["requested_rewrite"], "prompt": "Spike originates from"}),
     "record 1 (case_id=3): field 'requested_rewrite.prompt': expected a template with '{}'"),
    (CF_ROME, broken(CF_ROME, paraphrase_prompts=["ok", ""]), "field 'paraphrase_prompts[1]': expected a non-empty string"),
    (ZSRE_KNOWEDIT, broken(ZSRE_KNOWEDIT, ground_truth=[]), "record 1: field 'ground_truth': expected a string or a non-empty list"),
    (ZSRE_MEND, broken(ZSRE_MEND, alt=3), "record 1: field 'alt': expected a non-empty string, got 3"),
])
def test_bad_records_name_file_record_and_field(tmp_path, base, row, expected):
    path = write(tmp_path, [base, row], "bad.json")
    with pytest.raises(DataFormatError) as err:
        read_file(path)
    assert str(err.value).startswith(f"{path}: record 1")
    assert expected in str(err.value)


def test_invalid_json_reports_line_and_column(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"subject": "a",\n   "prompt": }\n]')
    with pytest.raises(DataFormatError, match=r"broken.json: invalid JSON at line 3, column 14"):
        read_file(path)
    jsonl = tmp_path / "broken.jsonl"
    jsonl.write_text(json.dumps(CF_EASYEDIT) + "\n{oops\n")
    with pytest.raises(DataFormatError, match=r"broken.jsonl: invalid JSON at line 2, column 2"):
        read_file(jsonl)


def test_unknown_and_non_list_files_are_refused(tmp_path):
    with pytest.raises(DataFormatError, match="cannot tell the format from the keys \\['foo'\\]"):
        read_file(write(tmp_path, [{"foo": 1}]))
    with pytest.raises(DataFormatError, match="expected a JSON list of records at the top level, got dict"):
        read_file(write(tmp_path, {"a": 1}))
    with pytest.raises(DataFormatError, match="record 0: expected a JSON object, got list"):
        read_file(write(tmp_path, [[1, 2]]))


def test_drop_mode_reports_each_invalid_record(tmp_path):
    path = write(tmp_path, [CF_EASYEDIT, broken(CF_EASYEDIT, target_new=""), CF_EASYEDIT], "mixed.json")
    invalid: list = []
    _, recs = read_file(path, on_invalid="drop", invalid=invalid)
    assert len(recs) == 2 and [i for i, _ in invalid] == [1]
    assert "record 1 (case_id=7): field 'target_new': expected a non-empty string" in invalid[0][1]
