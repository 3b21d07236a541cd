"""Model registry: one YAML per model under ``configs/models/``; no model names in code.

A spec says where the weights come from, which layer gets the dynamic neuron, how
that layer's MLP is laid out, how to ask the model a question and which text encoder
conditions the generator.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from megedit.paths import CONFIG_DIR

MLPKind = Literal["gated", "ungated"]


@dataclass(frozen=True)
class MLPSpec:
    kind: MLPKind
    layers: str  # dotted path to the list of decoder blocks, e.g. "model.layers"
    module: str  # attribute path of the MLP inside one block, e.g. "mlp"
    activation: str  # a transformers ACT2FN key: "silu", "gelu_new", ...
    # Names of the MLP's projections, for the FT baseline and for documentation.
    projections: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    source: str  # hub id, local path, or pkg-gguf://<python package> for a packaged GGUF
    edit_layer: int
    hidden_size: int
    num_layers: int
    mlp: MLPSpec
    question_template: str  # applied to question-style prompts (ZsRE)
    encoder: str  # hub id, local path or pkg://<package>/<folder>
    dtype: str = "float32"
    neuron_dim: int = 0  # filled from hidden_size and the MLP kind when omitted; checked when given
    # Applied to completion-style prompts (CounterFact). "{prompt}" feeds them as they are; asking them
    # like questions makes every prompt end alike, which is what lets an edit reach its paraphrases.
    completion_template: str = "{prompt}"

    @property
    def neuron_has_bias(self) -> bool:
        # Ungated MLPs (GPT-2/J, Phi) get an extra fc_in row *with its bias*; gated ones get act(h.k).v.
        return self.mlp.kind == "ungated"

    def format_prompt(self, text: str, kind: str) -> str:
        """The exact string the LM sees for a record's prompt of the given kind."""
        if kind == "question":
            return self.question_template.format(question=text)
        if kind == "completion":
            return self.completion_template.format(prompt=text)
        raise ValueError(f"unknown prompt kind {kind!r}; expected 'question' or 'completion'")

    def to_dict(self) -> dict:
        return asdict(self)


class RegistryError(ValueError):
    pass


def available_models(config_dir: Path = CONFIG_DIR) -> list[str]:
    return sorted(p.stem for p in (config_dir / "models").glob("*.yaml"))


def load_model_spec(name_or_path: str | Path, config_dir: Path = CONFIG_DIR) -> ModelSpec:
    """Load a registry entry by name (``smollm2``) or by the path of a YAML file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = config_dir / "models" / f"{name_or_path}.yaml"
    if not path.is_file():
        raise RegistryError(
            f"model {name_or_path!r}: no registry file {path}; known models: {', '.join(available_models(config_dir))}"
        )
    raw = yaml.safe_load(path.read_text())
    return spec_from_dict(raw, where=str(path))


def spec_from_dict(raw: dict, where: str = "<dict>") -> ModelSpec:
    required = ["name", "source", "edit_layer", "hidden_size", "num_layers", "mlp", "question_template", "encoder"]
    missing = [k for k in required if k not in raw]
    if missing:
        raise RegistryError(f"{where}: missing field(s) {missing}; expected all of {required}")
    mlp_raw = dict(raw["mlp"])
    for key in ("kind", "layers", "module", "activation"):
        if key not in mlp_raw:
            raise RegistryError(f"{where}: field 'mlp.{key}' is missing")
    if mlp_raw["kind"] not in ("gated", "ungated"):
        raise RegistryError(f"{where}: field 'mlp.kind' is {mlp_raw['kind']!r}; expected 'gated' or 'ungated'")
    mlp = MLPSpec(**mlp_raw)
    d = int(raw["hidden_size"])
    expected_dim = 2 * d + (1 if mlp.kind == "ungated" else 0)
    given = int(raw.get("neuron_dim", 0) or 0)
    if given and given != expected_dim:
        raise RegistryError(
            f"{where}: field 'neuron_dim' is {given}; a {mlp.kind} MLP with hidden size {d} needs {expected_dim}"
        )
    layer = int(raw["edit_layer"])
    if not 0 <= layer < int(raw["num_layers"]):
        raise RegistryError(f"{where}: field 'edit_layer' {layer} is outside 0..{int(raw['num_layers']) - 1}")
    if "{question}" not in raw["question_template"]:
        raise RegistryError(f"{where}: field 'question_template' must contain '{{question}}'")
    completion_template = raw.get("completion_template", "{prompt}")
    if not isinstance(completion_template, str) or "{prompt}" not in completion_template:
        raise RegistryError(f"{where}: field 'completion_template' must be a string containing '{{prompt}}'")
    fields = {k: raw[k] for k in required if k != "mlp"}
    return ModelSpec(
        **fields, mlp=mlp, dtype=raw.get("dtype", "float32"), neuron_dim=expected_dim,
        completion_template=completion_template,
    )
