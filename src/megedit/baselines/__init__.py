"""Baselines evaluated in the same harness as MeG."""
