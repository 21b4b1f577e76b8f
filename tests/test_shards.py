"""The data plane: shard bytes, resume after a crash or a kill, model identity, streaming."""
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.shards import (MANIFEST, IncompleteArtifactError, ModelMismatchError, ShardedArtifact,
                             feature_array, feature_numpy, read_meta, require_same_model, write_sharded,
                             write_table_atomic)

MODEL_A = {"name": "clip-a", "pretrained": None, "weights_sha256": "a" * 64}
MODEL_B = {"name": "clip-b", "pretrained": "openai", "weights_sha256": "b" * 64}
N, D = 50, 8


def make_features(task):
    rows = np.arange(task.start, task.stop)
    values = np.sin(np.outer(rows + 1, np.arange(1, D + 1))).astype(np.float32)
    return pa.table({"caption_id": [f"c{r}" for r in rows], "global": feature_array(values, "float16")})


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_feature_round_trip_keeps_values_and_dtype(tmp_path):
    values = np.random.default_rng(0).standard_normal((7, 5)).astype(np.float32)
    for dtype, tol in [("float16", 2e-3), ("float32", 0)]:
        table = pa.table({"f": feature_array(values, dtype)})
        write_table_atomic(tmp_path / f"{dtype}.parquet", table, {"model": MODEL_A})
        back = pq.read_table(tmp_path / f"{dtype}.parquet")
        assert back.schema.field("f").type == pa.list_(getattr(pa, dtype)(), 5)
        np.testing.assert_allclose(feature_numpy(back.column("f")), values, rtol=tol, atol=tol)
        assert read_meta(tmp_path / f"{dtype}.parquet")["model"] == MODEL_A


def test_sharded_artifact_streams_in_row_order_and_bounds_shards(tmp_path):
    manifest = write_sharded(tmp_path, N, 16, "fp", make_features, {"model": MODEL_A})
    assert [s["rows"] for s in manifest["shards"]] == [16, 16, 16, 2]
    art = ShardedArtifact(tmp_path)
    assert len(art) == N and art.model == MODEL_A
    ids = [i for b in art.iter_batches(["caption_id"], batch_size=5) for i in b.column(0).to_pylist()]
    assert ids == [f"c{r}" for r in range(N)]
    batch_sizes = [b.num_rows for b in art.iter_batches(["global"], batch_size=5)]
    assert max(batch_sizes) <= 5


def test_rerun_after_exception_keeps_finished_shards_and_gives_same_bytes(tmp_path):
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    write_sharded(clean, N, 10, "fp", make_features, {"model": MODEL_A})

    def crash_on_shard_3(task):
        if task.index == 3:
            raise RuntimeError("simulated crash")
        return make_features(task)

    with pytest.raises(RuntimeError, match="simulated crash"):
        write_sharded(crashed, N, 10, "fp", crash_on_shard_3, {"model": MODEL_A})
    assert sorted(p.name for p in crashed.glob("part-*")) == ["part-00000.parquet", "part-00001.parquet",
                                                               "part-00002.parquet"]
    assert not (crashed / MANIFEST).exists()
    with pytest.raises(IncompleteArtifactError, match="has not finished"):
        ShardedArtifact(crashed)

    redone = []
    manifest = write_sharded(crashed, N, 10, "fp", lambda t: redone.append(t.index) or make_features(t),
                             {"model": MODEL_A})
    assert redone == [3, 4] and manifest["kept_from_previous_run"] == 3
    assert digests(crashed) == digests(clean)


def test_changed_inputs_redo_every_shard_and_drop_extra_ones(tmp_path):
    write_sharded(tmp_path, N, 10, "fp-1", make_features, {"model": MODEL_A})
    redone = []
    write_sharded(tmp_path, 25, 10, "fp-2", lambda t: redone.append(t.index) or make_features(t), {"model": MODEL_A})
    assert redone == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.glob("part-*")) == [f"part-0000{i}.parquet" for i in range(3)]
    assert len(ShardedArtifact(tmp_path)) == 25


def test_truncated_shard_is_redone(tmp_path):
    write_sharded(tmp_path, N, 10, "fp", make_features, {"model": MODEL_A})
    good = digests(tmp_path)
    shard = tmp_path / "part-00002.parquet"
    shard.write_bytes(shard.read_bytes()[:100])
    redone = []
    write_sharded(tmp_path, N, 10, "fp", lambda t: redone.append(t.index) or make_features(t), {"model": MODEL_A})
    assert redone == [2] and digests(tmp_path) == good


KILLABLE = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
    from test_shards import make_features, MODEL_A
    from pipeline.data.shards import write_sharded
    def slow(task):
        time.sleep(0.4)
        return make_features(task)
    write_sharded(sys.argv[1], 50, 5, "fp", slow, {{"model": MODEL_A}})
""")


def test_killed_process_resumes_to_identical_bytes(tmp_path):
    repo, tests = str(Path(__file__).parents[1]), str(Path(__file__).parent)
    script = tmp_path / "killable.py"
    script.write_text(KILLABLE.format(repo=repo, tests=tests))
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    write_sharded(reference, N, 5, "fp", make_features, {"model": MODEL_A})

    proc = subprocess.Popen([sys.executable, str(script), str(killed)])
    deadline = time.time() + 60
    while len(list(killed.glob("part-*.parquet"))) < 3 and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(list(killed.glob("part-*.parquet")))
    assert 3 <= finished < 10, "the kill must land mid-stage"
    assert not (killed / MANIFEST).exists()

    manifest = write_sharded(killed, N, 5, "fp", make_features, {"model": MODEL_A})
    assert manifest["kept_from_previous_run"] >= finished - 1  # the shard being renamed at the kill may be redone
    assert digests(killed) == digests(reference)


def test_reader_refuses_shards_of_another_model(tmp_path):
    write_sharded(tmp_path, N, 10, "fp", make_features, {"model": MODEL_A})
    table = pq.read_table(tmp_path / "part-00001.parquet")
    write_table_atomic(tmp_path / "part-00001.parquet", table, {**read_meta(tmp_path / "part-00001.parquet"),
                                                               "model": MODEL_B})
    with pytest.raises(ModelMismatchError, match=r"part-00001.parquet was produced by clip-b pretrained=openai"):
        ShardedArtifact(tmp_path)


def test_combining_artifacts_of_two_models_is_refused(tmp_path):
    write_sharded(tmp_path / "a", N, 10, "fp", make_features, {"model": MODEL_A})
    write_sharded(tmp_path / "b", N, 10, "fp", make_features, {"model": MODEL_B})
    a, b = ShardedArtifact(tmp_path / "a"), ShardedArtifact(tmp_path / "b")
    assert require_same_model(text=a, images=a) == MODEL_A
    with pytest.raises(ModelMismatchError, match="text comes from clip-a .* but images from clip-b"):
        require_same_model(text=a, images=b)
