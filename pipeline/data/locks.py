"""One writer per artifact folder, and no stage that outlives its ``dvc`` process.

``exclusive_writer(folder)`` holds an exclusive, non-blocking ``flock`` on ``<folder>/.lock`` for
as long as a stage writes the folder: a second writer (a second ``dvc repro``, a stage started by
hand) fails at once, naming the holder. The kernel drops the lock when its process dies, so a killed
writer never leaves a stale lock; the ``.lock`` file itself is removed on a clean exit (it sits in a
DVC output folder and must not end up in the artifact's hash).

``stop_when_orphaned()`` makes a stage stop when the ``dvc`` process that started it dies (``kill``
of ``dvc``, a closed terminal), instead of running on and racing the next ``dvc repro``.

Temporary files are ``.<name>.tmp-<pid>``; ``remove_stale_temp_files`` removes those of this process
and of dead ones, never those of a live process.
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import signal
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOCK_NAME = ".lock"
TEMP_PATTERN = re.compile(r"^\..+\.tmp-(\d+)$")


class ArtifactLockedError(RuntimeError):
    """Another live process is writing the same artifact folder."""


# --- processes ----------------------------------------------------------------------------------

def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state is [0], ppid [1], starttime [19])."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2:].split()


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    fields = _stat_fields(pid)
    if fields is None:
        return not Path("/proc/self").exists()  # no procfs: trust kill(0)
    return fields[0] not in ("Z", "X")


def _cmdline(pid: int) -> list[str]:
    try:
        return [a for a in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0") if a]
    except OSError:
        return []


_DVC_WORD = re.compile(r"(?:^|[^a-z0-9])dvc(?:[^a-z0-9]|$)", re.IGNORECASE)


def _mentions_dvc(argv: list[str]) -> bool:
    """``dvc repro``, ``python .venv/bin/dvc repro``, ``python -m dvc repro``: an argument whose base name
    has the word dvc. Arguments holding whitespace (a shell's ``-c`` command string) are not looked at:
    the stage command itself is not the dvc process."""
    return any(_DVC_WORD.search(os.path.basename(a)) for a in argv if not any(c.isspace() for c in a))


# --- the lock -----------------------------------------------------------------------------------

_held: dict[str, int] = {}  # folders this process holds -> nesting depth
_held_lock = threading.Lock()

def _holder(lock_path: Path) -> tuple[str, str]:
    """(pid, command line) written into ``lock_path`` by its holder."""
    lines: list[str] = []
    for _ in range(20):  # the holder writes them right after taking the lock
        try:
            lines = lock_path.read_text().strip().splitlines()
        except OSError:
            lines = []
        if lines:
            break
        time.sleep(0.025)
    pid = lines[0] if lines and lines[0].isdigit() else "?"
    cmd = lines[1] if len(lines) > 1 else "unknown command"
    return pid, cmd


@contextmanager
def exclusive_writer(folder: Path | str) -> Iterator[Path]:
    """Hold the exclusive writer lock of ``folder`` (created if missing) for the ``with`` block.

    Raises ArtifactLockedError at once if another live process holds it. Re-entrant within a
    process (a stage may hold its folder while ``write_sharded`` takes it again). Yields the folder.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    with _held_lock:
        nested = key in _held
        if nested:
            _held[key] += 1
    if nested:
        try:
            yield folder
        finally:
            with _held_lock:
                _held[key] -= 1
        return
    lock_path = folder / LOCK_NAME
    while True:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            pid, cmd = _holder(lock_path)
            raise ArtifactLockedError(
                f"{folder} is being written by another process, pid {pid} ({cmd}): two writers would destroy "
                f"each other's files. Wait for it to finish, or stop it (kill {pid}) and rerun") from None
        # the previous holder may have removed .lock between our open and our flock: then we hold a
        # lock on a deleted file that nobody else can see, so start again on the current one
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(lock_path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    with _held_lock:
        _held[key] = 1
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n{' '.join(_cmdline(os.getpid())) or sys.argv[0]}\n".encode(), 0)
        yield folder
    finally:
        with _held_lock:
            del _held[key]
        try:
            lock_path.unlink(missing_ok=True)  # while still holding it (see the samestat check above)
        finally:
            os.close(fd)  # releases the flock


def remove_stale_temp_files(folder: Path | str) -> list[Path]:
    """Remove ``.<name>.tmp-<pid>`` files of this process and of processes that are gone.

    Another live process's temp file is left alone (it may be mid-write). Returns the removed files.
    """
    removed = []
    me = os.getpid()
    for path in Path(folder).glob(".*.tmp-*"):
        match = TEMP_PATTERN.match(path.name)
        if not match:
            continue
        pid = int(match.group(1))
        if pid == me or not pid_alive(pid):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


# --- orphaned stages ----------------------------------------------------------------------------

def watched_ancestors(start: int | None = None) -> list[int]:
    """Parents from ``start`` (default: our parent) up to and including the first that is a dvc process.

    DVC runs a stage as ``$SHELL -c '<cmd>'``; the shell may exec the command (then dvc is our parent)
    or wait for it (then the shell is our parent and dvc its parent): both end at the dvc process.
    Without a dvc ancestor only the direct parent is watched.
    """
    first = os.getppid() if start is None else start
    chain, pid = [], first
    while pid > 1 and pid not in chain:
        chain.append(pid)
        if _mentions_dvc(_cmdline(pid)):
            return chain
        fields = _stat_fields(pid)
        if fields is None:
            break
        pid = int(fields[1])
    return [first] if first > 1 else []


class _Terminated(SystemExit):
    pass


def _raise_system_exit(signum, frame):  # noqa: ARG001
    raise _Terminated(128 + signum)


_watch_lock = threading.Lock()
_watching = False


def stop_when_orphaned(poll_seconds: float = 0.5, grace_seconds: float | None = 60.0) -> list[int]:
    """Stop this process when the dvc process that started it (or an intermediate shell) exits.

    Call it at the start of a stage. A daemon thread polls the watched ancestors; when one is gone
    (or our parent changes) it prints ``stage stopped: its dvc process (pid N) has exited`` to stderr
    and sends SIGTERM to this process. SIGTERM raises SystemExit in the main thread, so ``finally``
    blocks run (the in-flight temp file is removed, the lock released). If the main thread has not
    exited ``grace_seconds`` later (stuck in native code), the process exits hard; a dead writer's
    temp file is removed by the next run. Returns the watched pids. Idempotent.
    """
    global _watching
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_system_exit)
    with _watch_lock:
        if _watching:
            return []
        _watching = True
    parent = os.getppid()
    watched = watched_ancestors(parent)
    dvc_pid = watched[-1] if watched else parent
    starts = {pid: (_stat_fields(pid) or [None] * 20)[19] for pid in watched}
    watched = [pid for pid in watched if starts[pid] is not None]  # no procfs: only the getppid() check

    def gone(pid: int) -> bool:
        fields = _stat_fields(pid)
        return fields is None or fields[0] in ("Z", "X") or fields[19] != starts[pid]  # pid reused

    def watch() -> None:
        while True:
            time.sleep(poll_seconds)
            if os.getppid() != parent or any(gone(pid) for pid in watched):
                break
        print(f"\nstage stopped: its dvc process (pid {dvc_pid}) has exited", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        if grace_seconds is not None:
            time.sleep(grace_seconds)
            os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name="stop-when-orphaned", daemon=True).start()
    return watched
