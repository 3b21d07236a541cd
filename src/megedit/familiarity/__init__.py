"""Familiarity stage: the entropy router that decides per query whether the edit neuron is attached."""
