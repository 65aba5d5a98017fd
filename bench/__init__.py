"""Benchmarks of bridges and of the pipeline, run as modules from the repository root: python -m bench.NAME."""
