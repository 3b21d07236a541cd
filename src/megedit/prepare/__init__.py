"""Prepare stage: read, deduplicate and split the benchmark; record the base LM's pre-edit answers."""
