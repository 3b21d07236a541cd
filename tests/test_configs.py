"""Every shipped stage config parses against its stage's signature (litgpt-style), and the CLI lists stages."""

from __future__ import annotations

import pytest

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
