"""What every stage script does first and last: validate params.yaml whole, watch its dvc process,
hold the stage's lock, fingerprint its output, and say what it did.

A stage's fingerprint hashes exactly what its output depends on: the parameters it reads
(``pipeline.config.STAGE_PARAMS``, speed-only settings left out), the code it runs (the import
closure of its stage script, ``pipeline.data.provenance``) and the content of its inputs.
"""
from __future__ import annotations

import atexit
import json
import os
import sys
import time
import traceback
from contextlib import ExitStack
from pathlib import Path

from pipeline import config as cfg
from pipeline import paths
from pipeline.data.locks import ArtifactLockedError, exclusive_writer, stop_when_orphaned
from pipeline.data.provenance import code_version
from pipeline.data.shards import fingerprint


_imported = time.perf_counter()       # without /proc, a stage's time starts at its import of this module
STAGE_TIMES = "stage_times.jsonl"     # artifacts/logs/: one line per stage process (`synthcap status` sums them)
_held_for_life = ExitStack()          # the stage locks this process holds until it exits
atexit.register(_held_for_life.close)
_running: list[str] = []              # this process's stage instance name, once ``start`` knows it
_started = False                      # True once ``start`` has validated params.yaml and holds the stage's lock

# What bad input raises (a missing or damaged file, a wrong value, features of another model): its
# message names the item and the fix, so a stage prints that one line; anything else is a bug and keeps
# its traceback. ``SYNTHCAP_TRACEBACK=1`` prints the traceback of the former as well.
INPUT_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def run(main, *args: str) -> None:
    """A stage script's entry point: ``main(*args)``; an input error ends the process with one line,
    ``STAGE: what is wrong and how to fix it``, its traceback kept in ``artifacts/logs/STAGE.traceback``.
    Either way, once ``start`` has let the stage begin, the process's time goes to
    ``artifacts/logs/stage_times.jsonl`` (:func:`log_time`)."""
    outcome = "failed"
    try:
        main(*args)
        outcome = "ok"
    except INPUT_ERRORS as err:
        name = _running[0] if _running else Path(sys.argv[0]).stem
        if os.environ.get("SYNTHCAP_TRACEBACK"):
            raise
        log = paths.ARTIFACTS / "logs" / f"{name}.traceback"
        try:
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text("".join(traceback.format_exception(err)), encoding="utf-8")
            where = f"traceback in {log.relative_to(paths.REPO) if log.is_relative_to(paths.REPO) else log}"
        except OSError:
            where = "SYNTHCAP_TRACEBACK=1 prints the traceback"
        sys.exit(f"{name}: {err}\n({type(err).__name__}; {where})")
    finally:
        if _started:            # a stage stopped by a bad key or another's lock did no work, and writes nothing
            seconds = process_seconds()
            log_time(_running[0], seconds if seconds is not None else time.perf_counter() - _imported, outcome)


def process_seconds() -> float | None:
    """Wall seconds since this process started, interpreter and imports included (Linux: its start time in
    /proc/self/stat against /proc/uptime, to 10 ms), or None where /proc is not there."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            started = int(f.read().rsplit(")", 1)[1].split()[19])        # field 22, starttime, in clock ticks
        with open("/proc/uptime", encoding="ascii") as f:
            uptime = float(f.read().split()[0])
        return max(0.0, uptime - started / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None


def append_log(log: Path, entry: dict) -> None:
    """One JSON line appended to ``log`` (artifacts/logs/: the stage times, `synthcap speed`'s readings): one
    short write, so O_APPEND keeps lines whole."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


def read_log(log: Path, fields: dict, defaults: dict | None = None) -> list[dict]:
    """Every line of ``log`` holding each of ``fields`` ({name: type}; a field of ``defaults`` may be missing),
    converted; a torn or foreign line is skipped, and a missing or unreadable log gives []."""
    defaults = defaults or {}
    try:
        lines = log.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    out = []
    for line in lines:
        try:
            entry = json.loads(line)
            out.append({name: kind(entry[name] if name in entry else defaults[name]) for name, kind in fields.items()})
        except (ValueError, KeyError, TypeError):
            continue
    return out


def log_time(name: str, seconds: float, outcome: str) -> None:
    """One line, ``{"stage", "seconds", "outcome", "finished"}``, appended to artifacts/logs/stage_times.jsonl:
    where a `dvc repro` spent its time (DVC keeps no stage durations). The seconds are the process's
    (:func:`process_seconds`; where /proc is missing, from the stage script's import of this module). A log,
    not an artifact: no stage reads it, and a failure to write it never fails the stage."""
    try:
        append_log(paths.ARTIFACTS / "logs" / STAGE_TIMES, {
            "stage": name, "seconds": round(seconds, 2), "outcome": outcome,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    except OSError:
        pass


def last_stage_times(log: Path | None = None) -> dict[str, dict]:
    """The last logged run of each stage instance: {name: {"seconds", "outcome", "finished"}} ({} without a log;
    a torn or foreign line is skipped)."""
    log = log if log is not None else paths.ARTIFACTS / "logs" / STAGE_TIMES
    fields = {"stage": str, "seconds": float, "outcome": str, "finished": str}
    return {e.pop("stage"): e for e in read_log(log, fields)}


def start(stage: str, *instance: str) -> cfg.Config:
    """params.yaml parsed and validated (a bad key fails here, before any work), a watch that stops
    this process if the dvc process that started it dies, and the lock of this stage instance
    (``stage@instance``, e.g. train@syntic) held until the process ends: `python -m stages.train syntic`
    while `dvc repro train@syntic` runs stops at once instead of writing the same files twice."""
    stop_when_orphaned()
    name = f"{stage}@{'-'.join(instance)}" if instance else stage
    _running[:] = [name]
    try:
        config = cfg.load()
    except cfg.ConfigError as err:
        sys.exit(f"{name}: {err}")
    hold_stage_lock(name)
    global _started
    _started = True
    return config


def hold_stage_lock(name: str, root: Path | None = None) -> None:
    """Hold stage ``name``'s writer lock (``<artifacts>/.stage_locks/NAME/.lock``, a flock the kernel drops
    when the process dies) for the rest of this process, or exit naming the process that holds it."""
    folder = Path(root if root is not None else paths.ARTIFACTS) / ".stage_locks" / name
    try:
        _held_for_life.enter_context(exclusive_writer(folder))
    except ArtifactLockedError as err:
        sys.exit(f"{name}: another process is running this stage. {err}")


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
