"""One LightningCLI entry point shared by every stage script (``stages/<stage>.py``, ``megedit <stage>``).

``configs/stages/<stage>.yaml`` is always loaded first as the default config, so
``python stages/prepare.py --data.n_edits 16`` works without ``--config``; a user's
``--config`` file and flags override it. The CLI does not pick a subcommand: each stage
knows whether it fits, predicts or tests.
"""

from __future__ import annotations

from typing import Sequence

from lightning.pytorch.cli import LightningCLI

from megedit.artifacts import mark_stage_start
from megedit.paths import CONFIG_DIR
from megedit.resume import TRAINER_FINGERPRINTED, resumable_checkpoint, run_fingerprint


class StageCLI(LightningCLI):
    def __init__(self, *args, links: Sequence[tuple[str, str]] = (), **kwargs):
        self._links = links
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        for source, target in self._links:
            parser.link_arguments(source, target)


def run_stage(stage: str, module_cls, datamodule_cls, method: str, links: Sequence[tuple[str, str]] = (),
              args: Sequence[str] | None = None) -> StageCLI:
    mark_stage_start()
    cli = StageCLI(
        module_cls, datamodule_cls, links=links, run=False, args=args,
        save_config_callback=None,  # the stage's manifest records the resolved config instead
        parser_kwargs={"default_config_files": [str(CONFIG_DIR / "stages" / f"{stage}.yaml")]},
    )
    extra = {}
    if method == "fit" and getattr(cli.model, "resumable", False):
        # A killed run resumes from its last checkpoint, but only one of the same config and inputs.
        trainer = cli.config.get("trainer") or {}
        keys = tuple(getattr(cli.model, "fingerprinted_trainer_settings", ()))  # the stage's own, beside the common
        fingerprint = run_fingerprint(cli.model.hparams, cli.datamodule.hparams,
                                      {k: trainer.get(k) for k in (*TRAINER_FINGERPRINTED, *keys)}, keys)
        cli.model.resumed_from = resumable_checkpoint(cli.model.hparams.out_dir, fingerprint)
        extra["ckpt_path"] = cli.model.resumed_from
    getattr(cli.trainer, method)(cli.model, datamodule=cli.datamodule, **extra)
    return cli


def parse_stage_args(stage: str, module_cls, datamodule_cls, links: Sequence[tuple[str, str]] = (),
                     args: Sequence[str] = ()):
    """Parse a stage's config and flags exactly as the CLI would, without building the model (for tests/tools)."""
    from jsonargparse import ActionConfigFile
    from lightning.pytorch import Trainer
    from lightning.pytorch.cli import LightningArgumentParser

    parser = LightningArgumentParser(default_config_files=[str(CONFIG_DIR / "stages" / f"{stage}.yaml")],
                                     exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile)
    parser.add_lightning_class_args(Trainer, "trainer")
    parser.add_lightning_class_args(module_cls, "model", subclass_mode=False)
    parser.add_lightning_class_args(datamodule_cls, "data", subclass_mode=False)
    for source, target in links:
        parser.link_arguments(source, target)
    return parser.parse_args(list(args))
