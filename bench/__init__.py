"""Benchmarks: `make bench` (python -m bench) writes BENCHMARKS.md. See bench/__main__.py."""
