"""Evaluate stage (LightningCLI): python stages/evaluate.py --data.run_dir RUN --model.out_dir RUN/evaluate"""

from megedit.cli import stage_main

if __name__ == "__main__":
    stage_main("evaluate")
