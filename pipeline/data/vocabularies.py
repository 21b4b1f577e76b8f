"""Readers of the small one-file artifacts methods look things up in: the detector's tag vocabulary
(label -> CLIP text feature, SynTIC Eq. 4) and PCM-Net's concept vocabulary (word -> CLIP text
feature of "A photo of {c}"). Each refuses a file made by another CLIP model."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.data.aligned import check_dim, read_single_table
from pipeline.data.shards import feature_numpy


class TagVocabulary:
    """label -> CLIP text feature lookup, turning per-image label lists into padded [B, M, D] arrays."""

    def __init__(self, table: pa.Table):
        self.index = {label: i for i, label in enumerate(table.column("label").to_pylist())}
        self.features = feature_numpy(table.column("text_feature"))

    def batch(self, label_lists: list[list[str]]) -> tuple[np.ndarray, np.ndarray]:
        """-> tag_feats [B, M, D] (zeros where padded), tag_mask [B, M] (True = a real tag)."""
        width = max((len(labels) for labels in label_lists), default=0)
        feats = np.zeros((len(label_lists), width, self.features.shape[1]), np.float32)
        mask = np.zeros((len(label_lists), width), bool)
        for row, labels in enumerate(label_lists):
            for col, label in enumerate(labels):
                if label not in self.index:
                    raise KeyError(f"tag {label!r} is not in the tag vocabulary (was it made by another detector?)")
                feats[row, col] = self.features[self.index[label]]
                mask[row, col] = True
        return feats, mask


def read_concepts(path: Path, clip_model: dict) -> tuple[list[str], np.ndarray]:
    """The concept vocabulary, refusing one encoded by another CLIP model."""
    table = read_single_table(path, clip_model, "concepts")
    feats = feature_numpy(table.column("text_feature"))
    check_dim(feats, int(clip_model["embed_dim"]), "concept text features")
    return table.column("concept").to_pylist(), feats
