"""Benchmarks for relion-gateway: run them with `python bench/run.py` (see bench/README.md)."""
