"""The same shard functions on Ray write the same bytes as in-process."""
import hashlib
import os
from pathlib import Path

import pytest

from pipeline.data.executors import map_tasks
from pipeline.data.shards import FINGERPRINTS, MANIFEST, write_sharded

from test_shards import MODEL_A, N, make_features


def digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_unknown_executor_is_refused():
    with pytest.raises(ValueError, match="unknown executor 'dask'"):
        map_tasks(len, ["a"], executor="dask")


def test_ray_executor_writes_the_same_bytes_as_local(tmp_path):
    ray = pytest.importorskip("ray", reason="Ray is optional: pip install -e '.[ray]'")
    tests = str(Path(__file__).parent)  # workers must import this module's shard function
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}})
    try:
        write_sharded(tmp_path / "local", N, 10, "fp", make_features, {"model": MODEL_A}, executor="local")
        write_sharded(tmp_path / "ray", N, 10, "fp", make_features, {"model": MODEL_A}, executor="ray")
    finally:
        ray.shutdown()
    assert digests(tmp_path / "ray") == digests(tmp_path / "local")
    # 5 shards + manifest, and beside them how they were made (the fingerprints: the same too)
    shards = [f"part-{i:05d}.parquet" for i in range(5)]
    assert sorted(digests(tmp_path / "ray")) == sorted(shards + [MANIFEST, FINGERPRINTS])
