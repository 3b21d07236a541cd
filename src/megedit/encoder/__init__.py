"""Encoder stage: InfoNCE fine-tuning of the query encoder on pseudo-edit paraphrase pairs."""
