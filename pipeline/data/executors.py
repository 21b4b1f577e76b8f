"""Run one pure function per shard: in this process (default) or spread over a Ray cluster.

Both give the same bytes, because each shard function depends only on its task. Ray is optional
(``pip install -e .[ray]``); set ``executor: ray`` in params.yaml and, for a running cluster,
``RAY_ADDRESS`` in the environment (without it Ray starts a local one).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm


def map_tasks(fn: Callable[..., Any], tasks: Sequence[Any], executor: str = "local",
              desc: str = "shards", **kwargs: Any) -> list[Any]:
    """``[fn(task, **kwargs) for task in tasks]`` with a progress bar, locally or on Ray."""
    if executor == "local":
        return [fn(task, **kwargs) for task in tqdm(tasks, desc=desc, unit="shard", disable=not tasks)]
    if executor == "ray":
        return _map_ray(fn, tasks, desc, **kwargs)
    raise ValueError(f"unknown executor {executor!r}: use 'local' or 'ray'")


def _map_ray(fn: Callable[..., Any], tasks: Sequence[Any], desc: str, **kwargs: Any) -> list[Any]:
    try:
        import ray
    except ImportError as err:
        raise RuntimeError("executor 'ray' needs Ray: pip install -e '.[ray]'") from err
    if not ray.is_initialized():  # RAY_ADDRESS joins a running cluster; without it Ray starts a local one
        path = os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))
        ray.init(log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": path}})
    remote_fn = ray.remote(fn)
    shared = {k: ray.put(v) for k, v in kwargs.items()}
    pending = {remote_fn.remote(task, **shared): i for i, task in enumerate(tasks)}
    results: list[Any] = [None] * len(tasks)
    with tqdm(total=len(tasks), desc=f"{desc} (ray)", unit="shard") as bar:
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                results[pending.pop(ref)] = ray.get(ref)
                bar.update(1)
    return results
