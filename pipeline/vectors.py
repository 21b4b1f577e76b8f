"""Feature vectors: the one L2 normalisation every module uses, and streamed means.

CLIP features are compared by cosine everywhere (the papers' f_sim), so rows are L2-normalised
before they are compared, averaged or fed to a captioner. Normalisation runs in float64 and returns
float32 (``dtype`` to keep float64); a zero row stays zero instead of becoming NaN.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import torch

EPS = 1e-12


def l2_normalize(x: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Row-wise (last axis) L2 normalisation of a numpy array: float64 arithmetic, ``dtype`` out."""
    x = np.asarray(x, dtype=np.float64)
    return (x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), EPS)).astype(dtype, copy=False)


def l2_normalize_torch(x: torch.Tensor) -> torch.Tensor:
    """The same for a tensor, in its own dtype and on its own device (used inside models)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(EPS)


def mean_direction(blocks: Iterable[np.ndarray]) -> np.ndarray:
    """Mean of the L2-normalised rows of a stream of [n, D] blocks, in float64 -> [D]."""
    total, count = None, 0
    for block in blocks:
        unit = l2_normalize(block, np.float64)
        total = unit.sum(axis=0) if total is None else total + unit.sum(axis=0)
        count += unit.shape[0]
    if count == 0:
        raise ValueError("cannot take the mean of zero features")
    return total / count
