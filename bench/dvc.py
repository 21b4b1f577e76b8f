"""DVC's overhead on an unchanged pipeline: ``dvc status`` and ``dvc repro`` with 20 and 2,000 shard files
per artifact.

    .venv/bin/python -m bench.dvc [--quick]

A throwaway git + DVC project in a temp folder (never this repository's): a chain of 4 stages shaped like
ours (corpus -> encode_text -> optimize -> support; each reads the previous folder, a params key and a
code file, and writes a folder of N shard files of 16 KiB, the sharded outputs `persist: true` as in
dvc.yaml). After a first ``dvc repro``, nothing changes and the time of ``dvc status`` and of ``dvc repro``
(which must find nothing to run) is measured with ``.venv/bin/dvc``, at N = 20 and N = 2,000. Target:
< 5 s at 2,000 (the baseline column is the same command at 20 files).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import Figure, main

STAGES = ("corpus", "encode_text", "optimize", "support")
MAKE = ("import os, sys\n"
        "out, n = sys.argv[1], int(sys.argv[2])\n"
        "os.makedirs(out, exist_ok=True)\n"
        "for i in range(n):\n"
        "    open(os.path.join(out, f'shard-{i:05d}.parquet'), 'wb').write(os.urandom(16384))\n")


def dvc_bin() -> str:
    local = Path(sys.executable).with_name("dvc")
    return str(local) if local.exists() else "dvc"


def project(root: Path, shards: int) -> None:
    root.mkdir(parents=True)
    (root / "make.py").write_text(MAKE)
    (root / "params.yaml").write_text(f"rows_per_shard: 2000\nshards: {shards}\n")
    lines = ["stages:"]
    prev = None
    for name in STAGES:
        deps = ["make.py"] + ([f"artifacts/{prev}"] if prev else [])
        persist = "{persist: true}" if prev else "{}"
        lines += [f"  {name}:", f"    cmd: python make.py artifacts/{name} {shards}",
                  f"    deps: [{', '.join(deps)}]", "    params: [rows_per_shard, shards]",
                  f"    outs:\n      - artifacts/{name}: {persist}"]
        prev = name
    (root / "dvc.yaml").write_text("\n".join(lines) + "\n")


def sh(args: list[str], cwd: Path) -> float:
    t0 = time.perf_counter()
    out = subprocess.run(args, cwd=cwd, capture_output=True, text=True,
                         env={**os.environ, "DVC_NO_ANALYTICS": "1", "PATH": f"{Path(sys.executable).parent}:"
                              f"{os.environ.get('PATH', '')}"})
    if out.returncode != 0:
        raise RuntimeError(f"`{' '.join(args)}` failed in {cwd}:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    return time.perf_counter() - t0


def measure(shards: int, repeat: int) -> dict[str, float]:
    dvc = dvc_bin()
    with tempfile.TemporaryDirectory(prefix="synthcap-bench-dvc-") as tmp:
        root = Path(tmp) / "p"
        project(root, shards)
        sh(["git", "init", "-q"], root)
        sh([dvc, "init", "-q"], root)
        sh([dvc, "config", "core.analytics", "false"], root)
        sh([dvc, "repro", "-q"], root)                       # the first run: everything built and cached
        sh([dvc, "status", "-q"], root)                      # warm DVC's state db, as after any real run
        times = {}
        for what in ("status", "repro"):
            times[what] = min(sh([dvc, what, "-q"] if what == "status" else [dvc, what], root) for _ in range(repeat))
        check = subprocess.run([dvc, "status", "--json"], cwd=root, capture_output=True, text=True)
        if check.stdout.strip() not in ("{}", ""):
            raise RuntimeError(f"the pipeline is not up to date after dvc repro: {check.stdout[:500]}")
        shutil.rmtree(root / ".dvc" / "cache", ignore_errors=True)
    return times


def run(device: str = "cpu", quick: bool = False) -> list[Figure]:
    small, large = (20, 200) if quick else (20, 2000)
    repeat = 1 if quick else 2
    lo, hi = measure(small, repeat), measure(large, repeat)
    figures = []
    for what in ("status", "repro"):
        figures.append(Figure(f"DVC overhead: unchanged `dvc {what}`, {large:,} vs {small:,} shard files per artifact",
                              hi[what], lo[what], hi[what] / lo[what], "s",
                              f"throwaway git+DVC project, {len(STAGES)} chained stages, {large:,} x 16 KiB files "
                              f"per output folder ({len(STAGES) * large:,} files), best of {repeat}, "
                              f"{Path(dvc_bin()).name} from the venv", "< 5 s", hi[what] < 5))
    return figures


if __name__ == "__main__":
    main(run, __doc__)
