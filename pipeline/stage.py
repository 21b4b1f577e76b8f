"""What every stage script does first and last: validate params.yaml whole, watch its dvc process,
fingerprint its output, and say what it did.

A stage's fingerprint hashes exactly what its output depends on: the parameters it reads
(``pipeline.config.STAGE_PARAMS``, speed-only settings left out), the code it runs (the import
closure of its stage script, ``pipeline.data.provenance``) and the content of its inputs.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from pipeline import config as cfg
from pipeline.data.locks import stop_when_orphaned
from pipeline.data.provenance import code_version
from pipeline.data.shards import fingerprint


def start(stage: str) -> cfg.Config:
    """params.yaml parsed and validated (a bad key fails here, before any work), and a watch that
    stops this process if the dvc process that started it dies."""
    stop_when_orphaned()
    try:
        return cfg.load()
    except cfg.ConfigError as err:
        sys.exit(f"{stage}: {err}")


def world_config(config: cfg.Config, stage: str, name: str) -> cfg.World:
    """World ``name`` of params.yaml, or an exit naming the worlds there are."""
    if name not in config.worlds:
        sys.exit(f"{stage}@{name}: params.yaml has no world {name!r} (worlds: {', '.join(config.worlds) or 'none'})")
    return config.worlds[name]


def base_fingerprint(stage: str, config: cfg.Config, name: str | None = None, *inputs, module: str | None = None
                     ) -> str:
    """Parameters + code + inputs of ``stage`` (``inputs``: fingerprints or ids of what it reads;
    ``module``: the stage script when it is not ``stages.<stage>``)."""
    code = code_version(module or f"stages.{stage}")
    return fingerprint(stage, cfg.stage_params(stage, config, name), code, *inputs)


def write_json(path: Path | str, obj) -> None:
    """JSON written atomically (temp name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def read_json(path: Path | str):
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run the stage that writes it (`dvc repro`)")
    return json.loads(path.read_text(encoding="utf-8"))


def say(message: str) -> None:
    print(message, flush=True)


def shard_summary(result: dict) -> str:
    """What ``write_sharded`` did, for a stage's last line: kept, written, redone (stale or damaged)."""
    parts = [f"{len(result['shards'])} shards: {result['kept_from_previous_run']} kept"]
    if result.get("written_new"):
        parts.append(f"{result['written_new']} written")
    if result.get("redone_stale"):
        parts.append(f"{result['redone_stale']} redone (stale)")
    if result.get("redone_corrupt"):
        parts.append(f"{result['redone_corrupt']} redone (damaged: {', '.join(result['corrupt_files'])})")
    return ", ".join(parts)
