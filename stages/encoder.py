"""Encoder stage (LightningCLI): python stages/encoder.py --data.prepare_dir P --model.out_dir O [--model.objective infonce|mse|frozen]"""

from megedit.cli import stage_main

if __name__ == "__main__":
    stage_main("encoder")
