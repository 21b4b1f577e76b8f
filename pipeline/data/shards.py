"""Numbered Parquet shards with their producer's identity beside the data.

An artifact is a folder of ``part-00000.parquet``, ``part-00001.parquet``, ... plus a
``_manifest.json`` written last. Every shard is a pure function of its inputs and is written to a
temporary name and renamed when complete, so a stage killed half-way keeps its finished shards:
rerun, it redoes only the missing or stale ones and the folder ends byte-identical to an
uninterrupted run. A shard is reused only if its footer carries the same *fingerprint* (a hash of
everything that went into it: inputs, parameters, model identity).

The producing model's identity (name, pretrained tag or weights hash, image size, dtype) is in each
shard's Parquet metadata; readers refuse to mix features of two models and say which.

Readers stream record batches shard by shard: memory is bounded by shard and batch size.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

SHARD_PATTERN = "part-{:05d}.parquet"
MANIFEST = "_manifest.json"
META_KEY = b"synthcap"


class ModelMismatchError(ValueError):
    """Features of two different models were about to be mixed."""


class IncompleteArtifactError(FileNotFoundError):
    """An artifact folder has no manifest: its stage has not finished."""


def fingerprint(*parts: Any) -> str:
    """A stable hash of JSON-able parts (parameters, model identities, input fingerprints)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def shard_ranges(num_rows: int, rows_per_shard: int) -> list[tuple[int, int]]:
    """Row ranges [start, stop) of each shard: shard k of every aligned artifact covers the same rows."""
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    return [(s, min(s + rows_per_shard, num_rows)) for s in range(0, num_rows, rows_per_shard)]


# --- features <-> Arrow -------------------------------------------------------------------------

def feature_array(values: np.ndarray, dtype: str = "float16") -> pa.FixedSizeListArray:
    """[n, d] numpy -> Arrow fixed_size_list<dtype>[d] (one feature vector a row)."""
    values = np.ascontiguousarray(values, dtype=np.dtype(dtype))
    if values.ndim != 2:
        raise ValueError(f"features must be 2-D [rows, dim], got shape {values.shape}")
    return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])


def feature_numpy(column: pa.Array | pa.ChunkedArray, dtype=np.float32) -> np.ndarray:
    """Arrow fixed_size_list column -> [n, d] numpy (float32 by default)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not pa.types.is_fixed_size_list(column.type):
        raise TypeError(f"expected a fixed_size_list feature column, got {column.type}")
    width = column.type.list_size
    flat = column.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(-1, width).astype(dtype, copy=False)


# --- writing ------------------------------------------------------------------------------------

def _footer(meta: dict) -> dict[bytes, bytes]:
    return {META_KEY: json.dumps(meta, sort_keys=True).encode()}


def write_table_atomic(path: Path, table: pa.Table, meta: dict) -> None:
    """Write ``table`` with ``meta`` in its footer: temp name in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **_footer(meta)})
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_meta(path: Path) -> dict:
    """The synthcap metadata of one Parquet file (footer only, no data read)."""
    schema = pq.read_schema(path)
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise ValueError(f"{path} is not a synthcap shard (no '{META_KEY.decode()}' metadata)")
    return json.loads(raw)


def _is_current(path: Path, expected: str) -> bool:
    try:
        return read_meta(path).get("fingerprint") == expected
    except (OSError, ValueError, pa.ArrowException):
        return False  # unreadable or truncated: redo it


@dataclass(frozen=True)
class ShardTask:
    """One shard to produce: its index, its row range in the aligned input, and where it goes."""
    index: int
    start: int
    stop: int
    path: Path
    fingerprint: str


def plan_shards(out_dir: Path, num_rows: int, rows_per_shard: int, base_fingerprint: str) -> list[ShardTask]:
    out_dir = Path(out_dir)
    return [
        ShardTask(k, a, b, out_dir / SHARD_PATTERN.format(k), fingerprint(base_fingerprint, k, a, b))
        for k, (a, b) in enumerate(shard_ranges(num_rows, rows_per_shard))
    ]


def run_shard(task: ShardTask, make_table: Callable[[ShardTask], pa.Table], meta: dict) -> int:
    """Produce one shard unless a current one is already there. Returns the rows written (0 if kept)."""
    if _is_current(task.path, task.fingerprint):
        return 0
    table = make_table(task)
    write_table_atomic(task.path, table, {**meta, "fingerprint": task.fingerprint,
                                          "shard": task.index, "rows": [task.start, task.stop]})
    return table.num_rows


def write_sharded(out_dir: Path, num_rows: int, rows_per_shard: int, base_fingerprint: str,
                  make_table: Callable[[ShardTask], pa.Table], meta: dict,
                  executor: str = "local", desc: str = "shards") -> dict:
    """Produce every shard of an artifact (resuming), drop stale extra shards, write the manifest.

    ``make_table(task)`` must be a pure function of the task (its rows of the aligned inputs):
    that is what makes the result independent of crashes, reruns and of the executor.
    """
    from pipeline.data.executors import map_tasks

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / MANIFEST).unlink(missing_ok=True)  # the artifact is incomplete until the end
    tasks = plan_shards(out_dir, num_rows, rows_per_shard, base_fingerprint)
    todo = [t for t in tasks if not _is_current(t.path, t.fingerprint)]
    kept = len(tasks) - len(todo)
    map_tasks(run_shard, todo, executor=executor, desc=desc, make_table=make_table, meta=meta)
    wanted = {t.path.name for t in tasks}
    for stale in out_dir.glob("part-*.parquet"):
        if stale.name not in wanted:
            stale.unlink()
    for tmp in out_dir.glob(".part-*.tmp-*"):
        tmp.unlink()
    manifest = {"meta": meta, "num_rows": num_rows, "fingerprint": base_fingerprint,
                "shards": [{"file": t.path.name, "rows": t.stop - t.start, "fingerprint": t.fingerprint}
                           for t in tasks]}
    tmp = out_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    os.replace(tmp, out_dir / MANIFEST)
    return {**manifest, "kept_from_previous_run": kept}  # not in the file: it must not depend on history


# --- reading ------------------------------------------------------------------------------------

class ShardedArtifact:
    """A finished sharded artifact: its manifest, its model identity, and streaming readers."""

    def __init__(self, folder: Path | str):
        self.folder = Path(folder)
        manifest_path = self.folder / MANIFEST
        if not manifest_path.is_file():
            raise IncompleteArtifactError(
                f"{self.folder} has no {MANIFEST}: the stage that writes it has not finished "
                f"(run `dvc repro` to complete it)")
        self.manifest = json.loads(manifest_path.read_text())
        self.meta: dict = self.manifest["meta"]
        self.num_rows: int = self.manifest["num_rows"]
        self.fingerprint: str = self.manifest["fingerprint"]
        self.paths = [self.folder / s["file"] for s in self.manifest["shards"]]
        for path in self.paths:
            shard_meta = read_meta(path)
            if shard_meta.get("model") != self.meta.get("model"):
                raise ModelMismatchError(
                    f"{path} was produced by {describe_model(shard_meta.get('model'))} but "
                    f"{self.folder} by {describe_model(self.meta.get('model'))}; rerun its stage")

    @property
    def model(self) -> dict | None:
        return self.meta.get("model")

    def __len__(self) -> int:
        return self.num_rows

    def read_shard(self, index: int, columns: Sequence[str] | None = None) -> pa.Table:
        return pq.read_table(self.paths[index], columns=list(columns) if columns else None)

    def iter_batches(self, columns: Sequence[str] | None = None, batch_size: int = 1024) -> Iterator[pa.RecordBatch]:
        """Stream record batches in row order, one shard open at a time."""
        for path in self.paths:
            yield from pq.ParquetFile(path).iter_batches(batch_size=batch_size,
                                                         columns=list(columns) if columns else None)

    def read_column(self, name: str) -> pa.ChunkedArray:
        """One whole column (for small ones: ids, texts). Features should be streamed instead."""
        return pa.chunked_array([self.read_shard(k, [name]).column(name).combine_chunks()
                                 for k in range(len(self.paths))] or [pa.array([])])


def describe_model(model: dict | None) -> str:
    if not model:
        return "no model"
    parts = [model.get("name", "?")]
    if model.get("pretrained"):
        parts.append(f"pretrained={model['pretrained']}")
    if model.get("weights_sha256"):
        parts.append(f"weights={model['weights_sha256'][:12]}")
    return " ".join(parts)


def require_same_model(**artifacts: "ShardedArtifact | dict | None") -> dict:
    """Refuse to combine artifacts whose features come from different models; return the model."""
    models = {name: (a.model if isinstance(a, ShardedArtifact) else a) for name, a in artifacts.items()}
    names = list(models)
    first = models[names[0]]
    for name in names[1:]:
        if models[name] != first:
            raise ModelMismatchError(
                f"cannot mix features: {names[0]} comes from {describe_model(first)} but {name} "
                f"from {describe_model(models[name])}")
    return first
