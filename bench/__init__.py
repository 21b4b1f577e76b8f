"""Benchmarks: `make bench` runs them all (bench/run.py); each runs alone with `python -m bench.NAME`."""
import os

os.environ.setdefault("TQDM_DISABLE", "1")      # progress bars would interleave with the tables
