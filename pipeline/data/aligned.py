"""Stream aligned rows of several per-caption (or per-image) artifacts, shard by shard.

Every per-caption artifact is sharded like the corpus, so shard k of each covers the same rows.
A reader takes shard k of each artifact it needs, checks the ids agree, and hands the columns on as
numpy; memory is one shard of each, whatever the corpus size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.shards import ShardedArtifact, feature_numpy, read_meta, require_same_model


@dataclass(frozen=True)
class Column:
    """``artifact``'s column ``name``, delivered under ``as_name`` (default: name)."""
    artifact: ShardedArtifact
    name: str
    as_name: str | None = None


def _values(column: pa.ChunkedArray):
    column = column.combine_chunks()
    if pa.types.is_fixed_size_list(column.type):
        return feature_numpy(column)
    return column.to_pylist()


def aligned_shards(id_column: str, columns: list[Column], order: list[int] | None = None) -> Iterator[dict]:
    """Yield ``{id_column: ids, <as_name>: values, ...}`` per shard (features as float32 [n, D])."""
    artifacts = {id(c.artifact): c.artifact for c in columns}
    first = next(iter(artifacts.values()))
    for art in artifacts.values():
        if len(art.paths) != len(first.paths) or art.num_rows != first.num_rows:
            raise ValueError(f"{art.folder} ({art.num_rows} rows, {len(art.paths)} shards) is not aligned with "
                             f"{first.folder} ({first.num_rows} rows, {len(first.paths)} shards): rerun the pipeline")
    for k in (order if order is not None else range(len(first.paths))):
        tables = {key: art.read_shard(k, [id_column] + [c.name for c in columns if c.artifact is art])
                  for key, art in artifacts.items()}
        ids = tables[id(first)].column(id_column).to_pylist()
        for key, table in tables.items():
            if table.column(id_column).to_pylist() != ids:
                raise ValueError(f"shard {k} of {artifacts[key].folder} holds other rows than shard {k} of "
                                 f"{first.folder}: the artifacts come from different runs; rerun the pipeline")
        row = {id_column: ids}
        for c in columns:
            row[c.as_name or c.name] = _values(tables[id(c.artifact)].column(c.name))
        yield row


def shard_order(num_shards: int, epoch: int, seed: int) -> list[int]:
    """A per-epoch shuffled shard order (rows are shuffled within a shard by the caller)."""
    return np.random.default_rng([seed, epoch]).permutation(num_shards).tolist()


def read_single_table(path, expected_model: dict | None = None, what: str = "table") -> pa.Table:
    """A one-file artifact (e.g. the tag vocabulary), refusing one made by another model."""
    if expected_model is not None:
        require_same_model(features=expected_model, **{what: read_meta(path).get("model")})
    return pq.read_table(path)


def check_dim(features: np.ndarray, expected: int, what: str) -> None:
    if features.ndim != 2 or features.shape[1] != expected:
        raise ValueError(f"{what} have shape {features.shape} but {expected}-dimensional features were expected "
                         f"(were they made by another CLIP model?)")


def read_refined_pairs(refined, caption_ids: list | None = None) -> tuple[np.ndarray, np.ndarray]:
    """SynC's refined pairs (the refine stage's artifact, one row per corpus caption, in corpus order): each
    caption's re-paired synthetic image row (int64 [N]) and whether the filter keeps it (bool [N]). With
    ``caption_ids``, the artifact must hold exactly those captions, in that order."""
    if caption_ids is not None and refined.read_column("caption_id").to_pylist() != list(caption_ids):
        raise ValueError(f"{refined.folder} holds other captions than the corpus side: rerun `dvc repro refine`")
    return (refined.read_column("image_row").to_numpy().astype(np.int64),
            refined.read_column("kept").to_numpy(zero_copy_only=False).astype(bool))


class RowGather:
    """Rows of per-caption artifacts (sharded like the corpus) by row number, in the order asked: e.g. the
    features of the synthetic images SynC re-paired a shard's captions with (pipeline/refine.py). Each call
    reads every shard that holds an asked row once, with only the columns asked for; memory is one shard
    of each artifact plus the rows returned."""

    def __init__(self, columns: list[Column]):
        self.columns = columns
        arts = {id(c.artifact): c.artifact for c in columns}
        sizes = {key: [int(r["rows"]) for r in art.manifest["shards"]] for key, art in arts.items()}
        first = next(iter(sizes.values()))
        if any(s != first for s in sizes.values()):
            raise ValueError(f"{', '.join(str(a.folder) for a in arts.values())} are not sharded alike: rerun the pipeline")
        self.artifacts, self.starts = arts, np.r_[0, np.cumsum(first)].astype(np.int64)

    @property
    def num_rows(self) -> int:
        return int(self.starts[-1])

    def gather(self, rows: np.ndarray) -> dict:
        """{as_name: values of ``rows``} (features float32 [len(rows), D], others lists)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.num_rows):
            raise ValueError(f"row {int(rows.max())} asked of an artifact of {self.num_rows} rows")
        shard_of = np.searchsorted(self.starts, rows, side="right") - 1
        positions, parts = [], {c.as_name or c.name: [] for c in self.columns}
        for k in np.unique(shard_of):
            at = np.flatnonzero(shard_of == k)
            local = pa.array(rows[at] - self.starts[k])
            tables = {key: art.read_shard(int(k), [c.name for c in self.columns if c.artifact is art])
                      for key, art in self.artifacts.items()}
            for c in self.columns:
                parts[c.as_name or c.name].append(_values(tables[id(c.artifact)].column(c.name).take(local)))
            positions.append(at)
        back = np.argsort(np.concatenate(positions)) if positions else np.zeros(0, dtype=np.int64)
        out = {}
        for name, values in parts.items():
            if values and isinstance(values[0], np.ndarray):
                out[name] = np.concatenate(values)[back]
            else:
                flat = [v for part in values for v in part]
                out[name] = [flat[i] for i in back]
        return out
