"""Every shipped model file parses and is self-consistent; bad entries are refused clearly."""

from __future__ import annotations

import pytest
import yaml

from megedit.paths import CONFIG_DIR
from megedit.registry import RegistryError, available_models, load_model_spec, spec_from_dict

PAPER_LAYERS = {"phi2": 29, "gptj": 9, "llama3": 14}


def test_all_required_models_are_registered():
    assert {"smollm2", "gpt2-xl", "phi2", "gptj", "llama3"} <= set(available_models())


@pytest.mark.parametrize("name", available_models())
def test_model_files_parse_with_consistent_neuron_dim(name):
    spec = load_model_spec(name)
    extra = 1 if spec.mlp.kind == "ungated" else 0
    assert spec.neuron_dim == 2 * spec.hidden_size + extra
    assert "{question}" in spec.question_template and spec.encoder
    if name in PAPER_LAYERS:
        assert spec.edit_layer == PAPER_LAYERS[name]
        assert spec.encoder == "bert-base-uncased"


def test_paper_neuron_sizes():
    assert load_model_spec("phi2").neuron_dim == 5121
    assert load_model_spec("gptj").neuron_dim == 8193
    assert load_model_spec("llama3").neuron_dim == 8192


def base():
    return yaml.safe_load((CONFIG_DIR / "models" / "smollm2.yaml").read_text())


@pytest.mark.parametrize("change,message", [
    ({"neuron_dim": 1153}, "field 'neuron_dim' is 1153; a gated MLP with hidden size 576 needs 1152"),
    ({"edit_layer": 30}, "field 'edit_layer' 30 is outside 0..29"),
    ({"question_template": "Q:"}, "must contain '{question}'"),
    ({"mlp": {"kind": "moe", "layers": "x", "module": "y", "activation": "silu"}}, "field 'mlp.kind' is 'moe'"),
])
def test_bad_registry_entries(change, message):
    raw = {**base(), **change}
    with pytest.raises(RegistryError, match=message.replace("(", r"\(").replace(")", r"\)").replace("{", r"\{").replace("}", r"\}")):
        spec_from_dict(raw, where="x.yaml")


def test_unknown_model_lists_known_ones():
    with pytest.raises(RegistryError, match="known models: .*smollm2"):
        load_model_spec("nope")


def test_prompt_formatting():
    spec = load_model_spec("phi2")
    assert spec.format_prompt("Who?", "question").startswith("Instruct:Answer the following question")
    assert spec.format_prompt("Paris is in", "completion").endswith("Paris is in\nOutput:")
    assert load_model_spec("gptj").format_prompt("Paris is in", "completion") == "Paris is in"
    smol = load_model_spec("smollm2").format_prompt("Paris is in", "completion")
    assert smol.startswith("Question: ") and smol.endswith("Paris is in\nAnswer:")


def test_completion_template_needs_its_placeholder(tmp_path):
    import yaml
    raw = yaml.safe_load(open(CONFIG_DIR / "models" / "smollm2.yaml"))
    raw["completion_template"] = "Q: {question}"
    with pytest.raises(RegistryError, match="completion_template"):
        spec_from_dict(raw, where="x.yaml")
