"""The executors in this process: threads, inputs read by the driver, errors naming the shard, and the
Ray settings derived from params.yaml (tests/test_ray_cluster.py runs them on a two-node cluster)."""
import copy
import hashlib

import pytest
import torch

from pipeline import config
from pipeline.data.executors import ShardError, ShardExecutor, cluster_slots, executor_for, shard_error
from pipeline.data.shards import JOURNAL, MANIFEST, write_sharded
from pipeline.profiles import resolve_profile

from test_shards import MODEL_A, N, make_features

SHARD_STAGES = [("generate", None), ("encode_text", None), ("encode_synthetic", None), ("encode_eval", "demo"),
                ("tag_synthetic", None), ("tag_eval", "demo"), ("optimize", None)]


def digests(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def offline() -> dict:
    return resolve_profile("offline")


def edited(params: dict, **changes) -> config.Config:
    params = copy.deepcopy(params)
    for dotted, value in changes.items():
        *parents, last = dotted.split(".")
        node = params
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return config.from_dict(params)


def test_unknown_executor_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown executor 'dask'"):
        ShardExecutor(kind="dask")
    with pytest.raises(ValueError, match="unknown executor 'dask'"):
        write_sharded(tmp_path, N, 10, "fp", make_features, {"model": MODEL_A}, executor="dask")


@pytest.mark.parametrize("threads", [1, 2])
def test_the_local_executor_runs_each_shard_at_threads_per_task(tmp_path, threads):
    before, seen = torch.get_num_threads(), []

    def make_table(task):
        seen.append(torch.get_num_threads())
        return make_features(task)

    write_sharded(tmp_path, N, 10, "fp", make_table, {"model": MODEL_A}, executor=ShardExecutor(threads=threads))
    assert seen == [threads] * 5 and torch.get_num_threads() == before


def test_inputs_are_read_by_the_driver_and_handed_to_the_shard_function(tmp_path):
    """read_inputs runs where the artifact is written; make_table(task, inputs) gets what it read."""
    write_sharded(tmp_path / "direct", N, 10, "fp", make_features, {"model": MODEL_A})
    read = []

    def read_inputs(task):
        read.append(task.index)
        return {"start": task.start, "stop": task.stop}

    def make_table(task, inputs):
        assert (inputs["start"], inputs["stop"]) == (task.start, task.stop)
        return make_features(task)

    write_sharded(tmp_path / "handed", N, 10, "fp", make_table, {"model": MODEL_A}, read_inputs=read_inputs)
    assert read == [0, 1, 2, 3, 4]
    assert digests(tmp_path / "handed") == digests(tmp_path / "direct")


def test_a_failing_shard_names_its_stage_index_file_rows_and_item_and_the_finished_ones_are_kept(tmp_path):
    def make_table(task):
        if task.index == 2:
            raise ValueError("image 'c23' cannot be decoded: corrupt")
        return make_features(task)

    with pytest.raises(ValueError) as error:
        write_sharded(tmp_path, N, 10, "fp", make_table, {"model": MODEL_A}, stage="encode_synthetic")
    assert str(error.value) == (f"encode_synthetic: shard 2 ({tmp_path / 'part-00002.parquet'}, rows 20-29): "
                                f"image 'c23' cannot be decoded: corrupt")
    assert isinstance(error.value.__cause__, ValueError)
    assert (tmp_path / JOURNAL).is_file() and not (tmp_path / MANIFEST).exists()
    again = write_sharded(tmp_path, N, 10, "fp", make_features, {"model": MODEL_A}, stage="encode_synthetic")
    assert again["kept_from_previous_run"] == 2 and again["written_new"] == 3


def test_an_error_keeps_its_type_where_it_can():
    assert type(shard_error("s: shard 0", OSError("disk full"))) is OSError
    restated = shard_error("s: shard 0", KeyError("caption_id"))  # KeyError quotes its message: no exact restatement
    assert isinstance(restated, ShardError) and str(restated) == "s: shard 0: KeyError: 'caption_id'"


def test_ray_resources_are_derived_from_device_unless_set(offline):
    cpu = edited(offline, executor="ray", threads_per_task=2)
    for stage in ("generate", "encode", "tag"):
        ex = executor_for(cpu, stage)
        assert ex.ray_options() == {"num_cpus": 2.0, "num_gpus": 0.0, "max_retries": 3} and ex.threads == 2
    cuda = edited(offline, executor="ray", device="cuda")
    assert {s: executor_for(cuda, s).ray_options() for s in ("generate", "encode", "tag")} == {
        s: {"num_cpus": 1.0, "num_gpus": 1.0, "max_retries": 3} for s in ("generate", "encode", "tag")}
    custom = edited(offline, executor="ray", device="cuda", **{"ray.encode": {"num_gpus": 0.25, "num_cpus": 4},
                                                               "ray.max_in_flight": 8, "ray.max_retries": 1})
    ex = executor_for(custom, "encode")
    assert ex.ray_options() == {"num_cpus": 4.0, "num_gpus": 0.25, "max_retries": 1} and ex.max_in_flight == 8
    assert executor_for(custom, "generate").num_gpus == 1.0
    assert executor_for(edited(offline), "generate") == ShardExecutor(kind="local", threads=1)


def test_ray_refuses_before_any_work_what_would_fail_in_every_task(offline):
    with pytest.raises(config.ConfigError, match=r"`ray.tag.num_gpus` is 0 but `device` is cuda"):
        executor_for(edited(offline, executor="ray", device="cuda", **{"ray.tag.num_gpus": 0}), "tag")
    with pytest.raises(config.ConfigError, match="set `device: cuda`"):
        executor_for(edited(offline, executor="ray", device="cuda:1"), "generate")
    executor_for(edited(offline, device="cuda:1"), "generate")  # the local executor uses cuda:1 as given
    with pytest.raises(config.ConfigError, match=r"`ray.generate.num_gpu`.*did you mean `num_gpus`"):
        edited(offline, **{"ray.generate.num_gpu": 1})
    with pytest.raises(config.ConfigError, match="`threads_per_task` must be >= 1"):
        edited(offline, threads_per_task=0)


def test_executor_and_ray_are_speed_only_but_threads_per_task_is_a_parameter_of_every_shard_stage(offline):
    base = edited(offline)
    faster = edited(offline, executor="ray", **{"ray.generate.num_gpus": 2, "ray.max_in_flight": 3})
    other_threads = edited(offline, threads_per_task=2)
    for stage, name in SHARD_STAGES:
        tracked = config.dvc_params(stage, base, name)
        assert "threads_per_task" in tracked and not [k for k in tracked if k.split(".")[0] in ("ray", "executor")]
        assert config.stage_params(stage, faster, name) == config.stage_params(stage, base, name), stage
        assert config.stage_params(stage, other_threads, name) != config.stage_params(stage, base, name), stage


def test_in_flight_defaults_to_twice_what_the_cluster_runs_at_once():
    gpu = ShardExecutor(kind="ray", num_cpus=1, num_gpus=1)
    assert cluster_slots({"CPU": 32.0, "GPU": 8.0}, gpu) == 8
    assert cluster_slots({"CPU": 32.0, "GPU": 8.0}, ShardExecutor(kind="ray", num_cpus=1, num_gpus=0.5)) == 16
    assert cluster_slots({"CPU": 8.0}, ShardExecutor(kind="ray", num_cpus=2)) == 4
    assert cluster_slots({"CPU": 2.0}, gpu) == 1  # no GPU yet (an autoscaler may add one): still submit

