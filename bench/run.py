"""`make bench`: every benchmark in one run, one table, and the figures as JSON.

    .venv/bin/python -m bench.run [--device cpu|cuda] [--quick] [--out artifacts/bench/results.json]
                                  [--only encode,support,...]

Runs bench.encode (CLIP image and text paths), bench.support (Eq. 3), bench.refine (SynC's refined pairs at
50k x 50k vs brute force, its memory as the pool grows), bench.scale (memory flat in
corpus size, growth exponents), bench.train (training input, the projection cache), bench.step (one training
step: batches cut after their longest caption, the fused optimiser), bench.decode (greedy, beam and
sampling over the prefix decoder's KV cache vs the full re-run) and bench.dvc (DVC's overhead) in this
order, the throwaway pipelines of scale and train shared (one temp folder, removed at the end). Prints one Markdown table (figure, this project, baseline, ratio, target, conditions) and writes
``{figure: {value, baseline, ratio, unit, conditions, target, holds}}`` to ``--out`` (and the run's date,
machine and wall time beside it, ``run.json``). Baselines are
measured in the same run; the figures are timings of this machine at this moment (other work running on
it slows them: the conditions say what ran).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from bench.common import REPO, machine, table

BENCHMARKS = ("encode", "support", "refine", "scale", "train", "step", "decode", "dvc")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke test of the benchmarks, not figures")
    ap.add_argument("--out", default=str(REPO / "artifacts" / "bench" / "results.json"))
    ap.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated subset of " + ", ".join(BENCHMARKS))
    args = ap.parse_args()
    only = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = sorted(set(only) - set(BENCHMARKS))
    if unknown:
        raise SystemExit(f"unknown benchmark(s) {', '.join(unknown)} (known: {', '.join(BENCHMARKS)})")

    work = Path(tempfile.mkdtemp(prefix="synthcap-bench-"))
    os.environ["SYNTHCAP_BENCH_WORK"] = str(work)
    figures, seconds, started = [], {}, time.perf_counter()
    try:
        for name in BENCHMARKS:
            if name not in only:
                continue
            t0 = time.perf_counter()
            print(f"bench: {name} ...", flush=True)
            figures += importlib.import_module(f"bench.{name}").run(args.device, args.quick)
            seconds[name] = time.perf_counter() - t0
            print(f"bench: {name} done in {seconds[name]:.0f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - started
    header = (f"{time.strftime('%Y-%m-%d %H:%M %Z')}; {machine(args.device)}; "
              f"{'--quick (smoke test sizes); ' if args.quick else ''}wall time {total / 60:.1f} min ("
              + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + ")")
    print()
    print(header)
    print()
    print(table(figures))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    results = {f.figure: {k: v for k, v in asdict(f).items() if k != "figure"} for f in figures}
    out.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    out.with_name("run.json").write_text(json.dumps(
        {"when": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(args.device), "device": args.device,
         "quick": args.quick, "seconds": seconds, "wall_seconds": total}, indent=1) + "\n")
    print(f"\n{len(figures)} figures -> {out}")


if __name__ == "__main__":
    main()
