"""Every shipped stage config parses against its stage's signature (litgpt-style), and the CLI lists stages."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import yaml

from megedit.cli import STAGES, _load, main
from megedit.paths import CONFIG_DIR
from megedit.stage_cli import parse_stage_args


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_default_config_parses(name):
    stage = STAGES[name]
    assert (CONFIG_DIR / "stages" / f"{name}.yaml").is_file()
    cfg = parse_stage_args(name, _load(stage.module), _load(stage.datamodule), stage.links)
    assert cfg.model.out_dir


@pytest.mark.parametrize("path", sorted((CONFIG_DIR / "stages").glob("*.yaml")), ids=lambda p: p.name)
def test_every_stage_yaml_parses(path):
    name = path.stem.split("-")[0]
    stage = STAGES.get(name)
    assert stage is not None, f"{path.name}: no stage named {name!r}"
    parse_stage_args(name, _load(stage.module), _load(stage.datamodule), stage.links, ["--config", str(path)])


def test_unknown_flag_is_refused():
    stage = STAGES["prepare"]
    with pytest.raises(Exception, match="bogus"):
        parse_stage_args("prepare", _load(stage.module), _load(stage.datamodule), stage.links, ["--data.bogus", "3"])


def test_cli_lists_every_stage(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in STAGES)
    assert main(["nope"]) == 2


@pytest.mark.parametrize("path", sorted((CONFIG_DIR / "experiments").glob("*/*.yaml")),
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_experiment_override_parses(path):
    stage = STAGES.get(path.stem)
    assert stage is not None, f"{path}: file name must be a stage name"
    parse_stage_args(path.stem, _load(stage.module), _load(stage.datamodule), stage.links, ["--config", str(path)])


# Run-specific folders: the stage YAML shows where `make` puts them; the code has no default to agree with.
_PLACE_HOLDERS = {"out_dir", "prepare_dir", "run_dir", "encoder_dir", "collect_dir"}


def _signature_defaults(cls) -> dict:
    """A class's keyword defaults, a dataclass-typed default expanded into its fields."""
    out = {}
    for name, param in inspect.signature(cls.__init__).parameters.items():
        if param.default is inspect.Parameter.empty or name in _PLACE_HOLDERS:
            continue
        value = param.default
        out[name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
    return out


def _disagreements(yaml_part: dict, defaults: dict, where: str) -> list[str]:
    bad = []
    for key, value in (yaml_part or {}).items():
        if key in _PLACE_HOLDERS or key not in defaults:
            continue
        want = defaults[key]
        if isinstance(want, dict) and isinstance(value, dict):
            bad += _disagreements(value, want, f"{where}.{key}")
        elif (list(want) if isinstance(want, tuple) else want) != value:
            bad.append(f"{where}.{key}: YAML {value!r} but the code's default is {want!r}")
    return bad


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_yaml_restates_the_code_defaults(name):
    """One place per default (docs/contributing.md): a stage YAML may show a default, never change it."""
    stage = STAGES[name]
    raw = yaml.safe_load((CONFIG_DIR / "stages" / f"{name}.yaml").read_text())
    bad = (_disagreements(raw.get("model"), _signature_defaults(_load(stage.module)), "model")
           + _disagreements(raw.get("data"), _signature_defaults(_load(stage.datamodule)), "data"))
    assert not bad, f"configs/stages/{name}.yaml disagrees with the code:\n" + "\n".join(bad)


def test_familiarity_router_kind_is_a_stage_option():
    """``model.router``: ``entropy`` (the paper's net) by default, ``nearest`` on request, nothing else."""
    stage = STAGES["familiarity"]
    classes = _load(stage.module), _load(stage.datamodule)
    assert parse_stage_args("familiarity", *classes, stage.links).model.router == "entropy"
    assert parse_stage_args("familiarity", *classes, stage.links, ["--model.router", "nearest"]).model.router == "nearest"
    with pytest.raises(Exception, match="router"):
        parse_stage_args("familiarity", *classes, stage.links, ["--model.router", "knn"])


def test_sampler_steps_default_is_one_value_everywhere():
    """The evaluate and general stages (code and YAML), the diffusion stage's validation and report (which pick
    the checkpoint and the value scale), ``megedit ask``, ``megedit serve`` and ``EditedLM`` sample with the same
    DDIM steps: ``megedit.defaults.DEFAULT_STEPS``."""
    from megedit.ask import build_parser as ask_parser
    from megedit.defaults import DEFAULT_STEPS
    from megedit.edited_model import EditedLM
    from megedit.serve.cli import build_parser as serve_parser

    found = {"ask": ask_parser().parse_args(["--run", "r", "q"]).steps,
             "serve": serve_parser().parse_args(["--run", "r"]).steps,
             "EditedLM": inspect.signature(EditedLM).parameters["steps"].default}
    for stage in ("evaluate", "general"):
        found[f"{stage}.yaml"] = yaml.safe_load((CONFIG_DIR / "stages" / f"{stage}.yaml").read_text())["model"]["steps"]
        found[f"{stage} module"] = inspect.signature(_load(STAGES[stage].module)).parameters["steps"].default
    diffusion_yaml = yaml.safe_load((CONFIG_DIR / "stages" / "diffusion.yaml").read_text())["model"]
    diffusion_code = inspect.signature(_load(STAGES["diffusion"].module)).parameters
    for key in ("val_steps", "report_steps"):
        found[f"diffusion.yaml {key}"] = diffusion_yaml[key]
        found[f"diffusion module {key}"] = diffusion_code[key].default
    from megedit.diffusion.generator import WeightGenerator

    found["WeightGenerator.sample"] = inspect.signature(WeightGenerator.sample).parameters["steps"].default
    assert found == {name: DEFAULT_STEPS for name in found}
