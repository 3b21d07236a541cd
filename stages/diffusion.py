"""Diffusion stage (LightningCLI): python stages/diffusion.py --data.prepare_dir P --data.encoder_dir E --data.collect_dir C --model.out_dir O"""

from megedit.cli import stage_main

if __name__ == "__main__":
    stage_main("diffusion")
