"""Familiarity stage (LightningCLI): python stages/familiarity.py --data.prepare_dir P --data.encoder_dir E --model.out_dir O"""

from megedit.cli import stage_main

if __name__ == "__main__":
    stage_main("familiarity")
