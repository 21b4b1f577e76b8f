"""Memory flat in corpus size, and how the CPU-side stages' time grows with it: the real stages run on a
throwaway pipeline of N captions with the tiny models, each in a fresh process that reports its time and
peak RSS.

    .venv/bin/python -m bench.scale [--device cpu] [--quick]

The throwaway pipeline: the offline profile with N real captions (Flickr8k, COCO and Flickr30k val/test,
repeated past ~100k), ``rows_per_shard`` 2,000, ``support.index: auto``, one epoch of Eq. 2 and of
training, an eval set of 50 Flickr8k photos. No diffusion model runs: the synthetic images' CLIP
features (the text feature plus noise) and tags (random labels) are written as the stages write them;
everything else (corpus, encode_text, tag_vocabulary, optimize, support, concepts, train@syntic,
train@pcmnet, evalset, encode_eval, tag_eval, evaluate@syntic-bench) is the stage itself.

Memory: peak RSS at 1x and 10x the corpus (1k and 10k captions) for encode_text, support, train@syntic,
train@pcmnet and evaluate@syntic-bench; the support set (features + FAISS index, held whole by design) is
subtracted from the stages that load it and reported beside. Growth: the CPU-side stages' time at 10k,
50k and 100k captions, one training epoch's at 1k, 5k and 10k (training the tiny models costs 4-9 ms a
row on one core: 100k rows would take the whole time budget), and the fitted exponent b of time ~ n^b.
Each step runs in a fresh process with one torch thread (``--quick``: 500 to 4,000 captions).
"""
from __future__ import annotations

import functools
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import FLICKR8K_CAPTIONS, PHOTOS, Figure, main, peak_rss_mib, real_captions, run_child

ROWS_PER_SHARD = 2000
GROWTH = ("corpus", "encode_text", "support", "optimize", "train syntic")
MEMORY = ("encode_text", "support", "train syntic", "train pcmnet", "evaluate syntic bench")
HOLDS_SUPPORT = ("support", "train syntic", "evaluate syntic bench")
TRAINED = ("syntic", "pcmnet", "capdec", "maccap")      # the method instances the throwaway params keep


def params(n: int, captions: Path, device: str) -> dict:
    from pipeline.profiles import resolve_profile
    p = resolve_profile("offline")
    p.update(device=device, rows_per_shard=ROWS_PER_SHARD)
    p["corpus"] = {"path": str(captions), "format": "plain_text", "max_words": None, "deduplicate": False,
                   "source": f"bench-{n}"}
    p["evalsets"] = {"bench": {"images": str(PHOTOS), "references": str(FLICKR8K_CAPTIONS), "format": "flickr8k_tokens",
                               "only_images_in_folder": True, "max_images": 50}}
    p["optimize"] = {**p.get("optimize", {}), "epochs": 1}
    p["support"] = {**p.get("support", {}), "index": "auto"}
    p["target_supports"] = {}
    p["external_results"] = {}
    methods = p["methods"]
    p["methods"] = {name: {**methods[name], "train": {**methods[name].get("train", {}), "epochs": 1}}
                    for name in TRAINED if name in methods}
    p["modality_gap"] = {**p.get("modality_gap", {}), "evalset": "bench", "models": []}
    return p


def make_project(root: Path, n: int, device: str = "cpu") -> Path:
    """A folder with params.yaml, the captions file and an (empty) artifacts folder."""
    from pipeline import config as cfg
    from pipeline.profiles import render
    root.mkdir(parents=True, exist_ok=True)
    captions = root / "captions.txt"
    captions.write_text("\n".join(t.replace("\n", " ") for t in real_captions(n)) + "\n", encoding="utf-8")
    values = cfg.as_dict(cfg.from_dict(params(n, captions, device)))       # validated, every key explicit
    (root / "params.yaml").write_text(render(values, "bench"), encoding="utf-8")
    return root


def write_synthetic(seed: int = 0) -> None:
    """What generate + encode_synthetic + tag_synthetic would write, without a diffusion model: per caption,
    its text feature plus noise as the global feature, random patch tokens and raw grid cells (PCM-Net's
    encoder reads the grid; here D wide), and random tags."""
    import pyarrow as pa

    from pipeline import paths
    from pipeline.data.aligned import read_single_table
    from pipeline.data.shards import ShardedArtifact, feature_array, feature_numpy, write_sharded
    from pipeline.extract.tag import TAG_SCHEMA_FIELDS
    texts = ShardedArtifact(paths.TEXT_FEATURES)
    clip = texts.model
    dim, patches = int(clip["embed_dim"]), 16
    labels = read_single_table(paths.TAG_VOCABULARY, clip, "tag_vocabulary").column("label").to_pylist()

    def features(task):
        rng = np.random.default_rng([seed, task.index])
        part = texts.read_shard(task.index, ["caption_id", "text_feature"])
        t = feature_numpy(part.column("text_feature"))
        g = t + 0.5 * rng.standard_normal(t.shape).astype(np.float32) / math.sqrt(dim)
        g /= np.linalg.norm(g, axis=1, keepdims=True)
        return pa.table({"caption_id": part.column("caption_id"), "global": feature_array(g, "float16"),
                         "patches": feature_array(rng.standard_normal((len(t), patches * dim)), "float16"),
                         "grid": feature_array(rng.standard_normal((len(t), patches * dim)), "float16")})

    def tags(task):
        rng = np.random.default_rng([seed + 1, task.index])
        ids = texts.read_shard(task.index, ["caption_id"]).column("caption_id").to_pylist()
        picked = [sorted(set(rng.choice(labels, rng.integers(0, 4)).tolist())) for _ in ids]
        return pa.table({"caption_id": ids, "labels": pa.array(picked, TAG_SCHEMA_FIELDS[0][1]),
                         "scores": pa.array([[0.9] * len(p) for p in picked], TAG_SCHEMA_FIELDS[1][1]),
                         "boxes": pa.array([[[0.0, 0.0, 1.0, 1.0]] * len(p) for p in picked], TAG_SCHEMA_FIELDS[2][1])})

    n = texts.num_rows
    write_sharded(paths.SYNTHETIC_FEATURES, n, ROWS_PER_SHARD, f"bench-{texts.fingerprint}", features,
                  {"model": clip, "dtype": "float16", "num_patches": patches, "dim": dim, "grid_dim": dim},
                  desc="synthetic")
    write_sharded(paths.SYNTHETIC_TAGS, n, ROWS_PER_SHARD, f"bench-tags-{texts.fingerprint}", tags,
                  {"model": {"kind": "detector", "name": "bench"}, "threshold": 0.5}, desc="tags")


def stage_call(step: str):
    """The function that runs ``step`` ("corpus", "train syntic", "evaluate syntic bench", ...)."""
    import importlib
    name, *args = step.split()
    if name == "synthetic":
        return write_synthetic
    module, args = {"encode_text": ("encode", ["text"]), "encode_eval": ("encode", ["eval", *args]),
                    "tag_vocabulary": ("tag", ["vocabulary"]), "tag_eval": ("tag", ["eval", *args])}.get(name, (name, args))
    stage = importlib.import_module(f"stages.{module}")
    if module == "support":
        return stage.corpus_support
    return functools.partial(stage.main, *args)


def point_at(root: Path) -> None:
    """Point this process's pipeline (artifact paths, params.yaml) at the throwaway project ``root``."""
    from pipeline import config as cfg
    from pipeline import paths
    for key, value in paths.layout(root / "artifacts").items():
        setattr(paths, key, value)
    cfg.load = functools.partial(cfg.load, root / "params.yaml")


def child(root: Path, steps: list[str]) -> None:
    """In a fresh process: point the pipeline at ``root``, run ``steps`` in order, print each one's time and
    the process's peak RSS after it (meaningful for the first step only: a peak is never reset)."""
    import torch
    torch.set_num_threads(1)         # tiny models: one thread is fastest, and steady on a shared machine
    point_at(root)
    report = {}
    for step in steps:
        call = stage_call(step)
        before = peak_rss_mib()
        t0 = time.perf_counter()
        call()
        seconds = time.perf_counter() - t0
        support = root / "artifacts" / "supports" / "corpus"
        held = sum(f.stat().st_size for f in support.glob("*") if f.suffix in (".npy", ".faiss")) / 2**20 \
            if support.is_dir() and step.split()[0] in [s.split()[0] for s in HOLDS_SUPPORT] else 0.0
        report[step] = {"seconds": seconds, "peak_rss_mib": peak_rss_mib(), "rss_before_mib": before,
                        "support_mib": held}
    print(json.dumps(report))


CHEAP = ["corpus", "encode_text", "tag_vocabulary", "synthetic", "optimize", "support"]
MID = CHEAP + ["train syntic", "concepts"]
FULL = MID + ["train pcmnet", "evalset bench", "encode_eval bench", "tag_eval bench", "evaluate syntic bench"]


def measure(root: Path, n: int, steps: list[str], separate: bool, device: str) -> dict[str, dict]:
    """Build the pipeline of ``n`` captions under ``root`` through ``steps``; {step: its report}. ``separate``:
    each step in a fresh process of its own (for its peak RSS), else all in one (times only)."""
    done = root / "measured.json"
    if done.is_file():
        report = json.loads(done.read_text())
        if all(s in report for s in steps):
            return report
    shutil.rmtree(root, ignore_errors=True)
    make_project(root, n, device)
    report = {}
    for group in ([[s] for s in steps] if separate else [steps]):
        report |= run_child(["bench.scale", "--child", str(root), ",".join(group)], env={"TQDM_DISABLE": "1"})
    done.write_text(json.dumps(report, indent=1))
    return report


def exponent(ns: list[int], seconds: list[float]) -> float:
    return float(np.polyfit(np.log(ns), np.log(np.maximum(seconds, 1e-6)), 1)[0])


def work_dir() -> Path:
    """Where throwaway pipelines live: $SYNTHCAP_BENCH_WORK (bench/run.py shares them between benchmarks),
    else a fresh temp folder."""
    env = os.environ.get("SYNTHCAP_BENCH_WORK")
    return Path(env) if env else Path(tempfile.mkdtemp(prefix="synthcap-bench-"))


def sizes(quick: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(corpus sizes run whole, with training and captioning; larger sizes run up to the support set only).
    Training the tiny models costs ~4-9 ms a row on one core, so the whole runs stop at 10k (the memory
    figures: 1x = 1k, 10x = 10k) and the CPU-side stages grow on to 100k."""
    return ((500, 1000, 2000), (4000,)) if quick else ((1000, 5000, 10_000), (50_000, 100_000))


def run(device: str = "cpu", quick: bool = False) -> list[Figure]:
    whole, cheap = sizes(quick)
    small, large = whole[0], whole[-1]
    work = work_dir()
    reports = {n: measure(work / f"n{n}", n, FULL if n in (small, large) else MID, n in (small, large), device)
               for n in whole}
    reports |= {n: measure(work / f"n{n}", n, CHEAP, False, device) for n in cheap}
    figures = []
    for step in MEMORY:
        lo, hi = reports[small][step], reports[large][step]
        value, base = hi["peak_rss_mib"] - hi["support_mib"], lo["peak_rss_mib"] - lo["support_mib"]
        held = f"; support set held whole: {lo['support_mib']:.1f} → {hi['support_mib']:.1f} MiB, subtracted" \
            if hi["support_mib"] else ""
        own = (f"; above the process after its imports: {lo['peak_rss_mib'] - lo['rss_before_mib']:.0f} → "
               f"{hi['peak_rss_mib'] - hi['rss_before_mib']:.0f} MiB")
        figures.append(Figure(f"peak RSS of {step.replace(' ', '@', 1).replace(' ', '-')}: {large:,} vs {small:,} "
                              "captions", value, base, value / base, "MiB",
                              f"tiny models, 1 torch thread, {ROWS_PER_SHARD:,} rows a shard, {device}{held}{own}",
                              "≤ 1.3×", value / base <= 1.3))
    grown = {step: (whole[-1:] + cheap if len(cheap) >= 2 else whole[-2:] + cheap) for step in GROWTH}
    grown["train syntic"] = whole
    for step in GROWTH:
        ns = list(grown[step])
        seconds = [reports[n][step]["seconds"] for n in ns]
        b = exponent(ns, seconds)
        figures.append(Figure(f"growth of {step.replace(' ', '@')}: exponent b of time ~ n^b", b, 1.0, b, "",
                              ", ".join(f"{n:,}: {t:.1f} s" for n, t in zip(ns, seconds))
                              + f" (the stage's call, in a fresh process); tiny models, 1 torch thread, {device}",
                              "≈ 1 (≤ 1.2)", b <= 1.2))
    if "SYNTHCAP_BENCH_WORK" not in os.environ:
        shutil.rmtree(work, ignore_errors=True)
    return figures


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child(Path(sys.argv[2]), sys.argv[3].split(","))
    else:
        main(run, __doc__)
