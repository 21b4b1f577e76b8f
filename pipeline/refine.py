"""SynC (Kim et al., ACM MM 2025): refine the synthetic pairs before any captioner trains on them.

A text-to-image model often draws a caption wrongly. SynC re-pairs every caption c_i with the image of
the whole synthetic pool that fits it best, judged by a cycle, and drops the worst pairs:

    candidates   J_i = top-K images j by cos(t_i, v_j)                       (text -> image retrieval)
    cycle score  s_ij = max_{r in top-Kr captions of v_j by cos(v_j, t_r)} cos(e_r, e_i)
    re-pair      j*(i) = argmax_{j in J_i} s_ij,  score_i = s_ij*             (an image may serve many captions)
    filter       keep the top floor(tau * N) captions by score_i

with t / v the retrieval model's text / image features and e a sentence embedding for the text-text
similarity (boreng0817/SynC: src/utils.py loadKNNData, src/similarity_calculator.py simRetrieval,
src/dataset_builder.py; every feature L2-normalised, so inner products are cosines). As released:
the image -> caption retrieval runs over the whole corpus, the caption itself included (an image that
retrieves its own caption scores 1); ties go to the better-ranked candidate (np.argmax); the filter
sorts the scores descending (a stable sort: equal scores keep corpus order) and keeps the first
int(tau * N).

Retrieval goes through FAISS inner-product indexes (built as pipeline/support.py builds them) in batches of
captions; memory is O(batch x K + 512 x K x Kr x E) plus the features and the indexes, never caption x image.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.support import AUTO, TRAIN_POINTS_PER_LIST, auto_index, index_to_device
from pipeline.vectors import l2_normalize


SCORE_ROWS = 512
"""Captions whose cycle scores are computed at once: the retrieved embeddings are [512, K, Kr, E] (30 MiB at
K = 15, Kr = 2, E = 512), whatever the retrieval batch."""


@dataclass
class Refined:
    """Per corpus caption: the re-paired image row, its cycle score, whether the filter keeps it."""
    image_row: np.ndarray     # int64 [N]: row of the synthetic pool (its caption_id's position)
    score: np.ndarray         # float32 [N]
    kept: np.ndarray          # bool [N]


def inner_product_index(features: np.ndarray, spec: str = "Flat", nprobe: int = 8, chunk: int = 4096):
    """A FAISS inner-product index over the L2-normalised rows of ``features``, added in chunks of ``chunk`` rows
    (no normalised copy of the whole matrix beside the index's own: l2_normalize works in float64, so a chunk
    costs 2 x 8 bytes per value while it is added, whatever the pool). ``spec``: an index_factory string or "auto" (pipeline/support.py
    auto_index); an IVF index is trained on a seeded sample of TRAIN_POINTS_PER_LIST rows per list, as the
    support sets are."""
    import faiss
    n, d = features.shape
    spec = auto_index(n) if spec == AUTO else spec
    index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
    if not index.is_trained:
        lists = getattr(faiss.try_extract_index_ivf(index), "nlist", 0)
        rows = np.arange(n) if not lists or n <= TRAIN_POINTS_PER_LIST * lists else \
            np.sort(np.random.default_rng(0).choice(n, TRAIN_POINTS_PER_LIST * lists, replace=False))
        index.train(l2_normalize(features[rows]))
    for start in range(0, n, chunk):
        index.add(l2_normalize(features[start:start + chunk]))
    if "IVF" in spec:
        faiss.extract_index_ivf(index).nprobe = int(nprobe)
    return index


def search(index, queries: np.ndarray, k: int, batch_size: int) -> np.ndarray:
    """Ids [Q, k] of each query's k nearest features in the FAISS ``index`` by inner product, in batches of queries."""
    out = np.empty((queries.shape[0], k), dtype=np.int64)
    for start in range(0, queries.shape[0], batch_size):
        q = l2_normalize(queries[start:start + batch_size])
        _, ids = index.search(q, k)
        out[start:start + batch_size] = ids
    return out


def cycle_scores(candidates: np.ndarray, image_captions: np.ndarray, sentence: np.ndarray,
                 queries: np.ndarray) -> np.ndarray:
    """s_ij [B, K]: for caption rows ``queries`` [B] with candidate images ``candidates`` [B, K], the
    highest cosine between the caption's sentence embedding and those of the Kr captions each candidate
    retrieves (``image_captions`` [M, Kr]); ``sentence`` [N, E] is L2-normalised."""
    retrieved = sentence[image_captions[candidates]]          # [B, K, Kr, E]
    own = sentence[queries]                                   # [B, E]
    return np.einsum("bkre,be->bkr", retrieved, own).max(axis=2)


def keep_top(score: np.ndarray, tau: float) -> np.ndarray:
    """The filter: True for the int(tau * N) highest scores (ties: the earlier caption first)."""
    order = np.argsort(-score, kind="stable")
    kept = np.zeros(score.shape[0], dtype=bool)
    kept[order[:int(tau * score.shape[0])]] = True
    return kept


def refine_pairs(text: np.ndarray, image: np.ndarray, sentence: np.ndarray, *, k: int = 15, kr: int = 2,
                 tau: float = 0.9, index: str = "Flat", nprobe: int = 8, batch_size: int = 4096,
                 device: str = "cpu", threads: int | None = None, progress: bool = False) -> Refined:
    """SynC over a pool: ``text`` [N, D] retrieval-model features of the corpus captions, ``image``
    [M, D] those of the synthetic images, ``sentence`` [N, E] the captions' sentence embeddings for the
    text-text similarity (any scale: normalised here). ``index`` is a FAISS index_factory string for
    both indexes ("Flat": exact, as released; "auto": IVF from 50k rows, pipeline/support.py), searched on
    ``device`` (a GPU with faiss-gpu, else the CPU) with ``threads`` OpenMP threads (None: FAISS's default, all
    cores; on a busy machine FAISS's spinning threads are slower than one)."""
    n, m = text.shape[0], image.shape[0]
    if not 1 <= k <= m:
        raise ValueError(f"K = {k} candidates need 1 <= K <= {m} (the pool's images)")
    if not 1 <= kr <= n:
        raise ValueError(f"Kr = {kr} retrieved captions need 1 <= Kr <= {n} (the corpus's captions)")
    if sentence.shape[0] != n:
        raise ValueError(f"{sentence.shape[0]} sentence embeddings for {n} captions")
    import faiss
    before = faiss.omp_get_max_threads()
    if threads is not None:
        faiss.omp_set_num_threads(threads)
    try:
        return _refine(text, image, sentence, k, kr, tau, index, nprobe, batch_size, device, progress)
    finally:
        faiss.omp_set_num_threads(before)


def _refine(text, image, sentence, k, kr, tau, index, nprobe, batch_size, device, progress) -> Refined:
    from tqdm.auto import tqdm
    n = text.shape[0]
    unit = np.empty(sentence.shape, dtype=np.float32)          # normalised in chunks: no float64 copy of it all
    for start in range(0, n, batch_size):
        unit[start:start + batch_size] = l2_normalize(sentence[start:start + batch_size])
    sentence = unit
    captions = index_to_device(inner_product_index(text, index, nprobe), device)
    image_captions = search(captions, image, kr, batch_size)                          # [M, Kr]
    captions = None
    images = index_to_device(inner_product_index(image, index, nprobe), device)
    row, score = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.float32)
    for start in tqdm(range(0, n, batch_size), desc="refine", unit="batch", disable=not progress):
        rows = np.arange(start, min(start + batch_size, n))
        candidates = search(images, text[rows], k, batch_size)                       # [B, K]
        s = np.concatenate([cycle_scores(candidates[c:c + SCORE_ROWS], image_captions, sentence, rows[c:c + SCORE_ROWS])
                            for c in range(0, len(rows), SCORE_ROWS)])               # [B, K]
        best = s.argmax(axis=1)                                                       # first of equals
        row[rows] = candidates[np.arange(len(rows)), best]
        score[rows] = s[np.arange(len(rows)), best]
    return Refined(image_row=row, score=score, kept=keep_top(score, tau))


def refine_brute_force(text: np.ndarray, image: np.ndarray, sentence: np.ndarray, k: int, kr: int,
                       tau: float) -> Refined:
    """The same by dense matrices (caption x image, image x caption): the reference for tests and bench."""
    t, v, e = l2_normalize(text), l2_normalize(image), l2_normalize(sentence)
    candidates = np.argsort(-(t @ v.T), axis=1, kind="stable")[:, :k]                # [N, K]
    retrieved = np.argsort(-(v @ t.T), axis=1, kind="stable")[:, :kr]                # [M, Kr]
    tt = e @ e.T                                                                      # [N, N]
    s = np.stack([tt[i, retrieved[candidates[i]]].max(axis=1) for i in range(t.shape[0])])   # [N, K]
    best = s.argmax(axis=1)
    score = s[np.arange(t.shape[0]), best].astype(np.float32)
    return Refined(image_row=candidates[np.arange(t.shape[0]), best], score=score, kept=keep_top(score, tau))


def score_summary(score: np.ndarray, kept: np.ndarray) -> dict:
    """Counts and the score distribution, for report.json."""
    quantiles = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
    counts, edges = np.histogram(score, bins=10, range=(min(float(score.min()), 0.0), max(float(score.max()), 1.0)))
    return {"captions": int(score.shape[0]), "kept": int(kept.sum()), "dropped": int((~kept).sum()),
            "lowest_kept_score": float(score[kept].min()) if kept.any() else None,
            "score_mean": float(score.mean()),
            "score_quantiles": {str(q): float(v) for q, v in zip(quantiles, np.quantile(score, quantiles))},
            "score_histogram": {"edges": edges.tolist(), "counts": counts.tolist()}}
