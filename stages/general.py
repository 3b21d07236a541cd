"""General-ability stage (LightningCLI): python stages/general.py --data.run_dir RUN --model.out_dir RUN/general"""

from megedit.cli import stage_main

if __name__ == "__main__":
    stage_main("general")
