"""``megedit`` console command: ``megedit <stage> [LightningCLI args]`` runs one stage.

Each stage is a LightningModule + LightningDataModule pair; the table below says which
trainer method runs it and which arguments the CLI links between the two.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    module: str  # "package.module:Class"
    datamodule: str
    method: str  # trainer method: fit / predict / test
    links: tuple[tuple[str, str], ...] = ()
    help: str = ""


STAGES: dict[str, Stage] = {
    "prepare": Stage("megedit.prepare.prepare_module:PrepareModule",
                     "megedit.prepare.prepare_datamodule:PrepareDataModule", "predict",
                     (("data.model", "model.model"),),
                     "read, deduplicate and split a benchmark; record the base LM's pre-edit answers"),
    "collect": Stage("megedit.collect.collect_module:CollectModule",
                     "megedit.collect.collect_datamodule:CollectDataModule", "predict", (),
                     "optimise one dynamic neuron per edit (batched, resumable, DDP-sharded)"),
    "encoder": Stage("megedit.encoder.encoder_module:EncoderModule",
                     "megedit.encoder.encoder_datamodule:EncoderDataModule", "fit",
                     (("data.prepare_dir", "model.prepare_dir"),),
                     "fine-tune the query encoder with InfoNCE on pseudo-edit paraphrase pairs"),
    "familiarity": Stage("megedit.familiarity.familiarity_module:FamiliarityModule",
                         "megedit.familiarity.familiarity_datamodule:FamiliarityDataModule", "fit", (),
                         "train the entropy router on the edit prompts; calibrate its threshold on pseudo data"),
    "diffusion": Stage("megedit.diffusion.diffusion_module:DiffusionModule",
                       "megedit.diffusion.diffusion_datamodule:DiffusionDataModule", "fit", (),
                       "train the 1-D DiT weight generator on (encoder embedding, collected neuron) pairs"),
    "evaluate": Stage("megedit.evaluate.evaluate_module:EvaluateModule",
                      "megedit.evaluate.evaluate_datamodule:EvaluateDataModule", "test", (),
                      "Reliability/Generality/Locality (TF and AG) and Score for MeG, MeG w/o router and FT"),
    "general": Stage("megedit.general.general_module:GeneralModule",
                     "megedit.general.general_datamodule:GeneralDataModule", "test", (),
                     "general ability (BBH, GSM8K, MMLU, RTE, SST-2) before and after editing (paper Table 3)"),
}


def _load(path: str):
    mod, _, name = path.partition(":")
    return getattr(importlib.import_module(mod), name)


def stage_classes(name: str) -> tuple[type, type]:
    """The LightningModule and LightningDataModule classes of a stage."""
    stage = STAGES[name]
    return _load(stage.module), _load(stage.datamodule)


def stage_main(name: str, args=None):
    from megedit.stage_cli import run_stage

    stage = STAGES[name]
    return run_stage(name, *stage_classes(name), stage.method, stage.links, args)


def _usage() -> str:
    lines = ["usage: megedit <command> [args]", "", "stages (each takes LightningCLI arguments, e.g. --config, --help):"]
    lines += [f"  {n:<12} {s.help}" for n, s in STAGES.items()]
    extra = {k: v for k, v in COMMANDS.items()}
    if extra:
        lines += ["", "other commands:"] + [f"  {n:<12} {h}" for n, (_, h) in extra.items()]
    return "\n".join(lines)


COMMANDS: dict[str, tuple[str, str]] = {  # name -> ("module:function", help)
    "ask": ("megedit.ask:main", "answer questions with an edited run and show the routing provenance"),
    "edits": ("megedit.edits.cli:main", "add or remove edits of a run without a full retrain; list its versions"),
    "plan": ("megedit.graph:main", "print the Makefile rules of the stage graph (stages/plan.mk)"),
    "report": ("megedit.report:main", "gather several evaluate results into one table and a scaling plot"),
    "serve": ("megedit.serve.cli:main", "serve an edited run over HTTP: OpenAI-style completions with provenance"),
    "threshold": ("megedit.familiarity.threshold:main",
                  "re-pick a router's entropy threshold (another rule or FPR budget) from its saved entropies"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name in STAGES:
        stage_main(name, rest)
        return 0
    if name in COMMANDS:
        return int(_load(COMMANDS[name][0])(rest) or 0)
    print(f"megedit: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
