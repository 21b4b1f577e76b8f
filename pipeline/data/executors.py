"""Run one pure function per shard: in this process (default) or as Ray tasks on a cluster.

``run_shards`` is the one scheduler of the shard stages. For every shard it

1. reads the shard's inputs **in this process** (``read_inputs(task)``: e.g. the corpus rows or the
   synthetic images of shard k, verified against their sha256 as every reader does),
2. computes its table with ``compute(task, inputs)``: here, or in a Ray task that receives the inputs
   through Ray's object store, so no worker reads or writes any file of the pipeline,
3. hands the table back to this process, ``on_result(task, table)``, which writes it (atomically, then
   journals its hash: ``pipeline.data.shards.write_sharded``) as soon as it arrives, in whatever order
   the shards finish.

Both executors give the same bytes at the same ``threads`` (torch's intra-op threads, set around each
shard in both; float sums split over another number of threads can differ in the last bit).

Why Ray *tasks* (not actors, not Ray Data): a shard is a pure, stateless unit whose identity
(fingerprint, journal record, file) the driver already owns. A task is exactly that: Ray schedules it
on any node with the requested GPUs/CPUs, reruns it when its worker or node dies (``max_retries``,
lineage), and an elastic or preemptible cluster needs nothing more. A pool of model-holding actors
would load each model once per GPU instead of once per shard, but needs a pool size fixed up front,
holds its GPUs until the stage ends, and recovers from a dead actor only through restarts plus task
retries. Ray Data's ``map_batches`` re-blocks rows into its own batches (the shard is our unit of
caching and resume) and is built to write from the workers. Worker processes are reused between CPU
tasks (models are cached per process by the loaders); GPU tasks keep Ray's default of a fresh worker
per task (``max_calls=1``: GPU memory and device state freed between shards), which reloads the model
for each shard: seconds against the minutes a paper-scale shard takes on a GPU.

Ray is optional (``pip install -e '.[ray]'``). ``executor: ray`` in params.yaml joins the cluster in
``RAY_ADDRESS`` (without it Ray starts a local one) and ships this checkout's ``pipeline`` and
``stages`` packages with the job (its ``working_dir``), so every worker runs the code the stage's
fingerprints hash; the nodes need the same Python environment (the lock), not the same checkout.
docs/RAY.md: clusters, resources, the paper-scale recipe.
"""
from __future__ import annotations

import math
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from tqdm.auto import tqdm

EXECUTORS = ("local", "ray")
# The stages whose shards run as Ray tasks, by the `ray:` key that holds their resources (encode: the
# encode_* stages; tag: tag_synthetic and tag_eval). Each runs a model on `device`.
RAY_STAGES = ("generate", "encode", "tag")
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ShardExecutor:
    """Where and how the shard functions of one stage run.

    ``threads``: torch intra-op threads of one shard (None: leave torch's setting alone).
    ``num_cpus``, ``num_gpus``: what each Ray task asks for (its ``ray.remote`` options); a GPU task sees
    exactly its GPU(s) in ``CUDA_VISIBLE_DEVICES``. ``max_in_flight``: tasks submitted at once (None: twice the
    tasks the cluster can run at once), which bounds the inputs and results held in the object store.
    ``max_retries``: reruns of a task whose worker or node died (a failing input is never retried).
    """
    kind: str = "local"
    threads: int | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_in_flight: int | None = None
    max_retries: int = 3

    def __post_init__(self):
        if self.kind not in EXECUTORS:
            raise ValueError(f"unknown executor {self.kind!r}: use 'local' or 'ray'")

    def ray_options(self) -> dict:
        """The ``.options(...)`` every task of the stage is submitted with."""
        return {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus, "max_retries": self.max_retries}


def executor_for(config, stage: str) -> ShardExecutor:
    """The executor of the shard stage(s) ``stage`` (a key of ``ray:``: generate, encode, tag) as
    params.yaml sets it; a null resource is derived:

    - ``num_gpus``: 1 when ``device`` is cuda, else 0;
    - ``num_cpus``: ``threads_per_task`` (the cores one task keeps busy).

    With ``executor: ray`` it refuses, before any work, what would fail in every task: a cuda device
    with ``num_gpus: 0`` (Ray hides the GPUs of a task that asks for none) or with ``cuda:N``.
    """
    from pipeline.config import ConfigError

    if stage not in RAY_STAGES:
        raise ValueError(f"no Ray settings for stage {stage!r}: one of {', '.join(RAY_STAGES)}")
    r, on_gpu = config.ray, config.device.startswith("cuda")
    resources = getattr(r, stage)
    num_gpus = resources.num_gpus if resources.num_gpus is not None else (1.0 if on_gpu else 0.0)
    num_cpus = resources.num_cpus if resources.num_cpus is not None else float(config.threads_per_task)
    if config.executor == "ray":
        if on_gpu and num_gpus == 0:
            raise ConfigError(f"`ray.{stage}.num_gpus` is 0 but `device` is {config.device}: Ray hides every GPU from "
                              f"a task that asks for none (CUDA_VISIBLE_DEVICES=''). Ask for a GPU (a fraction such "
                              f"as 0.5 lets tasks share one) or set `device: cpu`")
        if on_gpu and config.device != "cuda":
            raise ConfigError(f"`device: {config.device}` with `executor: ray`: Ray gives each task its own GPU(s), "
                              f"which it sees as cuda:0; set `device: cuda`")
    return ShardExecutor(kind=config.executor, threads=config.threads_per_task, num_cpus=num_cpus,
                         num_gpus=num_gpus, max_in_flight=r.max_in_flight, max_retries=r.max_retries)


def as_executor(executor: str | ShardExecutor) -> ShardExecutor:
    return executor if isinstance(executor, ShardExecutor) else ShardExecutor(kind=executor)


# --- the shard function, wherever it runs -------------------------------------------------------

@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``threads`` for the block (nothing if None or torch is absent)."""
    if threads is None:
        yield
        return
    try:
        import torch
    except ImportError:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def compute_shard(compute: Callable, task: Any, inputs: Any, has_inputs: bool, threads: int | None) -> Any:
    """One shard's table: ``compute(task, inputs)`` (or ``compute(task)``) at ``threads`` torch threads."""
    with torch_threads(threads):
        return compute(task, inputs) if has_inputs else compute(task)


class ShardError(RuntimeError):
    """A shard function failed with an exception that cannot be re-raised under its own type."""


def shard_error(where: str, cause: BaseException) -> BaseException:
    """``cause`` restated with the shard it failed in: the same type where possible (a ValueError
    stays a ValueError), its own message kept whole after ``where``."""
    message = f"{where}: {cause}"
    try:
        error = type(cause)(message)
        if str(error) == message:
            return error
    except Exception:  # a type with another constructor
        pass
    return ShardError(f"{where}: {type(cause).__name__}: {cause}")


def run_shards(compute: Callable, tasks: Sequence[Any], on_result: Callable[[Any, Any], None],
               executor: str | ShardExecutor = "local", read_inputs: Callable[[Any], Any] | None = None,
               desc: str = "shards", describe: Callable[[Any], str] = repr) -> None:
    """For each task: ``inputs = read_inputs(task)`` here, ``table = compute(task, inputs)`` (here or
    on Ray; ``compute(task)`` when there is no ``read_inputs``), then ``on_result(task, table)`` here,
    as each finishes, under one progress bar. A failing shard raises its exception restated with
    ``describe(task)`` (see :func:`shard_error`); the shards finished before stay handed over."""
    executor = as_executor(executor)
    if executor.kind == "local":
        with torch_threads(executor.threads):
            for task in tqdm(tasks, desc=desc, unit="shard", disable=not tasks):
                inputs = read_inputs(task) if read_inputs else None
                try:
                    table = compute(task, inputs) if read_inputs else compute(task)
                except Exception as err:
                    raise shard_error(describe(task), err) from err
                on_result(task, table)
        return
    _run_ray(compute, tasks, on_result, executor, read_inputs, desc, describe)


# --- Ray ----------------------------------------------------------------------------------------

def _ray():
    try:
        import ray
    except ImportError as err:
        raise RuntimeError("executor 'ray' needs Ray: pip install -e '.[ray]' (make install LOCK=ray)") from err
    if not ray.is_initialized():
        # RAY_ADDRESS joins a running cluster; without it Ray starts a local one.
        code = _code_package()
        try:
            ray.init(log_to_driver=False, runtime_env={"working_dir": code})  # uploaded here, once per job
        finally:
            shutil.rmtree(code, ignore_errors=True)
    return ray


def _code_package() -> str:
    """A copy of this checkout's ``pipeline`` and ``stages`` packages (the code the fingerprints hash),
    shipped as the job's ``working_dir``: every worker imports exactly the driver's code, first on its
    path, whatever checkout its node has (Ray's ``py_modules`` would not do: a node holding the driver's
    directory would import its own copy from there)."""
    folder = tempfile.mkdtemp(prefix="synthcap-code-")
    for package in ("pipeline", "stages"):
        shutil.copytree(REPO / package, Path(folder) / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))
    return folder


def cluster_slots(resources: dict, executor: ShardExecutor) -> int:
    """How many of the stage's tasks ``resources`` (Ray's cluster_resources()) can run at once."""
    asks = {"CPU": executor.num_cpus, "GPU": executor.num_gpus}
    fits = [math.floor(resources.get(name, 0) / amount + 1e-9) for name, amount in asks.items() if amount > 0]
    return max(1, min(fits)) if fits else max(1, int(resources.get("CPU", 1)))


def _run_ray(compute, tasks, on_result, executor: ShardExecutor, read_inputs, desc, describe) -> None:
    if not tasks:
        return
    ray = _ray()
    from ray.exceptions import RayError, RayTaskError

    in_flight = executor.max_in_flight or 2 * cluster_slots(ray.cluster_resources(), executor)
    # options in ray.remote (not .options()): a GPU task then keeps Ray's max_calls=1 (a fresh worker)
    remote = ray.remote(**executor.ray_options())(compute_shard)
    compute_ref = ray.put(compute)  # shipped once, not with every task
    queue = list(tasks)
    pending: dict[Any, Any] = {}  # ObjectRef -> task

    def submit() -> None:
        while queue and len(pending) < in_flight:
            task = queue.pop(0)
            inputs = read_inputs(task) if read_inputs else None
            pending[remote.remote(compute_ref, task, inputs, read_inputs is not None, executor.threads)] = task

    gpus = f", {executor.num_gpus:g} GPU" if executor.num_gpus else ""
    try:
        with tqdm(total=len(tasks), desc=f"{desc} (ray: {executor.num_cpus:g} CPU{gpus} a task)",
                  unit="shard") as bar:
            submit()
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    task = pending.pop(ref)
                    try:
                        table = ray.get(ref)
                    except RayTaskError as err:  # the shard function raised: the input's fault, not retried
                        cause = err.cause if isinstance(err.cause, BaseException) else err
                        raise shard_error(describe(task), cause) from err
                    except RayError as err:  # its worker or node died more than max_retries times
                        raise ShardError(f"{describe(task)}: its Ray task failed {executor.max_retries + 1} times "
                                         f"({type(err).__name__}: {err}); the shards finished before are kept, "
                                         f"rerun the stage") from err
                    del ref
                    on_result(task, table)
                    del table
                    bar.update(1)
                submit()
    finally:
        for ref in pending:  # a failure or a stop: do not leave the cluster computing for nobody
            ray.cancel(ref, force=True)
