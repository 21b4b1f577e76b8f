"""Numbered Parquet shards with their producer's identity and content hash beside the data.

An artifact is a folder of ``part-00000.parquet``, ``part-00001.parquet``, ... plus a
``_manifest.json`` written last. Every shard is a pure function of its inputs and is written to a
temporary name and renamed when complete, so a stage killed half-way keeps its finished shards:
rerun, it redoes only the missing, stale or damaged ones and the folder ends byte-identical to an
uninterrupted run.

What a shard holds depends only on its content: the manifest lists each shard's rows, sha256 and
size (and the producer's metadata); the footer holds the producer's metadata. How it was made is
recorded beside it, in its fingerprint record (``paths.fingerprint_record``: for an artifact under
artifacts/, ``artifacts/fingerprints/<artifact>.json``): each shard's *fingerprint* (a hash of everything
that went into it: inputs, parameters, model identity and the code, ``provenance.code_version``) with the
sha256 it produced. A shard is reused only if its fingerprint is the task's AND its bytes still have
that sha256. The record is not part of the artifact: a code change that changes no value rewrites the
record but not one shard, so DVC sees an unchanged artifact and nothing downstream reruns. It is a DVC
output of the same stage, so it is pushed and pulled with the artifact: a pulled checkout keeps the
pulled shards when the stage reruns. An artifact without a record is redone if its stage runs.
``ShardedArtifact.fingerprint`` is the artifact's content id (its shards' hashes): what a downstream
stage's fingerprint takes from it.

Integrity: readers check sizes on open and each shard's sha256 when they read it
(``CorruptShardError`` names the file and the stage to rerun). While a run is in progress the records
live in ``_journal.jsonl``: rewritten from the previous state at the start, one fsynced line appended
per finished shard, removed once the manifest and the fingerprint record are written.

One writer per folder: ``write_sharded`` holds ``locks.exclusive_writer`` (an flock on
``<folder>/.lock``, removed at the end) for its whole run.

The producing model's identity (name, pretrained tag or weights hash, image size, dtype) is in each
shard's Parquet metadata; readers refuse to mix features of two models and say which.

Readers stream record batches shard by shard: memory is bounded by one shard.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.data.locks import ArtifactLockedError, exclusive_writer, remove_stale_temp_files  # noqa: F401
from pipeline.paths import fingerprint_record

if TYPE_CHECKING:
    from pipeline.data.executors import ShardExecutor

SHARD_PATTERN = "part-{:05d}.parquet"
MANIFEST = "_manifest.json"
FINGERPRINTS = "_fingerprints.json"       # the fingerprint record's name inside a folder outside artifacts/
JOURNAL = "_journal.jsonl"
META_KEY = b"synthcap"


class ModelMismatchError(ValueError):
    """Features of two different models were about to be mixed."""


class IncompleteArtifactError(FileNotFoundError):
    """An artifact folder has no manifest: its stage has not finished."""


class CorruptShardError(ValueError):
    """A shard's bytes are missing, truncated or differ from the sha256 recorded when it was written."""


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


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_file_atomic(path: Path, data) -> None:
    """``data`` (bytes-like) to ``.<name>.tmp-<pid>``, fsynced, then renamed to ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def write_table_atomic(path: Path, table: pa.Table, meta: dict) -> dict:
    """Write ``table`` with ``meta`` in its footer: temp name in the same folder, then rename.

    The Parquet bytes are made in memory (one shard), hashed, written and fsynced; returns
    ``{"sha256": ..., "size": ...}`` of the file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **_footer(meta)})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    data = sink.getvalue()
    record = {"sha256": hashlib.sha256(data).hexdigest(), "size": data.size}
    _write_file_atomic(path, data)
    return record


def read_meta(path: Path) -> dict:
    """The synthcap metadata of one Parquet file (footer only, no data read, no verification)."""
    schema = pq.read_schema(path)
    raw = (schema.metadata or {}).get(META_KEY)
    if raw is None:
        raise ValueError(f"{path} is not a synthcap shard (no '{META_KEY.decode()}' metadata)")
    return json.loads(raw)


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, read in chunks."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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


# --- the journal: each finished shard's hash, durable before the manifest exists ----------------

def _append_journal(journal: Path, record: dict) -> None:
    """Append one record as one line (one write, O_APPEND), fsynced."""
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_records(out_dir: Path) -> dict[str, dict]:
    """{file: {sha256, size, fingerprint}} from the previous run's fingerprint record, overridden by
    the journal.

    The journal is always at least as recent (a run rewrites it before deleting the manifest, and
    deletes it only after writing the new manifest and fingerprints). A torn last line (a crash
    mid-append) is ignored: its shard is then simply redone.
    """
    records: dict[str, dict] = {}
    try:
        saved = json.loads(fingerprint_record(out_dir).read_text())
        for rec in saved.get("shards", []):
            records[rec["file"]] = {k: rec[k] for k in ("file", "sha256", "size", "fingerprint")}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    try:
        lines = (out_dir / JOURNAL).read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        try:
            rec = json.loads(line)
            records[rec["file"]] = {k: rec[k] for k in ("file", "sha256", "size", "fingerprint")}
        except (ValueError, KeyError, TypeError):
            continue
    return records


def _rewrite_journal(out_dir: Path, records: dict[str, dict]) -> None:
    """The records of the shards present, as a fresh journal (atomically)."""
    present = {name: rec for name, rec in sorted(records.items()) if (out_dir / name).is_file()}
    data = "".join(json.dumps(rec, sort_keys=True) + "\n" for rec in present.values()).encode()
    _write_file_atomic(out_dir / JOURNAL, data)


def write_shard(task: ShardTask, table: pa.Table, meta: dict, journal: str | Path | None = None) -> dict:
    """Write one computed shard (atomically, see ``write_table_atomic``) and record its hash in ``journal``.

    Runs in the process that holds the artifact's lock (the stage itself: with ``executor: ray``,
    workers only compute tables). Returns its record ``{"file", "sha256", "size", "fingerprint", "rows"}``.
    """
    written = write_table_atomic(task.path, table, {**meta, "shard": task.index, "rows": [task.start, task.stop]})
    record = {"file": task.path.name, "fingerprint": task.fingerprint, **written}
    if journal is not None:
        _append_journal(Path(journal), record)
    return {**record, "rows": table.num_rows}


def run_shard(task: ShardTask, make_table: Callable[[ShardTask], pa.Table], meta: dict,
              journal: str | Path | None = None) -> dict:
    """Produce one shard here (always: the caller decided it is needed): ``make_table`` then ``write_shard``."""
    return write_shard(task, make_table(task), meta, journal)


def _shard_state(task: ShardTask, record: dict | None) -> str:
    """'kept', 'new' (missing), 'stale' (other fingerprint, or no recorded hash) or 'corrupt'."""
    path = task.path
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return "new"
    if record is None or record.get("fingerprint") != task.fingerprint:
        return "stale"
    if size != record.get("size"):
        return "corrupt"
    try:
        actual = file_sha256(path)
    except OSError:
        return "corrupt"
    return "kept" if actual == record.get("sha256") else "corrupt"


def write_sharded(out_dir: Path, num_rows: int, rows_per_shard: int, base_fingerprint: str,
                  make_table: Callable[..., pa.Table], meta: dict,
                  executor: str | ShardExecutor = "local", desc: str = "shards", stage: str | None = None,
                  read_inputs: Callable[[ShardTask], Any] | None = None) -> dict:
    """Produce every shard of an artifact (resuming), drop stale extra shards, write the manifest.

    ``make_table(task)`` must be a pure function of the task (its rows of the aligned inputs):
    that is what makes the result independent of crashes, reruns and of the executor. With
    ``read_inputs``, this process reads each shard's inputs (``read_inputs(task)``, e.g. its rows of an
    upstream artifact) and the table is ``make_table(task, inputs)``: on Ray the inputs travel to the
    worker through the object store, so workers need no access to the artifacts.

    ``executor`` (``pipeline.data.executors``: "local", "ray" or a ``ShardExecutor`` with threads and
    Ray resources) decides where ``make_table`` runs; every table comes back to this process, which
    writes each shard (temp name, rename) and journals its hash as it arrives, in any order.
    A failing shard raises its error restated with the shard (index, file, rows) and this artifact's
    stage; the shards written before it stay journaled, so a rerun keeps them.

    A shard is kept only if its recorded fingerprint is the task's AND its bytes match the sha256
    recorded when it was written (fingerprint record or journal); otherwise it is redone. ``stage`` (the DVC
    stage that writes ``out_dir``) goes into the manifest, so readers can say what to rerun.
    The folder is locked for the whole run (``exclusive_writer``): a second writer fails at once.

    Returns the manifest plus, not in the file (it must not depend on history):
    ``kept_from_previous_run``, ``written_new``, ``redone_stale``, ``redone_corrupt``, ``corrupt_files``.
    """
    from pipeline.data.executors import run_shards

    out_dir = Path(out_dir)
    with exclusive_writer(out_dir):
        remove_stale_temp_files(out_dir)  # leftovers of dead writers
        records = _read_records(out_dir)
        _rewrite_journal(out_dir, records)  # durable before the manifest goes
        (out_dir / MANIFEST).unlink(missing_ok=True)  # the artifact is incomplete until the end
        _fsync_dir(out_dir)
        tasks = plan_shards(out_dir, num_rows, rows_per_shard, base_fingerprint)
        states = {t.index: _shard_state(t, records.get(t.path.name)) for t in tasks}
        todo = [t for t in tasks if states[t.index] != "kept"]
        corrupt = [t.path.name for t in tasks if states[t.index] == "corrupt"]
        if corrupt:
            print(f"{out_dir}: {len(corrupt)} shard(s) do not match the sha256 recorded when they were written "
                  f"and are redone: {', '.join(corrupt)}", file=sys.stderr, flush=True)
        journal = out_dir / JOURNAL

        def written(task: ShardTask, table: pa.Table) -> None:  # here, as each shard's table arrives
            rec = write_shard(task, table, meta, journal)
            records[rec["file"]] = {k: rec[k] for k in ("file", "sha256", "size", "fingerprint")}

        def describe(task: ShardTask) -> str:
            return f"{stage or desc}: shard {task.index} ({task.path}, rows {task.start}-{task.stop - 1})"

        try:
            run_shards(make_table, todo, written, executor=executor, read_inputs=read_inputs, desc=desc,
                       describe=describe)
        finally:
            remove_stale_temp_files(out_dir)  # ours (a crash mid-shard) and dead ones; never a live writer's
        wanted = {t.path.name for t in tasks}
        for extra in out_dir.glob("part-*.parquet"):
            if extra.name not in wanted:
                extra.unlink()
        manifest = {"meta": meta, "num_rows": num_rows, "stage": stage,
                    "shards": [{"file": t.path.name, "rows": t.stop - t.start,
                                "sha256": records[t.path.name]["sha256"], "size": records[t.path.name]["size"]}
                               for t in tasks]}
        made = {"fingerprint": base_fingerprint,
                "shards": [{**records[t.path.name], "fingerprint": t.fingerprint} for t in tasks]}
        record = fingerprint_record(out_dir)
        record.parent.mkdir(parents=True, exist_ok=True)
        _write_file_atomic(record, json.dumps(made, indent=1, sort_keys=True).encode())
        _write_file_atomic(out_dir / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
        (out_dir / JOURNAL).unlink(missing_ok=True)
        _fsync_dir(out_dir)
    counts = {state: sum(1 for s in states.values() if s == state) for state in ("kept", "new", "stale", "corrupt")}
    return {**manifest, "kept_from_previous_run": counts["kept"], "written_new": counts["new"],
            "redone_stale": counts["stale"], "redone_corrupt": counts["corrupt"], "corrupt_files": corrupt}


# --- reading ------------------------------------------------------------------------------------

def _rerun_hint(folder: Path, stage: str | None) -> str:
    if stage:
        return (f"run `dvc repro {stage}`: it redoes the damaged shard (if DVC says the stage is up to date, "
                f"`dvc repro -s -f {stage}`)")
    return f"rerun the stage that writes {folder}: it redoes the damaged shard"


class ShardedArtifact:
    """A finished sharded artifact: its manifest, its model identity, and verifying streaming readers.

    Opening checks that every listed shard exists with its recorded size (and the producing model
    in its footer); ``read_shard`` / ``iter_batches`` read a shard's file into memory once, check
    its sha256 against the manifest and parse Parquet from that buffer. Any mismatch raises
    CorruptShardError naming the file and what to rerun.
    """

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
        self.stage: str | None = self.manifest.get("stage")
        self.records: list[dict] = self.manifest["shards"]
        # the content id: what a downstream stage's fingerprint takes from this artifact
        self.fingerprint: str = fingerprint(self.num_rows, [r.get("sha256") for r in self.records], self.meta)
        self.paths = [self.folder / s["file"] for s in self.records]
        for path, record in zip(self.paths, self.records):
            if "sha256" not in record or "size" not in record:
                raise CorruptShardError(
                    f"{path} has no recorded sha256 in {manifest_path} (written before shards carried content "
                    f"hashes), so it cannot be verified; {self._hint()}")
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                raise CorruptShardError(f"{path} is listed in {manifest_path} but missing; {self._hint()}") from None
            try:
                shard_meta = read_meta(path)
            except (OSError, ValueError, pa.ArrowException) as err:
                raise CorruptShardError(f"{path} is damaged: its Parquet footer cannot be read ({err}); "
                                        f"{self._hint()}") from err
            if shard_meta.get("model") != self.meta.get("model"):
                raise ModelMismatchError(
                    f"{path} was produced by {describe_model(shard_meta.get('model'))} but "
                    f"{self.folder} by {describe_model(self.meta.get('model'))}; rerun its stage")
            if size != record["size"]:
                raise CorruptShardError(
                    f"{path} is damaged: {size} bytes but {record['size']} were recorded in {manifest_path} "
                    f"(truncated or overwritten); {self._hint()}")

    def _hint(self) -> str:
        return _rerun_hint(self.folder, self.stage)

    @property
    def model(self) -> dict | None:
        return self.meta.get("model")

    def __len__(self) -> int:
        return self.num_rows

    @property
    def columns(self) -> list[str]:
        """The column names (from the first shard's footer; every shard of an artifact has one schema)."""
        return pq.read_schema(self.paths[0]).names if self.paths else []

    def _verified_bytes(self, index: int) -> pa.Buffer:
        """Shard ``index``'s file, read once into memory and checked against its recorded size and sha256."""
        path, record = self.paths[index], self.records[index]
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CorruptShardError(f"{path} is listed in {self.folder / MANIFEST} but missing; "
                                    f"{self._hint()}") from None
        actual = hashlib.sha256(data).hexdigest()
        if actual != record["sha256"] or len(data) != record["size"]:
            raise CorruptShardError(
                f"{path} is damaged: its sha256 is {actual} ({len(data)} bytes) but {record['sha256']} "
                f"({record['size']} bytes) was recorded when it was written; {self._hint()}")
        return pa.py_buffer(data)

    def _parse_error(self, index: int, err: Exception) -> ValueError:
        return ValueError(f"{self.paths[index]}: {err}")

    def read_shard(self, index: int, columns: Sequence[str] | None = None) -> pa.Table:
        """Shard ``index`` (verified) as a table, optionally only ``columns``."""
        data = self._verified_bytes(index)
        try:
            return pq.read_table(pa.BufferReader(data), columns=list(columns) if columns else None)
        except pa.ArrowException as err:  # the bytes are the recorded ones: a wrong column name, say
            raise self._parse_error(index, err) from err

    def iter_batches(self, columns: Sequence[str] | None = None, batch_size: int = 1024) -> Iterator[pa.RecordBatch]:
        """Stream record batches in row order, one (verified) shard in memory at a time."""
        for index in range(len(self.paths)):
            data = self._verified_bytes(index)
            try:
                batches = pq.ParquetFile(pa.BufferReader(data)).iter_batches(
                    batch_size=batch_size, columns=list(columns) if columns else None)
                for batch in batches:
                    yield batch
            except pa.ArrowException as err:
                raise self._parse_error(index, err) from err
            del data, batches

    def read_features(self, name: str, dtype=np.float32) -> np.ndarray:
        """One whole feature column as numpy [n, d], read batch by batch (for a step that needs every row at
        once: a search index, a cycle score, a score over the eval set)."""
        return np.concatenate([feature_numpy(b.column(0), dtype) for b in self.iter_batches([name])])

    def read_column(self, name: str) -> pa.ChunkedArray:
        """One whole column (for small ones: ids, texts). Features should be streamed instead."""
        return pa.chunked_array([self.read_shard(k, [name]).column(name).combine_chunks()
                                 for k in range(len(self.paths))] or [pa.array([])])

    def verify(self) -> None:
        """Check every shard's bytes against the manifest (reads the whole artifact, one shard at a time)."""
        for index in range(len(self.paths)):
            self._verified_bytes(index)


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
