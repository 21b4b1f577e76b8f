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
import math
from pathlib import Path

import numpy as np
import torch

# faiss is imported by the functions that build, load or move an index: importing this module (the
# runner does, for every method) does not load it.
from pipeline.vectors import l2_normalize

INDEX_FILE = "index.faiss"
FEATURES_FILE = "features.npy"
META_FILE = "support.json"


AUTO = "auto"
AUTO_IVF_FROM = 50_000
"""`index: auto` builds an IVF index from this many support features on (README, "Scale": the smallest
measured size at which the IVF top-k is >= 10x faster than the exact Eq. 3 at mean cosine >= 0.999)."""


def auto_index(n: int) -> str:
    """The index `index: auto` builds over n features: "Flat" with the exact Eq. 3 (top_k dropped) below
    AUTO_IVF_FROM, where the exact projection is fast and no top-k is >= 10x faster; above, "IVF{nlist},Flat"
    with nlist the power of two nearest to 2 sqrt(n) (a query scans nlist centroids + nprobe lists of
    ~n / nlist rows: 512 lists at 50k-100k, 1024 at 500k) and the set's top_k."""
    if n < AUTO_IVF_FROM:
        return "Flat"
    return f"IVF{2 ** round(math.log2(2 * math.sqrt(n)))},Flat"


TRAIN_POINTS_PER_LIST = 64
"""An IVF index's coarse quantizer is trained on at most this many features per list (a seeded sample;
FAISS's own cap is 256): the k-means of a 500k set in seconds, not minutes, with lists as good."""


def _exact_distances(index: "faiss.Index") -> bool:
    """Whether ``index.search`` returns exact inner products (its vectors are stored uncompressed)."""
    import faiss
    try:
        name = type(faiss.downcast_index(index)).__name__
    except Exception:           # noqa: BLE001 (an index type downcast does not know)
        return False
    return name in ("IndexFlat", "IndexFlatIP", "IndexIVFFlat", "IndexHNSWFlat", "GpuIndexFlat", "GpuIndexFlatIP",
                    "GpuIndexIVFFlat")


def gpu_count() -> int:
    """GPUs the installed FAISS can use (0 with faiss-cpu)."""
    import faiss
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


def index_to_device(index: "faiss.Index", device: str) -> "faiss.Index":
    """The FAISS index to search on ``device``: on "cuda" / "cuda:N" a GPU copy on GPU N when the installed
    FAISS has GPU support (faiss-gpu), else ``index`` itself (faiss-cpu searches on the CPU)."""
    import faiss
    if not device.startswith("cuda") or gpu_count() == 0:
        return index
    gpu = int(device.split(":")[1]) if ":" in device else 0
    return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), gpu, index)


def _check_2d(name: str, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D array [rows, dim], got shape {x.shape}")
    return x


def _check_dims(queries: np.ndarray, dim: int) -> None:
    if queries.shape[1] != dim:
        raise ValueError(f"query dim {queries.shape[1]} does not match support dim {dim}")


def project_exact(queries: np.ndarray, support: np.ndarray, tau: float, chunk_size: int = 32768,
                  query_chunk_size: int = 1024, normalized: bool = False, device: str = "cpu") -> np.ndarray:
    """Eq. 3 over ALL support features, with a streaming softmax (torch: the same matmuls as a dense
    ``softmax(q t^T / tau) t``, without its Q x N matrix).

    queries [Q, D], support [N, D] (normalised here unless ``normalized``, so the scores are cosines,
    Eq. 1) -> [Q, D]. For each block of ``query_chunk_size`` queries the support set is read in chunks of
    ``chunk_size`` rows, keeping per query a running max m of the logits cos / tau, a running normaliser
    z = sum exp(logit - m) and a running weighted sum acc = sum exp(logit - m) t_j; when m grows, z and acc
    are rescaled by exp(m_old - m). v = acc / z at the end. A chunk's logits and weights are float32 (1/tau
    is folded into the queries: one matmul gives the logits), z and acc accumulate in float64.
    Memory: O(query_chunk_size x chunk_size + Q x D). ``device``: where torch computes (cuda: on the GPU).
    """
    queries = _check_2d("queries", queries)
    support = _check_2d("support", support)
    _check_dims(queries, support.shape[1])
    if support.shape[0] == 0:
        raise ValueError("the support set is empty")
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    q_all = torch.from_numpy(l2_normalize(queries)).to(device) / tau
    out = np.empty(q_all.shape, dtype=np.float32)

    def chunk(c0: int) -> torch.Tensor:
        part = support[c0:c0 + chunk_size]
        part = np.ascontiguousarray(part, dtype=np.float32) if normalized else l2_normalize(part)
        return torch.from_numpy(part).to(device)

    f64 = {"dtype": torch.float64, "device": device}
    for q0 in range(0, q_all.shape[0], query_chunk_size):
        q = q_all[q0:q0 + query_chunk_size]
        m = torch.full((len(q), 1), -torch.inf, **f64)               # running max of the logits
        z = torch.zeros((len(q), 1), **f64)                          # running sum of the weights
        acc = torch.zeros(q.shape, **f64)                            # running weighted sum of t_j
        for c0 in range(0, support.shape[0], chunk_size):
            t = chunk(c0)
            s = q @ t.T                                              # cos(s, t_j) / tau (Eq. 1, 3)
            m_new = torch.maximum(m, s.max(dim=1, keepdim=True).values.double())
            w = s.sub_(m_new.float()).exp_()                         # exp(logit - m), in place
            scale = torch.exp(m - m_new)                             # exp(-inf) = 0 at the start
            z = z * scale + w.sum(dim=1, keepdim=True).double()
            acc = acc * scale + (w @ t).double()
            m = m_new
        out[q0:q0 + len(q)] = (acc / z).float().cpu().numpy()
    return out


def _softmax_combine(q: torch.Tensor, feats: torch.Tensor, ids: np.ndarray, tau: float,
                     scores: np.ndarray | None = None) -> np.ndarray:
    """Eq. 3 restricted to the given neighbour ids [Q, k] (-1 = no neighbour, ignored). ``scores``: the
    index's inner products [Q, k] when they are exact (``_exact_distances``); else (None) the cosines are
    recomputed from the stored features. The weighted sum of the neighbours is one ``embedding_bag``
    (no [Q, k, D] copy of them)."""
    valid = ids >= 0
    if not valid.any(axis=1).all():
        raise RuntimeError("the index returned no neighbour for some queries (raise nprobe)")
    idx = torch.from_numpy(np.where(valid, ids, 0)).to(feats.device)
    if scores is None:
        s = torch.bmm(feats[idx], q[:, :, None])[..., 0]                       # exact cosines [Q, k]
    else:
        s = torch.from_numpy(np.ascontiguousarray(scores)).to(feats.device)
    s = (s.double() / tau).masked_fill(~torch.from_numpy(valid).to(feats.device), -torch.inf)
    w = torch.softmax(s, dim=1)
    w = w.masked_fill(w < 1e-30, 0.0).float()        # no float32 denormals (slow), a change below 1e-28
    k = idx.shape[1]
    offsets = torch.arange(0, idx.numel(), k, device=feats.device)
    return torch.nn.functional.embedding_bag(idx.reshape(-1), feats, offsets, mode="sum",
                                             per_sample_weights=w.reshape(-1)).cpu().numpy()


class SupportSet:
    """L2-normalised support features [N, D] float32 + a FAISS inner-product index over them."""

    def __init__(self, features: np.ndarray, index: "faiss.Index", index_factory: str = "Flat",
                 nprobe: int | None = None, tau: float = 0.01, top_k: int | None = None, model: dict | None = None,
                 device: str = "cpu"):
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
        self.device = device                     # where torch computes Eq. 3 (to_device)
        self._on_device = torch.from_numpy(features).to(device)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def build(cls, features: np.ndarray, index: str = "Flat", nprobe: int | None = None, tau: float = 0.01,
              top_k: int | None = None, model: dict | None = None) -> "SupportSet":
        """Normalise `features` [N, D] and index them. `index` is a faiss.index_factory string:
        "Flat" (exact inner product, default), "IVF256,Flat", "HNSW32", ..., or "auto" (`auto_index`:
        the exact Eq. 3 on a small set, an IVF index and the top-k on a large one). The index is trained
        on the features when it needs training. `nprobe` only applies to IVF indexes. `tau` and
        `top_k` are this set's Eq. 3 settings, `model` the identity of the CLIP that encoded it."""
        import faiss
        feats = l2_normalize(_check_2d("features", features))
        if feats.shape[0] == 0:
            raise ValueError("cannot build a support set from zero features")
        if index == AUTO:
            index = auto_index(feats.shape[0])
            top_k = None if index == "Flat" else top_k
        idx = faiss.index_factory(feats.shape[1], index, faiss.METRIC_INNER_PRODUCT)
        if not idx.is_trained:
            lists = getattr(faiss.try_extract_index_ivf(idx), "nlist", 0)
            sample = feats
            if lists and feats.shape[0] > TRAIN_POINTS_PER_LIST * lists:
                rows = np.random.default_rng(0).choice(feats.shape[0], TRAIN_POINTS_PER_LIST * lists, replace=False)
                sample = feats[np.sort(rows)]
            idx.train(sample)
        idx.add(feats)
        out = cls(feats, idx, index_factory=index, tau=tau, top_k=top_k, model=model)
        if nprobe is not None and "IVF" in index:
            out.set_nprobe(nprobe)
        return out

    def set_nprobe(self, nprobe: int) -> None:
        """Number of IVF lists visited per query (nprobe = number of lists -> exhaustive)."""
        import faiss
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
                chunk_size: int = 32768, query_chunk_size: int = 1024) -> np.ndarray:
        """Eq. 3 with this set's own tau and top_k unless given. top_k=None: exact over all N features
        (project_exact, in blocks of ``query_chunk_size`` queries x ``chunk_size`` features). top_k=k:
        softmax over the k nearest support features found by the index, with exact cosines (the index's
        own when it stores the vectors uncompressed, Flat / IVF-Flat / HNSW-Flat; else recomputed from the
        features, for as many queries at a time as keep their gathered neighbours within 32 MB)."""
        queries = _check_2d("queries", queries)
        _check_dims(queries, self.dim)
        tau = self.tau if tau is None else tau
        top_k = self.top_k if top_k == "own" else top_k
        if top_k is None:
            return project_exact(queries, self.features, tau, chunk_size=chunk_size,
                                 query_chunk_size=query_chunk_size, normalized=True, device=self.device)
        if tau <= 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        k = min(int(top_k), self.n)
        if k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        q_all = l2_normalize(queries)
        out = np.empty(q_all.shape, dtype=np.float32)
        exact = _exact_distances(self.index)
        block = query_chunk_size if exact else max(1, min(query_chunk_size, 2**23 // (k * self.dim)))
        for q0 in range(0, q_all.shape[0], block):
            q = q_all[q0:q0 + block]
            scores, ids = self.index.search(q, k)
            out[q0:q0 + len(q)] = _softmax_combine(torch.from_numpy(q).to(self.device), self._on_device, ids, tau,
                                                   scores if exact else None)
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
        """The same set computed on ``device``: on a CUDA device, Eq. 3's torch work (the exact projection,
        the top-k softmax) runs on the GPU, and the FAISS index moves to the GPU when the installed FAISS
        has GPU support (``pip install -e '.[gpu]'``: faiss-gpu; else it stays on the CPU). Projections give
        the same neighbours either way for an exact (Flat) index."""
        if not device.startswith("cuda"):
            return self
        out = SupportSet(self.features, index_to_device(self.index, device), self.index_factory, tau=self.tau,
                         top_k=self.top_k, model=self.model, device=device)
        out.nprobe = self.nprobe
        return out

    # ---- persistence --------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        import faiss
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
        import faiss
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
