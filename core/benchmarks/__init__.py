"""Benchmarks behind ``python -m core bench <name>``; each prints a table and writes JSON."""
