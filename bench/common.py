"""What the benchmarks share: a Figure (one row of the table), timing, peak memory, real data, the table.

A benchmark module defines ``run(device, quick) -> list[Figure]``; ``main(run)`` gives it a command line
(``--device``, ``--quick``, ``--json``). Every figure holds this project's number, the baseline measured in
the same run, their ratio, the unit, the conditions, and the target it is held to.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SYNTHCAP_SHARED_DATA", REPO.parent / "shared" / "data"))
PHOTOS = SHARED / "flickr8k" / "images"
FLICKR8K_CAPTIONS = SHARED / "flickr8k" / "Flickr8k.token.txt"
CAPTION_FILES = [FLICKR8K_CAPTIONS, SHARED / "coco-karpathy" / "val.json", SHARED / "coco-karpathy" / "test.json",
                 SHARED / "flickr30k-karpathy" / "val.json", SHARED / "flickr30k-karpathy" / "test.json"]


@dataclass
class Figure:
    figure: str
    value: float
    baseline: float
    ratio: float
    unit: str
    conditions: str
    target: str = ""
    holds: bool | None = None         # None: no target


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def best_time(fn: Callable[[], object], repeat: int = 2) -> float:
    """The fastest of ``repeat`` runs, in seconds (the least disturbed by other work on the machine)."""
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB: Linux's VmHWM (the high-water mark of this
    process's own memory; ``ru_maxrss`` is not used there: a child started by a large parent inherits
    the parent's peak), else ``ru_maxrss`` (macOS reports bytes)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**20 if sys.platform == "darwin" else 1024)


def real_captions(n: int) -> list[str]:
    """``n`` real captions (Flickr8k, then COCO and Flickr30k val/test), repeated if there are fewer."""
    from pipeline.data.captions import read_captions
    texts: list[str] = []
    for path in CAPTION_FILES:
        if len(texts) >= n:
            break
        texts += [r.text for r in read_captions(path).records]
    if not texts:
        raise FileNotFoundError(f"no captions in {SHARED} (set SYNTHCAP_SHARED_DATA)")
    return [texts[i % len(texts)] for i in range(n)]


def run_child(args: list[str], env: dict | None = None, cwd: Path | None = None) -> dict:
    """``python -m ARGS`` in a fresh process; its last stdout line is a JSON result."""
    out = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, cwd=cwd or REPO,
                         env={**os.environ, **(env or {})})
    if out.returncode != 0:
        raise RuntimeError(f"`python -m {' '.join(args)}` failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt(x: float) -> str:
    if x == 0 or not (abs(x) < 1e15):
        return f"{x:g}"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"


def table(figures: list[Figure]) -> str:
    """A Markdown table: figure, this project, baseline, ratio, target (✓ holds, ✗ does not), conditions."""
    rows = ["| figure | this project | baseline | ratio | target | conditions |", "|---|---|---|---|---|---|"]
    for f in figures:
        mark = "" if f.holds is None else (" ✓" if f.holds else " ✗")
        rows.append(f"| {f.figure} | {fmt(f.value)} {f.unit} | {fmt(f.baseline)} {f.unit} | {fmt(f.ratio)}× | "
                    f"{f.target}{mark} | {f.conditions} |")
    return "\n".join(rows)


def machine(device: str) -> str:
    import torch
    gpu = f", {torch.cuda.get_device_name(0)}" if device.startswith("cuda") and torch.cuda.is_available() else ""
    return (f"{platform.processor() or platform.machine()}, {cores()} cores{gpu}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}")


def parser(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default cpu)")
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke test of the benchmark, not a figure")
    ap.add_argument("--json", help="write the figures here as JSON")
    return ap


def main(run: Callable[[str, bool], list[Figure]], description: str) -> None:
    args = parser(description).parse_args()
    figures = run(args.device, args.quick)
    print(table(figures))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(f) for f in figures], indent=1))
