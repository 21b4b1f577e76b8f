"""The projection support set of SynTIC (Liu et al., AAAI 2024), Eq. 3.

    v = sum_j softmax_j( cos(s, t_j) / tau ) * t_j          (Eq. 3, f_sim = cosine, Eq. 1)

over the CLIP text features t_j of every corpus caption. Two ways to compute it:

- `project_exact`: the full softmax over all N support features, streamed over chunks of the
  support set with a running max / log-sum-exp, so memory is O(queries x chunk), never O(Q x N).
- `SupportSet.project(..., top_k=k)`: a FAISS inner-product index finds each query's k nearest
  support features and the softmax runs over those k only. With a small tau the weights of Eq. 3
  are concentrated on the nearest features, so this is a close approximation;
  `SupportSet.projection_agreement` measures how close (cosine to the exact projection).

A support set carries the tau and top-k of its dataset (tau belongs to the captions it holds:
1/100 for COCO, 1/80 for Flickr30k) and the identity of the CLIP model that encoded them, all saved
beside the index; ``project(queries)`` uses its own tau and top-k.

Arrays are numpy float32 in and out; the softmax is accumulated in float64.
"""
from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np

from pipeline.vectors import l2_normalize

INDEX_FILE = "index.faiss"
FEATURES_FILE = "features.npy"
META_FILE = "support.json"


def gpu_count() -> int:
    """GPUs the installed FAISS can use (0 with faiss-cpu)."""
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def _check_2d(name: str, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [rows, dim], got shape {x.shape}")
    return x


def _check_dims(queries: np.ndarray, dim: int) -> None:
    if queries.shape[1] != dim:
        raise ValueError(f"query dim {queries.shape[1]} does not match support dim {dim}")


def project_exact(queries: np.ndarray, support: np.ndarray, tau: float,
                  chunk_size: int = 65536, query_chunk_size: int = 256) -> np.ndarray:
    """Eq. 3 over ALL support features, with a streaming softmax.

    queries [Q, D], support [N, D] (normalised here, so the scores are cosines, Eq. 1) -> [Q, D].
    The support set is read once, in chunks of `chunk_size` rows; per query a running max m, a
    running normaliser z = sum exp(score - m) and a running weighted sum acc = sum exp(score - m) t_j
    are kept; whenever m grows, z and acc are rescaled by exp(m_old - m). v = acc / z at the end.
    Memory: O(query_chunk_size x chunk_size + Q x D).
    """
    queries = _check_2d("queries", queries)
    support = _check_2d("support", support)
    _check_dims(queries, support.shape[1])
    if support.shape[0] == 0:
        raise ValueError("the support set is empty")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    q_all = l2_normalize(queries)
    Q = q_all.shape[0]
    m = np.full((Q, 1), -np.inf)                 # running max of the scores
    z = np.zeros((Q, 1))                         # running sum of exp(score - m)
    acc = np.zeros(q_all.shape)                  # running sum of exp(score - m) * t_j
    for c0 in range(0, support.shape[0], chunk_size):
        t = l2_normalize(support[c0:c0 + chunk_size])
        for q0 in range(0, Q, query_chunk_size):
            rows = slice(q0, q0 + query_chunk_size)
            s = (q_all[rows] @ t.T).astype(np.float64) / tau          # cos(s, t_j) / tau (Eq. 1, 3)
            m_new = np.maximum(m[rows], s.max(axis=1, keepdims=True))
            scale = np.exp(m[rows] - m_new)                           # exp(-inf) = 0 at the start
            w = np.exp(s - m_new)
            z[rows] = z[rows] * scale + w.sum(axis=1, keepdims=True)
            acc[rows] = acc[rows] * scale + (w.astype(np.float32) @ t)
            m[rows] = m_new
    return (acc / z).astype(np.float32)


def _softmax_combine(q: np.ndarray, feats: np.ndarray, ids: np.ndarray, tau: float) -> np.ndarray:
    """Eq. 3 restricted to the given neighbour ids [Q, k] (-1 = no neighbour, ignored)."""
    valid = ids >= 0
    if not valid.any(axis=1).all():
        raise RuntimeError("the index returned no neighbour for some queries (raise nprobe)")
    nb = feats[np.where(valid, ids, 0)]                                  # [Q, k, D]
    s = np.einsum("qd,qkd->qk", q, nb).astype(np.float64) / tau          # exact cosines / tau
    s = np.where(valid, s, -np.inf)
    w = np.exp(s - s.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    return np.einsum("qk,qkd->qd", w.astype(np.float32), nb)


class SupportSet:
    """L2-normalised support features [N, D] float32 + a FAISS inner-product index over them."""

    def __init__(self, features: np.ndarray, index: "faiss.Index", index_factory: str = "Flat",
                 nprobe: int | None = None, tau: float = 0.01, top_k: int | None = None, model: dict | None = None):
        features = _check_2d("features", features)
        if features.dtype != np.float32 or not features.flags.c_contiguous:
            features = np.ascontiguousarray(features, dtype=np.float32)
        if index.d != features.shape[1]:
            raise ValueError(f"index dim {index.d} does not match features dim {features.shape[1]}")
        if index.ntotal != features.shape[0]:
            raise ValueError(f"index holds {index.ntotal} vectors but there are "
                             f"{features.shape[0]} features")
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.features = features
        self.index = index
        self.index_factory = index_factory
        self.nprobe = nprobe
        self.tau, self.top_k, self.model = float(tau), top_k, model

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def build(cls, features: np.ndarray, index: str = "Flat", nprobe: int | None = None, tau: float = 0.01,
              top_k: int | None = None, model: dict | None = None) -> "SupportSet":
        """Normalise `features` [N, D] and index them. `index` is a faiss.index_factory string:
        "Flat" (exact inner product, default), "IVF256,Flat", "HNSW32", ... The index is trained
        on the features when it needs training. `nprobe` only applies to IVF indexes. `tau` and
        `top_k` are this set's Eq. 3 settings, `model` the identity of the CLIP that encoded it."""
        feats = l2_normalize(_check_2d("features", features))
        if feats.shape[0] == 0:
            raise ValueError("cannot build a support set from zero features")
        idx = faiss.index_factory(feats.shape[1], index, faiss.METRIC_INNER_PRODUCT)
        if not idx.is_trained:
            idx.train(feats)
        idx.add(feats)
        out = cls(feats, idx, index_factory=index, tau=tau, top_k=top_k, model=model)
        if nprobe is not None and "IVF" in index:
            out.set_nprobe(nprobe)
        return out

    def set_nprobe(self, nprobe: int) -> None:
        """Number of IVF lists visited per query (nprobe = number of lists -> exhaustive)."""
        try:
            ivf = faiss.extract_index_ivf(self.index)
        except RuntimeError as e:
            raise ValueError(f"nprobe only applies to IVF indexes, not {self.index_factory!r}") from e
        ivf.nprobe = int(nprobe)
        self.nprobe = int(nprobe)

    @property
    def n(self) -> int:
        return self.features.shape[0]

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    # ---- Eq. 3 --------------------------------------------------------------------------------
    def project(self, queries: np.ndarray, tau: float | None = None, top_k: int | None | str = "own",
                chunk_size: int = 65536, query_chunk_size: int = 256) -> np.ndarray:
        """Eq. 3 with this set's own tau and top_k unless given. top_k=None: exact over all N features
        (project_exact). top_k=k: softmax over the k nearest support features found by the index
        (cosines recomputed exactly)."""
        queries = _check_2d("queries", queries)
        _check_dims(queries, self.dim)
        tau = self.tau if tau is None else tau
        top_k = self.top_k if top_k == "own" else top_k
        if top_k is None:
            return project_exact(queries, self.features, tau, chunk_size=chunk_size, query_chunk_size=query_chunk_size)
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        k = min(int(top_k), self.n)
        if k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        q_all = l2_normalize(queries)
        out = np.empty(q_all.shape, dtype=np.float32)
        for q0 in range(0, q_all.shape[0], query_chunk_size):
            q = q_all[q0:q0 + query_chunk_size]
            _, ids = self.index.search(q, k)
            out[q0:q0 + query_chunk_size] = _softmax_combine(q, self.features, ids, tau)
        return out

    def projection_agreement(self, queries: np.ndarray, tau: float, top_k: int) -> dict:
        """Cosine between the top-k and the exact projections of `queries` (for the stage report)."""
        approx = self.project(queries, tau, top_k=top_k).astype(np.float64)
        exact = self.project(queries, tau, top_k=None).astype(np.float64)
        norms = np.linalg.norm(approx, axis=1) * np.linalg.norm(exact, axis=1)
        cos = np.clip((approx * exact).sum(axis=1) / np.maximum(norms, 1e-300), -1.0, 1.0)
        return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
                "n": int(cos.shape[0]), "top_k": int(min(top_k, self.n)), "tau": float(tau)}

    # ---- device -------------------------------------------------------------------------------
    def to_device(self, device: str) -> "SupportSet":
        """The same set searched on ``device``: a CUDA device moves the FAISS index to the GPU when the
        installed FAISS has GPU support (``pip install -e '.[gpu]'``: faiss-gpu); otherwise (CPU, or a
        CPU-only FAISS) the index stays on the CPU. Projections give the same neighbours either way for
        an exact (Flat) index."""
        if not device.startswith("cuda") or gpu_count() == 0:
            return self
        gpu = int(device.split(":")[1]) if ":" in device else 0
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), gpu, self.index)
        out = SupportSet(self.features, index, self.index_factory, tau=self.tau, top_k=self.top_k, model=self.model)
        out.nprobe = self.nprobe
        return out

    # ---- persistence --------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(d / INDEX_FILE))
        np.save(d / FEATURES_FILE, self.features, allow_pickle=False)
        meta = {"n": self.n, "dim": self.dim, "index": self.index_factory, "nprobe": self.nprobe,
                "tau": self.tau, "top_k": self.top_k, "model": self.model}
        (d / META_FILE).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
        return d

    @classmethod
    def load(cls, directory: str | Path) -> "SupportSet":
        d = Path(directory)
        for f in (INDEX_FILE, FEATURES_FILE, META_FILE):
            if not (d / f).is_file():
                raise FileNotFoundError(f"support set at {d} is missing {f}")
        meta = json.loads((d / META_FILE).read_text())
        feats = np.load(d / FEATURES_FILE, allow_pickle=False)
        index = faiss.read_index(str(d / INDEX_FILE))
        if feats.ndim != 2 or feats.shape != (meta["n"], meta["dim"]):
            raise ValueError(f"support set at {d}: {FEATURES_FILE} has shape {feats.shape}, "
                             f"{META_FILE} says n={meta['n']}, dim={meta['dim']}")
        if index.ntotal != meta["n"] or index.d != meta["dim"]:
            raise ValueError(f"support set at {d}: {INDEX_FILE} holds {index.ntotal} vectors of dim "
                             f"{index.d}, {META_FILE} says n={meta['n']}, dim={meta['dim']}")
        out = cls(feats, index, index_factory=meta["index"], tau=meta.get("tau", 0.01), top_k=meta.get("top_k"),
                  model=meta.get("model"))
        if meta.get("nprobe") is not None:
            out.set_nprobe(meta["nprobe"])
        return out
