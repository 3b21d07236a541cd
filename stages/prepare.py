"""Prepare stage (LightningCLI): python stages/prepare.py [--config FILE] [--data.n_edits N] [--model.out_dir DIR]"""

from megedit.cli import stage_main

if __name__ == "__main__":
    stage_main("prepare")
