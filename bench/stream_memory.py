"""Peak memory of reading a feature artifact: streaming shard by shard (the pipeline) vs loading it whole.

    .venv/bin/python bench/stream_memory.py [--rows 200000] [--dim 512]

Writes a synthetic float16 feature artifact to a temp folder, then measures each reader's peak RSS
in a fresh process and prints the ratio (whole / streaming).
"""
import argparse
import subprocess
import sys
import tempfile

import numpy as np
import pyarrow as pa

from pipeline.data.shards import feature_array, write_sharded

READERS = {
    "stream": "sum(float(feature_numpy(b.column(0)).sum()) for b in art.iter_batches(['global'], batch_size=1024))",
    "whole": "float(feature_numpy(art.read_column('global')).sum())",
}


def measure(folder: str, reader: str) -> float:
    code = ("import resource, sys\nfrom pipeline.data.shards import ShardedArtifact, feature_numpy\n"
            f"art = ShardedArtifact({folder!r})\nbase = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            f"total = {READERS[reader]}\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip()) / 1024  # MiB


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--rows-per-shard", type=int, default=10_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        def make(task):
            rng = np.random.default_rng(task.index)
            return pa.table({"global": feature_array(rng.standard_normal((task.stop - task.start, args.dim)), "float16")})
        write_sharded(folder, args.rows, args.rows_per_shard, "bench", make, {"model": None}, desc="write")
        size = args.rows * args.dim * 2 / 2**20
        stream, whole = measure(folder, "stream"), measure(folder, "whole")
    print(f"{args.rows} x {args.dim} float16 features ({size:.0f} MiB on disk before compression), "
          f"{args.rows_per_shard} rows a shard")
    print(f"  baseline (whole artifact in memory): peak +{whole:.0f} MiB")
    print(f"  pipeline (stream shard by shard):    peak +{stream:.0f} MiB")
    print(f"  memory ratio: {whole / max(stream, 1):.1f}x less")


if __name__ == "__main__":
    main()
