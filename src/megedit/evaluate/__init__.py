"""Evaluate stage: Reliability, Generality and Locality under TF and AG, for MeG and its baselines."""
