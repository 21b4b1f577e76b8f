"""Training input: rows/s the shard readers deliver vs rows/s each method's training consumes, and the
Eq. 3 projection cache (SynTIC): one epoch's time with the projection computed vs read back.

    .venv/bin/python -m bench.train [--device cpu] [--quick]

Runs on the throwaway pipeline of bench/scale.py (5k captions, 2,000 rows a shard, tiny models; 1k in
``--quick``), in a fresh process pointed at it. Per method instance (syntic, pcmnet, capdec, maccap,
one epoch each):

- reader: ``runner.Inputs(needs).shards()`` read end to end, exactly what training iterates (every
  column the method reads, aligned across artifacts, checked and reshaped), rows/s;
- training: one epoch of ``runner.train_model`` (prepare, batch, forward, backward, optimiser) minus the
  reader's time, rows/s. The reader must deliver >= 3x what training consumes.

Projection cache: SynTIC's ``prepare`` projects each shard once per run (``ProjectionCache``); the
epoch that computes it (the first, what every epoch cost before) vs an epoch that reads it back.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from bench.common import Figure, main, run_child
from bench.scale import MID, measure, point_at, work_dir

METHODS = ("syntic", "pcmnet", "capdec", "maccap")


def child(root: Path, device: str) -> None:
    """In a fresh process pointed at ``root``: the reader and training rates of each method, and the
    projection cache's epoch times; prints one JSON line."""
    import torch

    from pipeline import config as cfg
    from pipeline import methods, runner
    torch.set_num_threads(1)         # tiny models: one thread is fastest, and steady on a shared machine
    point_at(root)
    config = cfg.load()
    report = {}
    for name in METHODS:
        if name not in config.methods:
            continue
        instance = config.methods[name]
        module = methods.get(instance.method)
        s = instance.train
        inputs = runner.Inputs(module.needs(s), device)
        rows = sum(inputs.shard_rows())
        t0 = time.perf_counter()
        for _ in inputs.shards():
            pass
        t_read = time.perf_counter() - t0
        epochs = []
        for _ in range(2 if name == "syntic" else 1):      # syntic: the cache's miss, then its hit
            t0 = time.perf_counter()
            runner.train_model(module, s, inputs, progress=False)
            epochs.append(time.perf_counter() - t0)
        cache = inputs.data.memo.get("projection")
        report[name] = {"rows": rows, "read_s": t_read, "epoch_s": epochs, "batch_size": s.batch_size,
                        "cache_hits": getattr(cache, "hits", None)}
        if cache is not None:                              # Eq. 3 alone: computed vs read back, every shard
            shards = [rows_["optimized"] if "optimized" in rows_ else rows_["image"] for _, rows_ in inputs.shards()]
            t0 = time.perf_counter()
            for features in shards:
                inputs.data.support.project(features)
            t_compute = time.perf_counter() - t0
            t0 = time.perf_counter()
            for features in shards:
                cache.project(features, inputs.data.support)
            report[name]["eq3_compute_s"], report[name]["eq3_cached_s"] = t_compute, time.perf_counter() - t0
            report[name]["support_n"] = inputs.data.support.n
    print(json.dumps(report))


def run(device: str = "cpu", quick: bool = False) -> list[Figure]:
    n = 1000 if quick else 5000
    work = work_dir()
    root = work / f"n{n}"
    measure(root, n, MID, False, device)
    report = run_child(["bench.train", "--child", str(root), device], env={"TQDM_DISABLE": "1"})
    figures = []
    where = f"{n:,} captions, 2,000 rows a shard, tiny models, 1 torch thread, one epoch, {device}"
    for name, r in report.items():
        epoch = min(r["epoch_s"])                          # syntic: the epoch with the projection cached
        consume = r["rows"] / max(epoch - r["read_s"], 1e-9)
        deliver = r["rows"] / r["read_s"]
        figures.append(Figure(f"training input of train@{name}: reader vs training step", deliver, consume,
                              deliver / consume, "rows/s",
                              f"{where}, batch {r['batch_size']}; reader = Inputs.shards() end to end; training = "
                              f"epoch {epoch:.1f} s minus reading {r['read_s']:.2f} s", "≥ 3×", deliver / consume >= 3))
    if "syntic" in report:
        first, cached = report["syntic"]["epoch_s"]
        figures.append(Figure("train@syntic epoch: Eq. 3 projection cached vs recomputed", cached, first, first / cached,
                              "s", f"{where}; exact Eq. 3 over the support set (auto index: Flat below 50k); "
                              f"recomputed = the epoch that projects every shard (before: every epoch), cached = "
                              f"an epoch reading it back ({report['syntic']['cache_hits']} shard hits)", ""))
        r = report["syntic"]
        figures.append(Figure("Eq. 3 of one epoch's shards: read from the projection cache vs computed",
                              r["rows"] / r["eq3_cached_s"], r["rows"] / r["eq3_compute_s"],
                              r["eq3_compute_s"] / r["eq3_cached_s"], "rows/s",
                              f"{where}; exact Eq. 3 over {r['support_n']:,} support features vs the cached .npy "
                              "(hash of the shard's features + load); the projection's share of an epoch grows with "
                              "the support set (bench.support gives its rate at 50k and 500k)", ""))
    if "SYNTHCAP_BENCH_WORK" not in os.environ:
        shutil.rmtree(work, ignore_errors=True)
    return figures


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(Path(sys.argv[2]), sys.argv[3])
    else:
        main(run, __doc__)
