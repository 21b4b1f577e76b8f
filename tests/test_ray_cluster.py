"""The shard stages on a two-node Ray cluster (one CPU per node, one fake GPU) on this machine.

generate and encode of the offline profile's data write the bytes of the local executor at the same
threads_per_task; each stage's tasks get the GPUs and CPUs params.yaml derives (asserted inside the
tasks through Ray's API); results are written by the driver as they arrive; a worker killed mid-shard
is retried and changes no byte; a bad input fails naming the shard and the item.

Ray is in the test extra; without it these tests skip. The cluster is private to this module (its own
GCS, its own RAY_TMPDIR): it never joins nor disturbs another Ray instance.
"""
import hashlib
import importlib
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import pyarrow as pa
import pytest

ray = pytest.importorskip("ray", reason="Ray is optional (pip install -e '.[ray]'; it is in the test extra)")

from pipeline import config, paths
from pipeline.data.executors import ShardExecutor, executor_for, run_shards
from pipeline.data.shards import ShardedArtifact, ShardTask, write_sharded
from pipeline.profiles import resolve_profile

pytestmark = pytest.mark.cluster     # a Ray cluster of its own: `make test` runs it, `make test-fast` does not

REPO = Path(__file__).resolve().parents[1]
CAPTIONS, ROWS_PER_SHARD = 16, 4  # 4 shards over 2 nodes


def offline(**changes) -> config.Config:
    """The offline profile on its first CAPTIONS captions; ``changes``: dotted key -> value."""
    params = resolve_profile("offline")
    params["corpus"]["max_captions"], params["rows_per_shard"] = CAPTIONS, ROWS_PER_SHARD
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = params
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return config.from_dict(params)


def run_stage(root: Path, module: str, cfg: config.Config, *args, patch: dict | None = None) -> None:
    """``python -m <module> args`` in this process, with ``cfg`` as params.yaml and artifacts under ``root``."""
    stage = importlib.import_module(module)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in paths.layout(root).items():
            mp.setattr(paths, key, value)
        mp.setattr(stage, "start", lambda name: cfg)
        for name, value in (patch or {}).items():
            mp.setattr(stage, name, value)
        stage.main(*args)


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def one_task(fn, executor: ShardExecutor):
    """What ``fn`` returns in one task submitted as ``executor`` submits a shard."""
    seen = []
    run_shards(fn, [ShardTask(0, 0, 1, Path("unused"), "fp")], lambda _, got: seen.append(got), executor=executor)
    (got,) = seen
    return got


@pytest.fixture(scope="module")
def cluster():
    """A head node and a worker node, one CPU each; the worker also declares one (fake) GPU."""
    from ray.cluster_utils import Cluster

    tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths live under it
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)
        mp.setenv("RAY_TMPDIR", tmp)
        if ray.is_initialized():
            ray.shutdown()
        nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        try:
            nodes.add_node(num_cpus=1, num_gpus=1)
            path = os.pathsep.join(filter(None, [str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH")]))
            ray.init(address=nodes.address, log_to_driver=False, configure_logging=False,
                     runtime_env={"env_vars": {"PYTHONPATH": path}})
            yield nodes
        finally:
            ray.shutdown()
            nodes.shutdown()
            shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """corpus -> generate -> encode_synthetic with the local executor, threads_per_task 1."""
    root = tmp_path_factory.mktemp("local") / "artifacts"
    cfg = offline(executor="local", threads_per_task=1)
    run_stage(root, "stages.corpus", cfg)
    run_stage(root, "stages.generate", cfg)
    run_stage(root, "stages.encode", cfg, "synthetic")
    return root


def fresh_root(tmp_path: Path, reference: Path) -> Path:
    """A new artifacts folder holding the reference corpus (the input of generate)."""
    root = tmp_path / "artifacts"
    shutil.copytree(reference / "corpus", root / "corpus")
    return root


def test_generate_and_encode_on_two_nodes_write_the_bytes_of_the_local_executor(cluster, reference, tmp_path):
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    root = fresh_root(tmp_path, reference)
    cfg = offline(executor="ray", threads_per_task=1)
    run_stage(root, "stages.generate", cfg)
    run_stage(root, "stages.encode", cfg, "synthetic")
    for folder in ("synthetic", "features/synthetic"):
        assert digests(root / folder) == digests(reference / folder), folder
    assert len(ShardedArtifact(root / "synthetic").paths) == CAPTIONS // ROWS_PER_SHARD


def test_the_driver_writes_each_shard_as_it_arrives(cluster, tmp_path):
    """Shard 0 finishes only after the driver has written shard 1: results are not held back."""
    out = tmp_path / "out"

    def make_table(task):
        if task.index == 0:
            deadline = time.time() + 30
            while not (out / "part-00001.parquet").exists():  # one machine: the driver's folder is visible
                if time.time() > deadline:
                    raise TimeoutError("shard 1 was not written before shard 0 finished")
                time.sleep(0.05)
        return pa.table({"row": list(range(task.start, task.stop))})

    executor = ShardExecutor(kind="ray", num_cpus=1, max_in_flight=2)
    manifest = write_sharded(out, 4, 2, "fp", make_table, {"model": None}, executor=executor)
    assert manifest["written_new"] == 2
    assert ShardedArtifact(out).read_column("row").to_pylist() == [0, 1, 2, 3]


def test_a_worker_killed_mid_shard_is_retried_and_the_bytes_equal_a_clean_run(cluster, reference, tmp_path):
    from pipeline.extract.generate import generate_table

    marker = tmp_path / "killed-once"
    victim = ShardedArtifact(reference / "corpus").read_shard(2, ["caption_id"]).column(0)[0].as_py()

    def generate_then_die(captions, *args):
        if captions.column("caption_id")[0].as_py() == victim and not marker.exists():
            generate_table(captions.slice(0, 1), *args)  # mid-shard: one image made, the rest not
            marker.write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return generate_table(captions, *args)

    root = fresh_root(tmp_path, reference)
    run_stage(root, "stages.generate", offline(executor="ray", threads_per_task=1),
              patch={"generate_table": generate_then_die})
    assert marker.exists(), "the chosen shard's first attempt was killed"
    assert digests(root / "synthetic") == digests(reference / "synthetic")


def test_a_bad_input_fails_naming_the_shard_and_the_item_not_only_a_ray_traceback(cluster, reference, tmp_path):
    root = tmp_path / "artifacts"
    good = ShardedArtifact(reference / "synthetic")

    def damaged(task):  # the reference images with one that does not decode, in shard 1
        table = good.read_shard(task.index)
        if task.index == 1:
            images = table.column("image").to_pylist()
            images[2] = b"not an image"
            table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
        return table

    write_sharded(root / "synthetic", good.num_rows, ROWS_PER_SHARD, "damaged", damaged, good.meta)
    bad_id = good.read_shard(1, ["caption_id"]).column(0)[2].as_py()
    with pytest.raises(ValueError) as error:
        run_stage(root, "stages.encode", offline(executor="ray", threads_per_task=1), "synthetic")
    message = str(error.value)
    shard = root / "features" / "synthetic" / "part-00001.parquet"
    assert message.startswith(f"encode_synthetic: shard 1 ({shard}, rows 4-7): image {bad_id!r} cannot be decoded")
    assert "Traceback" not in message


@pytest.mark.parametrize("device", ["cuda", "cpu"])
def test_each_stage_submits_its_tasks_with_the_gpus_and_cpus_params_yaml_derives(cluster, device):
    def probe(task):  # what Ray gave the task (no torch: a GPU task's worker is fresh each time)
        context = ray.get_runtime_context()
        return {"resources": context.get_assigned_resources(), "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
                "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}

    cfg = offline(executor="ray", device=device, threads_per_task=1)
    for stage in ("generate", "encode", "tag"):
        executor = executor_for(cfg, stage)
        assert executor.ray_options() == {"num_cpus": 1.0, "num_gpus": 1.0 if device == "cuda" else 0.0,
                                          "max_retries": 3}
        got = one_task(probe, replace(executor, threads=None))
        if device == "cuda":
            assert got["resources"] == {"CPU": 1.0, "GPU": 1.0}, stage
            assert got["gpu_ids"] == ["0"] and got["cuda"] == "0", stage  # one device, the one Ray assigned
        else:
            assert got["resources"] == {"CPU": 1.0}, stage
            assert not got["gpu_ids"] and not got["cuda"], stage
    if device == "cuda":  # a fraction of a GPU: still one device, shared
        shared = executor_for(offline(executor="ray", device="cuda", **{"ray.encode.num_gpus": 0.5}), "encode")
        got = one_task(probe, replace(shared, threads=None))
        assert got["resources"] == {"CPU": 1.0, "GPU": 0.5} and got["cuda"] == "0"


def test_threads_per_task_is_torchs_threads_inside_a_ray_task(cluster):
    def threads(task):
        import torch

        return torch.get_num_threads()

    executor = executor_for(offline(executor="ray", threads_per_task=2, **{"ray.encode.num_cpus": 1}), "encode")
    assert one_task(threads, executor) == 2  # Ray alone would give OMP_NUM_THREADS = num_cpus = 1


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
