"""The software a result was computed with: versions of Python and of the libraries that shape it.

``library_versions()`` reads installed distributions' metadata (``importlib.metadata``) and, for the
CUDA fields, imports torch (which the stages have imported anyway); it loads no model and touches no
GPU memory. A package that is not installed is ``None``, never an exception, so the record can be
taken anywhere. The values are what pip installed, i.e. what the lock in ``requirements/`` pins.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import platform

# Distribution names (as on PyPI) reported under their own name.
PACKAGES = ("torch", "torchvision", "open_clip_torch", "diffusers", "transformers", "pycocoevalcap",
            "pyarrow", "numpy", "pillow", "dvc")

# FAISS comes as one of several distributions that all install the module `faiss` (pyproject.toml's
# `cpu` and `gpu` extras pick one). The known ones are looked up by name; any other build is found
# through the module it provides.
FAISS_DISTRIBUTIONS = ("faiss-cpu", "faiss-gpu-cu12", "faiss-gpu-cu11", "faiss-gpu", "faiss-gpu-cuvs",
                       "faiss-gpu-cu12-cuvs", "faiss-gpu-cu13-cuvs", "faiss-cuda", "faiss")


def distribution_version(name: str) -> str | None:
    """The installed version of distribution ``name``, or None if it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def faiss_distribution() -> str | None:
    """Which installed distribution provides the `faiss` module (e.g. faiss-cpu), or None."""
    for name in FAISS_DISTRIBUTIONS:
        if distribution_version(name) is not None:
            return name
    if importlib.util.find_spec("faiss") is None:
        return None
    providers = importlib.metadata.packages_distributions().get("faiss", [])
    return providers[0] if providers else None


def _torch_cuda() -> tuple[str | None, bool | None]:
    """(CUDA version torch was built with, whether CUDA is usable now); (None, None) without torch."""
    try:
        import torch
    except ImportError:
        return None, None
    return torch.version.cuda, bool(torch.cuda.is_available())


def library_versions() -> dict:
    """Flat, JSON-ready record: ``python``; each of PACKAGES by distribution name; ``torch_cuda``
    (the CUDA version of the torch build, None for a CPU-only build) and ``cuda_available``;
    ``faiss`` (version) and ``faiss_distribution`` (faiss-cpu, faiss-gpu-cu12, ...)."""
    versions: dict = {"python": platform.python_version()}
    for name in PACKAGES:
        versions[name] = distribution_version(name)
    versions["torch_cuda"], versions["cuda_available"] = (
        _torch_cuda() if versions["torch"] is not None else (None, None))
    faiss = faiss_distribution()
    versions["faiss"] = distribution_version(faiss) if faiss else None
    versions["faiss_distribution"] = faiss
    return versions
