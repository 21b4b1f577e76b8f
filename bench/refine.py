"""Stage refine (SynC, pipeline/refine.py) at 50k captions x 50k synthetic images: FAISS retrieval in batches vs a
brute-force baseline (dense torch matmul + topk over blocks of captions: the release's exact search, batched), in
the same run; and its peak memory as the pool grows (each size in a fresh process).

    .venv/bin/python -m bench.refine [--device cpu] [--quick]

The caption features are clustered like caption features (bench.support.clustered: 100 topics of 100 centres);
each synthetic image is its caption's feature plus noise (cosine ~0.8), as a drawing of it; the sentence
embeddings for the text-text similarity are the caption features (the world and offline profiles' choice).
d = 512, K = 15, Kr = 2, tau = 0.9 (SynC's). Figures: refine with the exact Flat index (what the profiles run)
and with the IVF index ``index: auto`` builds from 50k rows (agreement: the share of captions re-paired with
the same image as the exact search), both against brute force; and the peak RSS above the inputs and what refine
must hold (the indexes' copies of the features, the normalised sentence embeddings) at 1/4 and all of the pool:
O(batch x K + 512 x K x Kr x E), never caption x image.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import Figure, main, peak_rss_mib, run_child
from bench.support import clustered
from pipeline.refine import Refined, keep_top, refine_pairs
from pipeline.support import auto_index

D, K, KR, TAU = 512, 15, 2, 0.9


def pool(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(caption features [n, D], synthetic image features [n, D]) float32 unit rows."""
    text, _ = clustered(n, 1, seed=seed)
    rng = np.random.default_rng(seed + 1)
    image = text + 0.75 * rng.standard_normal(text.shape, dtype=np.float32) / np.sqrt(D)
    image /= np.linalg.norm(image, axis=1, keepdims=True)
    return text, image.astype(np.float32)


def top_k_dense(queries: torch.Tensor, keys: torch.Tensor, k: int, block: int = 1024) -> torch.Tensor:
    return torch.cat([torch.topk(queries[i:i + block] @ keys.T, k, dim=1).indices
                      for i in range(0, len(queries), block)])


def brute_force(text: np.ndarray, image: np.ndarray, k: int = K, kr: int = KR, tau: float = TAU,
                block: int = 1024) -> Refined:
    """The baseline: exact retrieval by dense matmul + topk (blocks of ``block`` queries), the cycle score by
    gathering, as pipeline/refine.py computes it."""
    t, v = torch.from_numpy(text), torch.from_numpy(image)
    candidates = top_k_dense(t, v, k, block)                        # [N, K]
    retrieved = top_k_dense(v, t, kr, block)                        # [M, Kr]
    rows, score = np.empty(len(t), np.int64), np.empty(len(t), np.float32)
    for i in range(0, len(t), block):
        c = candidates[i:i + block]
        s = torch.einsum("bkre,be->bkr", t[retrieved[c]], t[i:i + block]).amax(dim=2)
        best = s.argmax(dim=1)
        rows[i:i + block] = c.gather(1, best[:, None])[:, 0].numpy()
        score[i:i + block] = s.gather(1, best[:, None])[:, 0].numpy()
    return Refined(image_row=rows, score=score, kept=keep_top(score, tau))


def reset_peak() -> bool:
    """Reset this process's VmHWM (Linux: /proc/self/clear_refs 5), so the next peak is the step's own."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return peak_rss_mib()


def child(n: int, index: str) -> dict:
    """In a fresh process: the pool, then refine alone; its peak RSS, the RSS it started from, and what it must
    hold besides its inputs: the two exact (Flat) indexes' copies of the features and the normalised sentence
    embeddings (here the caption features)."""
    torch.set_num_threads(1)
    text, image = pool(n)
    reset = reset_peak()
    start = rss_mib()
    t0 = time.perf_counter()
    refine_pairs(text, image, text, k=K, kr=KR, tau=TAU, index=index, threads=1)
    return {"seconds": time.perf_counter() - t0, "peak_mib": peak_rss_mib(), "start_mib": start,
            "held_mib": (2 * text.nbytes + image.nbytes) / 2**20, "reset": reset}


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def run(device: str = "cpu", quick: bool = False) -> list[Figure]:
    n = 4_000 if quick else 50_000
    text, image = pool(n)
    where = (f"{n:,} captions x {n:,} images, d = {D}, K = {K}, Kr = {KR}, tau = {TAU}, {torch.get_num_threads()} "
             "threads (torch and FAISS)")
    base, t_base = timed(lambda: brute_force(text, image))             # once each: minutes at 50k on 2 cores
    exact, t_flat = timed(lambda: refine_pairs(text, image, text, k=K, kr=KR, tau=TAU, index="Flat", device=device,
                                                   threads=torch.get_num_threads()))
    same = float((exact.image_row == base.image_row).mean())
    figures = [Figure(f"refine, FAISS Flat (exact) vs brute force, {n:,} x {n:,}", n / t_flat, n / t_base,
                      t_base / t_flat, "captions/s", f"{where}; same image as brute force for {same:.4f} of the "
                      "captions (1 up to exact ties); timed once each", "≥ 0.8× (an exact search either way)",
                      t_base / t_flat >= 0.8)]
    spec = auto_index(max(n, 50_000))
    ivf, t_ivf = timed(lambda: refine_pairs(text, image, text, k=K, kr=KR, tau=TAU, index=spec, device=device,
                                                 threads=torch.get_num_threads()))
    agree = float((ivf.image_row == exact.image_row).mean())
    kept = float((ivf.kept == exact.kept).mean())
    figures.append(Figure(f"refine, FAISS {spec} (index: auto, nprobe 8) vs brute force, {n:,} x {n:,}", n / t_ivf,
                          n / t_base, t_base / t_ivf, "captions/s", f"{where}; the exact search's image for "
                          f"{agree:.4f} of the captions, the same kept/dropped for {kept:.4f}; build included", ""))
    text = image = exact = base = ivf = None
    small, large = (1_000, 4_000) if quick else (12_500, 50_000)
    lo, hi = (run_child(["bench.refine", "--child", str(m), "Flat"]) for m in (small, large))
    extra = lambda r: r["peak_mib"] - r["start_mib"] - r["held_mib"]        # noqa: E731
    dense = large * large * 4 / 2**20
    figures.append(Figure(f"peak RSS of refine above its inputs and indexes: {large:,} vs {small:,}",
                          extra(hi), extra(lo), extra(hi) / max(extra(lo), 1.0), "MiB",
                          f"fresh process each, 1 thread, Flat; the indexes and normalised embeddings it holds "
                          f"{lo['held_mib']:.0f} → {hi['held_mib']:.0f} MiB; peak above the start "
                          f"{lo['peak_mib'] - lo['start_mib']:.0f} → {hi['peak_mib'] - hi['start_mib']:.0f} MiB; a "
                          f"dense caption x image matrix would be {dense:,.0f} MiB"
                          + ("" if hi["reset"] else "; VmHWM could not be reset: includes making the pool"),
                          "flat: ≤ 1.5× for 4× the pool", extra(hi) / max(extra(lo), 1.0) <= 1.5))
    return figures


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(child(int(sys.argv[2]), sys.argv[3])))
    else:
        main(run, __doc__)
