"""The data plane: shard bytes, resume after a crash or a kill, model identity, streaming, integrity, one writer."""
import hashlib
import json
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

from pipeline.data import provenance
from pipeline.data.locks import ArtifactLockedError, _mentions_dvc, exclusive_writer
from pipeline.data.provenance import code_version
from pipeline.data.shards import (FINGERPRINTS, JOURNAL, MANIFEST, CorruptShardError, IncompleteArtifactError, ModelMismatchError,
                                  ShardedArtifact, feature_array, feature_numpy, fingerprint, read_meta,
                                  require_same_model, write_sharded, write_table_atomic)

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


# --- an honest cache: code, content hashes, one writer, no orphans -------------------------------

REPO, TESTS = str(Path(__file__).parents[1]), str(Path(__file__).parent)


def recording(redone):
    return lambda t: redone.append(t.index) or make_features(t)


def flip_mid_shard(path: Path, count: int = 64) -> None:
    """Invert ``count`` bytes in the middle of the data pages, leaving the Parquet footer intact."""
    data = bytearray(path.read_bytes())
    footer_start = len(data) - 8 - int.from_bytes(data[-8:-4], "little")
    count = min(count, (footer_start - 4) // 2)
    at = 4 + (footer_start - 4) // 2 - count // 2
    data[at:at + count] = bytes(b ^ 0xFF for b in data[at:at + count])
    path.write_bytes(bytes(data))
    assert read_meta(path)["shard"] is not None  # the footer still reads: only a content hash can tell


def test_manifest_records_each_shards_sha256_size_and_stage(tmp_path):
    write_sharded(tmp_path, N, 10, "fp", make_features, {"model": MODEL_A}, stage="encode")
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert manifest["stage"] == "encode"
    for shard in manifest["shards"]:
        data = (tmp_path / shard["file"]).read_bytes()
        assert shard["sha256"] == hashlib.sha256(data).hexdigest() and shard["size"] == len(data)
    assert sorted(p.name for p in tmp_path.iterdir()) == [FINGERPRINTS, MANIFEST] + [
        f"part-0000{i}.parquet" for i in range(5)]
    assert "fingerprint" not in json.dumps(manifest)     # what was made, not how: content only


def test_artifact_bytes_depend_on_content_not_on_how_it_was_made(tmp_path):
    """Another fingerprint (a code change that changes no value) rewrites every shard to the same bytes:
    the manifest and shards are byte-identical, so DVC sees an unchanged output and nothing downstream
    reruns; only the bookkeeping beside them (_fingerprints.json, ignored by DVC) changes."""
    write_sharded(tmp_path, N, 10, "code-v1", make_features, {"model": MODEL_A})
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != FINGERPRINTS}
    redone = []
    result = write_sharded(tmp_path, N, 10, "code-v2", recording(redone), {"model": MODEL_A})
    assert redone == [0, 1, 2, 3, 4] and result["redone_stale"] == 5
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != FINGERPRINTS} == before
    assert ShardedArtifact(tmp_path).fingerprint == fingerprint(N, [r["sha256"] for r in result["shards"]],
                                                                {"model": MODEL_A})


def test_code_change_redoes_shards(tmp_path):
    code = tmp_path / "code"
    for rel, text in {"stages/__init__.py": "", "stages/encode.py": "from pipeline.extract import encode\n",
                      "pipeline/__init__.py": "", "pipeline/extract/__init__.py": "",
                      "pipeline/extract/encode.py": "def encode():\n    return 1\n"}.items():
        (code / rel).parent.mkdir(parents=True, exist_ok=True)
        (code / rel).write_text(text)

    def base() -> str:
        provenance._code_version.cache_clear(), provenance._closure.cache_clear()  # a new stage process
        return fingerprint("encode", {"dtype": "float16"}, code_version("stages.encode", root=code))

    out = tmp_path / "out"
    write_sharded(out, N, 10, base(), make_features, {"model": MODEL_A})
    redone = []
    assert write_sharded(out, N, 10, base(), recording(redone), {"model": MODEL_A})["kept_from_previous_run"] == 5
    assert redone == []
    (code / "pipeline/extract/encode.py").write_text("def encode():\n    return 1  # fixed\n")
    result = write_sharded(out, N, 10, base(), recording(redone), {"model": MODEL_A})
    assert redone == [0, 1, 2, 3, 4] and result["redone_stale"] == 5 and result["kept_from_previous_run"] == 0


def test_flipped_bytes_are_refused_by_readers_and_redone_by_the_writer(tmp_path, capsys):
    clean, damaged = tmp_path / "clean", tmp_path / "damaged"
    for folder in (clean, damaged):
        write_sharded(folder, N, 10, "fp", make_features, {"model": MODEL_A}, stage="encode")
    flip_mid_shard(damaged / "part-00003.parquet")

    art = ShardedArtifact(damaged)  # same size: opening cannot tell, reading must
    art.read_shard(2)
    message = r"part-00003\.parquet is damaged: its sha256 is [0-9a-f]{64} .* run `dvc repro encode`"
    with pytest.raises(CorruptShardError, match=message):
        art.read_shard(3)
    with pytest.raises(CorruptShardError, match=message):
        list(art.iter_batches(["caption_id"]))
    with pytest.raises(CorruptShardError, match=message):
        art.read_column("caption_id")

    capsys.readouterr()
    redone = []
    result = write_sharded(damaged, N, 10, "fp", recording(redone), {"model": MODEL_A}, stage="encode")
    assert redone == [3]
    assert (result["kept_from_previous_run"], result["redone_corrupt"], result["redone_stale"]) == (4, 1, 0)
    assert result["corrupt_files"] == ["part-00003.parquet"]
    assert "part-00003.parquet" in capsys.readouterr().err
    assert digests(damaged) == digests(clean)
    ShardedArtifact(damaged).verify()


def test_truncated_shard_is_refused_naming_the_file(tmp_path):
    write_sharded(tmp_path, N, 10, "fp", make_features, {"model": MODEL_A})
    art = ShardedArtifact(tmp_path)
    shard = tmp_path / "part-00002.parquet"
    shard.write_bytes(shard.read_bytes()[:-100])  # footer gone
    hint = f"rerun the stage that writes {tmp_path}"
    with pytest.raises(CorruptShardError, match=rf"part-00002\.parquet is damaged.*{hint}"):
        ShardedArtifact(tmp_path)
    with pytest.raises(CorruptShardError, match=r"part-00002\.parquet is damaged"):
        art.read_shard(2)  # opened before the damage
    shard.unlink()
    with pytest.raises(CorruptShardError, match=r"part-00002\.parquet is listed .* but missing"):
        ShardedArtifact(tmp_path)


def test_crash_keeps_hashes_in_a_journal_and_resume_ends_identical_without_it(tmp_path):
    clean, crashed = tmp_path / "clean", tmp_path / "crashed"
    write_sharded(clean, N, 10, "fp", make_features, {"model": MODEL_A})

    def crash_on_shard_3(task):
        if task.index == 3:
            raise RuntimeError("simulated crash")
        return make_features(task)

    with pytest.raises(RuntimeError, match="simulated crash"):
        write_sharded(crashed, N, 10, "fp", crash_on_shard_3, {"model": MODEL_A})
    journal = [json.loads(line) for line in (crashed / JOURNAL).read_text().splitlines()]
    assert [r["file"] for r in journal] == [f"part-0000{i}.parquet" for i in range(3)]
    assert not list(crashed.glob(".*"))  # no lock, no temp file

    # the journal is what makes the finished shards trustworthy: damage one, crash again at once
    flip_mid_shard(crashed / "part-00001.parquet")
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_sharded(crashed, N, 10, "fp", crash_on_shard_3, {"model": MODEL_A})

    redone = []
    result = write_sharded(crashed, N, 10, "fp", recording(redone), {"model": MODEL_A})
    assert redone == [3, 4] and result["kept_from_previous_run"] == 3
    assert not (crashed / JOURNAL).exists()
    assert digests(crashed) == digests(clean)

    # a run that dies before producing anything loses nothing: the manifest's hashes went to the journal
    flip_mid_shard(crashed / "part-00004.parquet")
    with pytest.raises(RuntimeError, match="simulated crash"):
        write_sharded(crashed, N, 10, "fp", lambda t: (_ for _ in ()).throw(RuntimeError("simulated crash")),
                      {"model": MODEL_A})
    assert not (crashed / MANIFEST).exists()
    redone = []
    result = write_sharded(crashed, N, 10, "fp", recording(redone), {"model": MODEL_A})
    assert redone == [4] and result["redone_corrupt"] == 1
    assert digests(crashed) == digests(clean)


def test_shards_without_a_recorded_hash_are_redone(tmp_path):
    write_sharded(tmp_path, N, 10, "fp", make_features, {"model": MODEL_A})
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    for shard in manifest["shards"]:  # as an older version wrote it
        del shard["sha256"], shard["size"]
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    (tmp_path / FINGERPRINTS).unlink()   # e.g. fresh from `dvc pull`: nothing says how the shards were made
    with pytest.raises(CorruptShardError, match="no recorded sha256"):
        ShardedArtifact(tmp_path)
    redone = []
    write_sharded(tmp_path, N, 10, "fp", recording(redone), {"model": MODEL_A})
    assert redone == [0, 1, 2, 3, 4]


def start_slow_writer(tmp_path: Path, folder: Path) -> subprocess.Popen:
    script = tmp_path / "killable.py"
    script.write_text(KILLABLE.format(repo=REPO, tests=TESTS))
    proc = subprocess.Popen([sys.executable, str(script), str(folder)], stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while not list(folder.glob("part-*.parquet")) and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None
    return proc


def test_a_second_writer_fails_at_once_naming_the_first(tmp_path):
    reference, folder = tmp_path / "reference", tmp_path / "shared"
    write_sharded(reference, N, 5, "fp", make_features, {"model": MODEL_A})
    proc = start_slow_writer(tmp_path, folder)
    try:
        started = time.time()
        with pytest.raises(ArtifactLockedError, match=rf"{folder} is being written by another process, pid {proc.pid}"):
            write_sharded(folder, N, 5, "fp", make_features, {"model": MODEL_A})
        with pytest.raises(ArtifactLockedError, match=rf"pid {proc.pid} \(.*killable\.py"):
            with exclusive_writer(folder):
                pass
        assert time.time() - started < 2
    finally:
        proc.kill()
        proc.wait()
    # the kernel released the dead writer's lock: no stale lock, and the resumed run ends identical
    write_sharded(folder, N, 5, "fp", make_features, {"model": MODEL_A})
    assert digests(folder) == digests(reference)


def test_exclusive_writer_is_reentrant_and_leaves_no_lock_file(tmp_path):
    with exclusive_writer(tmp_path / "a") as folder:
        assert (folder / ".lock").read_text().split("\n")[0] == str(os.getpid())
        write_sharded(folder, N, 10, "fp", make_features, {"model": MODEL_A})
        assert (folder / ".lock").exists()
    assert not (folder / ".lock").exists()


def test_cleanup_removes_dead_writers_temp_files_but_not_a_live_ones(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        tmp_path.mkdir(exist_ok=True)
        dead_tmp = tmp_path / f".part-00001.parquet.tmp-{dead.pid}"
        live_tmp = tmp_path / f".part-00002.parquet.tmp-{live.pid}"
        dead_tmp.write_bytes(b"half a shard")
        live_tmp.write_bytes(b"half a shard")
        write_sharded(tmp_path, N, 10, "fp", make_features, {"model": MODEL_A})
        assert not dead_tmp.exists() and live_tmp.exists()
    finally:
        live.kill()
        live.wait()


def test_dvc_processes_are_recognised_from_their_command_line():
    assert _mentions_dvc(["/venv/bin/python3.11", "/venv/bin/dvc", "repro"])
    assert _mentions_dvc(["python", "-m", "dvc", "repro", "encode"])
    assert _mentions_dvc(["dvc", "exp", "run"])
    assert not _mentions_dvc(["/bin/bash", "--noprofile", "--norc", "-c", "python -m stages.encode dvc"])
    assert not _mentions_dvc(["python", "-m", "pytest", "tests/test_dvcfile.py"])


FAKE_DVC = textwrap.dedent("""
    import subprocess, sys, time
    subprocess.Popen(["sh", "-c", sys.argv[1]])
    time.sleep(120)
""")

ORPHAN = textwrap.dedent("""
    import json, os, sys, time
    sys.path.insert(0, {repo!r}); sys.path.insert(0, {tests!r})
    from test_shards import make_features, MODEL_A
    from pipeline.data.locks import stop_when_orphaned
    from pipeline.data.shards import write_sharded
    out = sys.argv[1]
    watched = stop_when_orphaned(poll_seconds=0.1)
    with open(sys.argv[2], "w") as f:
        json.dump({{"pid": os.getpid(), "ppid": os.getppid(), "watched": watched}}, f)
    def slow(task):
        # an in-flight temp file, as a shard being written when the stop comes
        with open(os.path.join(out, f".part-{{task.index:05d}}.parquet.tmp-{{os.getpid()}}"), "wb") as f:
            f.write(b"half a shard")
        time.sleep(0.3)
        return make_features(task)
    write_sharded(out, 50, 2, "fp", slow, {{"model": MODEL_A}})
""")


@pytest.mark.parametrize("shell_execs", [True, False], ids=["shell-execs", "shell-waits"])
def test_orphaned_stage_stops_and_leaves_no_temp_file(tmp_path, shell_execs):
    child = tmp_path / "child.py"
    child.write_text(ORPHAN.format(repo=REPO, tests=TESTS))
    fake_dvc = tmp_path / "fake_dvc.py"  # its command line mentions dvc, like `python .venv/bin/dvc repro`
    fake_dvc.write_text(FAKE_DVC)
    out, info, log = tmp_path / "out", tmp_path / "info.json", tmp_path / "stderr.txt"
    command = f"{sys.executable} {child} {out} {info}"
    command = f"exec {command}" if shell_execs else f"{command}; exit $?"
    with open(log, "w") as err:
        parent = subprocess.Popen([sys.executable, str(fake_dvc), command], stderr=err)
    try:
        deadline = time.time() + 30
        while len(list(out.glob("part-*.parquet"))) < 2 and time.time() < deadline:
            time.sleep(0.05)
        started = json.loads(info.read_text())
        if shell_execs:
            assert started["ppid"] == parent.pid and started["watched"] == [parent.pid]
        else:
            assert started["ppid"] != parent.pid and started["watched"] == [started["ppid"], parent.pid]
    finally:
        parent.kill()
        parent.wait()
    pid, deadline = started["pid"], time.time() + 5
    while Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3] \
            and time.time() < deadline:
        time.sleep(0.05)
    assert time.time() < deadline, "the orphaned stage ran on"
    time.sleep(0.2)
    assert f"stage stopped: its dvc process (pid {parent.pid}) has exited" in log.read_text()
    assert sorted(p.name for p in out.glob(".*")) == []  # no temp file, no lock
    assert 2 <= len(list(out.glob("part-*.parquet"))) < 25
