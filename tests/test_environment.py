"""The environment record (pipeline/environment.py) and the lock files (requirements/).

The lock checks are the "pip freeze agrees with the lock" check: `make install` leaves a stamp
``.locked-NAME`` in the venv it built from ``requirements/NAME.txt``, and every package that lock (and
``requirements/pip.txt``, the installer) pins must be installed at exactly that version.
"""
import importlib.metadata
import os
import platform
import re
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from pipeline import environment
from pipeline.environment import library_versions

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = REPO / "requirements"
FLAVOURS = ("base", "test", "ray", "gpu")
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)")
# The header line `make lock` writes: "#    make lock  (this file: synthcap[cpu,test] from pyproject.toml)"
HEADER = re.compile(r"^#\s+make lock\s+\(this file: synthcap\[([a-z0-9_,-]+)\] from pyproject\.toml\)")


def locked_pins(path: Path) -> dict[str, str]:
    """{canonical name: version} of every `name==version` line of a pip-compile output file."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        match = PIN.match(line)
        if match:
            pins[canonicalize_name(match[1])] = match[2]
    return pins


def installed_from_lock() -> str | None:
    """NAME of the requirements/NAME.txt that `make install` built this venv from, or None."""
    stamps = sorted(Path(sys.prefix).glob(".locked-*"))
    return stamps[0].name.removeprefix(".locked-") if stamps else None


def test_library_versions_are_the_installed_ones():
    versions = library_versions()
    assert versions["python"] == platform.python_version()
    for name in environment.PACKAGES:
        try:
            expected = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            expected = None
        assert versions[name] == expected, name
    import faiss  # noqa: F401  (the test environment has one FAISS build; which one is reported)
    assert importlib.metadata.packages_distributions()["faiss"] == [versions["faiss_distribution"]]
    assert versions["faiss"] == importlib.metadata.version(versions["faiss_distribution"])
    import torch
    assert versions["torch_cuda"] == torch.version.cuda
    assert versions["cuda_available"] == torch.cuda.is_available()


def test_a_missing_package_is_none(monkeypatch):
    assert environment.distribution_version("synthcap-no-such-package") is None
    monkeypatch.setattr(environment, "PACKAGES", environment.PACKAGES + ("synthcap-no-such-package",))
    monkeypatch.setattr(environment, "FAISS_DISTRIBUTIONS", ("synthcap-no-such-faiss",))
    monkeypatch.setattr(environment.importlib.util, "find_spec", lambda name: None)
    versions = library_versions()
    assert versions["synthcap-no-such-package"] is None
    assert versions["faiss"] is None and versions["faiss_distribution"] is None


def test_installed_packages_are_exactly_the_locked_versions():
    name = installed_from_lock()
    if name is None:
        message = f"{sys.prefix} was not installed from a lock by `make install` (no .locked-* stamp)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    wrong = {}
    for lock in (REQUIREMENTS / "pip.txt", REQUIREMENTS / f"{name}.txt"):
        pins = locked_pins(lock)
        assert pins, f"no pins parsed from {lock}"
        for package, locked in pins.items():
            try:
                installed = importlib.metadata.version(package)
            except importlib.metadata.PackageNotFoundError:
                installed = None
            if installed is None or Version(installed) != Version(locked):
                wrong[package] = f"locked {locked}, installed {installed}"
    assert not wrong, f"the venv disagrees with requirements/{name}.txt (rerun make install): {wrong}"


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_lock_satisfies_pyproject(flavour):
    """Each lock pins a version of every requirement that pyproject.toml gives its extras: a
    dependency added or a bound raised without `make lock` fails here, not in a fresh clone."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    lock = REQUIREMENTS / f"{flavour}.txt"
    header = next((HEADER.match(line) for line in lock.read_text(encoding="utf-8").splitlines()
                   if HEADER.match(line)), None)
    assert header, f"{lock} lacks the header `make lock` writes"
    extras = header[1].split(",")
    pins = locked_pins(lock)
    requirements = [Requirement(r) for r in project["dependencies"]]
    requirements += [Requirement(r) for extra in extras for r in project["optional-dependencies"][extra]]
    unmet = []
    for req in requirements:
        if req.marker and not any(req.marker.evaluate({"extra": extra})
                                  for extra in extras + [""]):
            continue
        locked = pins.get(canonicalize_name(req.name))
        if locked is None or not req.specifier.contains(locked, prereleases=True):
            unmet.append(f"{req} (locked: {locked})")
    assert not unmet, f"{lock.name} is stale, run `make lock`: {unmet}"


def test_one_faiss_build_per_lock():
    """The CPU and GPU builds of FAISS install the same module: a lock holds exactly one."""
    for flavour in FLAVOURS:
        faiss = [p for p in locked_pins(REQUIREMENTS / f"{flavour}.txt") if p.startswith("faiss")]
        assert faiss == (["faiss-gpu-cu12"] if flavour == "gpu" else ["faiss-cpu"]), flavour


def test_loadgroup_keeps_a_group_on_one_worker(tmp_path):
    """`make test` keeps each long end-to-end build on one worker with pytest-xdist's ``--dist loadgroup``;
    pytest 9.2 silently broke it (pytest-dev/pytest-xdist#1386), and two workers then build the same world."""
    import subprocess
    (tmp_path / "test_grouped.py").write_text(
        "import os, pytest\n"
        "pytestmark = pytest.mark.xdist_group('g')\n"
        + "".join(f"def test_{i}():\n    open('{tmp_path}/{i}', 'w').write(os.environ['PYTEST_XDIST_WORKER'])\n"
                  for i in range(4)))
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup", "-p",
                          "no:cacheprovider", "-o", "addopts=", str(tmp_path / "test_grouped.py")],
                         cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert len({(tmp_path / str(i)).read_text() for i in range(4)}) == 1
