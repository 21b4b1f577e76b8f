"""Which code produced an artifact: a hash of the source of a stage and of everything it imports.

Shard fingerprints cover inputs, parameters and model; adding ``code_version("stages.encode")`` to a
stage's base fingerprint makes a code change (a fix in ``pipeline/extract/encode.py``) redo the
shards it affects instead of keeping the old bytes.

The closure is found by parsing the source (``ast``), never by importing it: every ``import`` and
``from ... import`` statement anywhere in a module (top level, inside functions, under ``if`` or
``try``), relative imports included, restricted to modules whose file lives in this repository's
``pipeline`` and ``stages`` packages. Third-party code is excluded (its version is the environment's
business). Dynamic imports (``importlib.import_module(f"...{name}")``) cannot be seen: name such
modules explicitly (e.g. ``code_version("stages.train", "pipeline.methods.syntic")``).
"""
from __future__ import annotations

import ast
import hashlib
from functools import lru_cache
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("pipeline", "stages")
# Modules that decide where, when and with which parameter values work runs, never what it computes:
# the typed configuration (the values it yields are hashed as parameters), artifact paths, the
# executors, writer locks and this module. They are neither hashed nor followed, so e.g. adding a
# configuration section for one method does not redo every shard of every stage.
NOT_RESULT_CODE = ("pipeline.config", "pipeline.paths", "pipeline.data.executors", "pipeline.data.locks",
                   "pipeline.data.provenance")


def code_version(*module_names: str, root: Path | str | None = None) -> str:
    """A stable sha256 of the source files of ``module_names`` and their in-repo import closure.

    Hash = sha256 over the sorted (repo-relative path, file bytes) pairs of the closure, so it
    changes with any byte of any module the given ones can run, and with nothing else.
    """
    return _code_version(tuple(module_names), _root(root))


def code_files(*module_names: str, root: Path | str | None = None) -> list[str]:
    """The repo-relative (POSIX) paths of the source files in the closure of ``module_names``, sorted."""
    return list(_closure(tuple(module_names), _root(root)))


def _root(root: Path | str | None) -> str:
    return str(Path(root).resolve()) if root is not None else str(REPO_ROOT)


@lru_cache(maxsize=None)
def _code_version(module_names: tuple[str, ...], root: str) -> str:
    digest = hashlib.sha256()
    base = Path(root)
    for rel in _closure(module_names, root):
        data = (base / rel).read_bytes()
        name = rel.encode()
        digest.update(len(name).to_bytes(8, "big") + name + len(data).to_bytes(8, "big") + data)
    return digest.hexdigest()


@lru_cache(maxsize=None)
def _closure(module_names: tuple[str, ...], root: str) -> tuple[str, ...]:
    if not module_names:
        raise ValueError("code_version/code_files need at least one module name")
    base = Path(root)
    seen: dict[str, Path] = {}  # module name -> its file
    todo: list[str] = []

    def add(name: str) -> bool:
        """Queue module ``name`` (and its parent packages) if it is in the repository."""
        if name in NOT_RESULT_CODE:
            return True
        path = _module_file(base, name)
        if path is None:
            return False
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ too
            prefix = ".".join(parts[:i])
            if prefix not in seen and prefix not in NOT_RESULT_CODE:
                found = _module_file(base, prefix)
                if found is not None:
                    seen[prefix] = found
                    todo.append(prefix)
        return True

    for name in module_names:
        if not add(name):
            raise ValueError(f"module {name!r} is not a source file of {' or '.join(PACKAGES)} under {base}")
    while todo:
        name = todo.pop()
        path = seen[name]
        for imported in _imports(path, name, is_package=path.name == "__init__.py"):
            add(imported)
    return tuple(sorted(p.relative_to(base).as_posix() for p in seen.values()))


def _module_file(base: Path, name: str) -> Path | None:
    """The source file of dotted module ``name`` under ``base`` (in PACKAGES), or None."""
    parts = name.split(".")
    if not parts or parts[0] not in PACKAGES or not all(p.isidentifier() for p in parts):
        return None
    stem = base.joinpath(*parts)
    if (stem / "__init__.py").is_file():
        return stem / "__init__.py"
    if stem.with_suffix(".py").is_file():
        return stem.with_suffix(".py")
    return None


def _imports(path: Path, module: str, is_package: bool) -> list[str]:
    """Dotted names that the source of ``module`` may import (candidates; filtered by the caller)."""
    tree = ast.parse(path.read_bytes(), filename=str(path))
    package = module if is_package else module.rpartition(".")[0]
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".") if package else []
                if node.level - 1 > len(anchor):
                    continue  # beyond the top-level package: Python would refuse it too
                anchor = anchor[:len(anchor) - (node.level - 1)]
                target = ".".join(anchor + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target:
                continue
            names.append(target)
            names.extend(f"{target}.{alias.name}" for alias in node.names if alias.name != "*")  # submodules
    return names
