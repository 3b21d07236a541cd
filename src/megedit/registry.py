"""Model registry: one YAML per model under ``configs/models/``; no model names in code.

A spec says where the weights come from, which layer gets the dynamic neuron, how
that layer's MLP is laid out, how to ask the model a question and which text encoder
conditions the generator.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
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
    # Names of the MLP's projections: the MEMIT / AlphaEdit baselines edit "down" (gated) or "fc_out"
    # (ungated); the rest are documentation.
    projections: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class MemitSpec:
    """MEMIT / AlphaEdit batch-editing hyper-parameters of one model (section ``memit:`` of its YAML).

    The defaults are the published GPT-J settings of MEMIT (and AlphaEdit's null-space threshold and L2),
    except the context prefixes and the statistics budget, which are sized for a CPU; docs/baselines.md
    says what each one does.
    """

    layers: tuple[int, ...]  # edited layers, ascending; the target value z is optimised at the last one
    clamp_norm_factor: float = 0.75  # |z - h| <= factor * |h| at the last edited layer
    mom2_weight: float = 15000.0  # MEMIT: weight of E[k k^T] against the edits' K K^T
    v_num_grad_steps: int = 25  # Adam steps of the z optimisation (it stops earlier below a loss of 0.05)
    v_lr: float = 0.5
    v_weight_decay: float = 0.5  # penalty on |delta| / |h|^2
    kl_factor: float = 0.0625  # KL to the unedited LM at the subject of "{subject} is a"; 0 switches it off
    context_prefixes: int = 2  # generated prefixes (0..5) the keys and the z loss average over (MEMIT: 5)
    context_prefix_tokens: int = 10  # length of each generated prefix
    nullspace_threshold: float = 2e-2  # AlphaEdit: eigenvalues of E[k k^T] below this span the null space
    alphaedit_l2: float = 10.0  # AlphaEdit: ridge term of the projected solve (> 0)
    mom2_n_texts: int = 1000  # statistics: Wikipedia texts sampled (MEMIT: 100000)
    mom2_max_seq_len: int = 256  # statistics: tokens kept per text
    mom2_max_tokens: int | None = None  # statistics: stop after this many tokens in all (None: no budget)
    mom2_dtype: str = "float32"  # statistics: accumulation and storage dtype

    def to_dict(self) -> dict:
        return asdict(self)


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
    memit: MemitSpec | None = None  # MEMIT / AlphaEdit settings; None when the YAML has no ``memit:`` section

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
    memit = None
    if raw.get("memit") is not None:
        memit = memit_spec_from_dict(raw["memit"], num_layers=int(raw["num_layers"]), mlp=mlp, where=where)
    kept = {k: raw[k] for k in required if k != "mlp"}
    return ModelSpec(
        **kept, mlp=mlp, dtype=raw.get("dtype", "float32"), neuron_dim=expected_dim,
        completion_template=completion_template, memit=memit,
    )


# The projection whose *input* holds MEMIT's keys, per MLP kind (a key of ``mlp.projections``).
KEY_PROJECTION = {"gated": "down", "ungated": "fc_out"}
_POSITIVE = ("clamp_norm_factor", "v_lr", "nullspace_threshold", "alphaedit_l2")
_NON_NEGATIVE = ("mom2_weight", "v_weight_decay", "kl_factor")
_NO_LIMIT = 1 << 62
# (low, high); the prefixes are generated greedily from up to 5 fixed first words, as MEMIT's 5 sampled ones.
_INTS = {"v_num_grad_steps": (1, _NO_LIMIT), "context_prefixes": (0, 5), "context_prefix_tokens": (1, _NO_LIMIT),
         "mom2_n_texts": (1, _NO_LIMIT), "mom2_max_seq_len": (2, _NO_LIMIT)}


def memit_spec_from_dict(raw: dict, num_layers: int, mlp: MLPSpec, where: str = "<dict>") -> MemitSpec:
    """Validate a ``memit:`` section; every error names the field and what it expects."""
    if not isinstance(raw, dict):
        raise RegistryError(f"{where}: field 'memit' must be a mapping, got {type(raw).__name__}")
    known = [f.name for f in fields(MemitSpec)]
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise RegistryError(f"{where}: unknown field(s) {['memit.' + k for k in unknown]}; known: {known}")
    proj = KEY_PROJECTION[mlp.kind]
    if proj not in mlp.projections:
        raise RegistryError(f"{where}: a 'memit' section needs 'mlp.projections.{proj}' (the {mlp.kind} MLP's "
                            "output projection, whose input keys MEMIT edits)")
    layers = raw.get("layers")
    if (not isinstance(layers, (list, tuple)) or not layers
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers)):
        raise RegistryError(f"{where}: field 'memit.layers' must be a non-empty list of layer indices, got {layers!r}")
    if list(layers) != sorted(set(layers)):
        raise RegistryError(f"{where}: field 'memit.layers' {list(layers)} must be strictly increasing")
    if not all(0 <= x < num_layers for x in layers):
        raise RegistryError(f"{where}: field 'memit.layers' {list(layers)} has a layer outside 0..{num_layers - 1}")
    out = {**raw, "layers": tuple(layers)}
    for key in _POSITIVE + _NON_NEGATIVE:
        if key in raw:
            value = raw[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise RegistryError(f"{where}: field 'memit.{key}' must be a number, got {value!r}")
            if value < 0 or (key in _POSITIVE and value == 0):
                need = "> 0" if key in _POSITIVE else ">= 0"
                raise RegistryError(f"{where}: field 'memit.{key}' is {value}; it must be {need}")
            out[key] = float(value)
    for key, (low, high) in _INTS.items():
        if key in raw:
            value = raw[key]
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                span = f">= {low}" if high == _NO_LIMIT else f"in {low}..{high}"
                raise RegistryError(f"{where}: field 'memit.{key}' must be an integer {span}, got {value!r}")
    budget = raw.get("mom2_max_tokens")
    if budget is not None and (isinstance(budget, bool) or not isinstance(budget, int) or budget < 1):
        raise RegistryError(f"{where}: field 'memit.mom2_max_tokens' must be null or an integer >= 1, got {budget!r}")
    if raw.get("mom2_dtype", "float32") not in ("float32", "float64"):
        raise RegistryError(f"{where}: field 'memit.mom2_dtype' is {raw['mom2_dtype']!r}; "
                            "expected 'float32' or 'float64'")
    return MemitSpec(**out)
