"""Benchmark readers, the normalised edit record and the seeded splits."""
