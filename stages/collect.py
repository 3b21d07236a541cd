"""Collect stage (LightningCLI): python stages/collect.py --data.prepare_dir P --model.out_dir O [--config FILE]"""

from megedit.cli import stage_main

if __name__ == "__main__":
    stage_main("collect")
