"""GPU paths that this CPU-only machine cannot run, tested through the same functions: where the support
set's FAISS index and Eq. 3 go for `device: cuda`, and what a GPU install brings."""
import faiss
import numpy as np
import pytest

from pipeline import support
from pipeline.support import SupportSet, index_to_device


@pytest.fixture
def flat_index():
    feats = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)
    return SupportSet.build(feats, "Flat", tau=0.1, top_k=5).index


def test_the_index_moves_to_the_named_gpu_only_with_a_gpu_faiss(monkeypatch, flat_index):
    moved = []
    monkeypatch.setattr(faiss, "StandardGpuResources", lambda: "resources", raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", lambda res, gpu, index: moved.append((res, gpu, index)) or "gpu",
                        raising=False)
    monkeypatch.setattr(support, "gpu_count", lambda: 2)
    assert index_to_device(flat_index, "cuda:1") == "gpu" and moved == [("resources", 1, flat_index)]
    assert index_to_device(flat_index, "cuda") == "gpu" and moved[-1][1] == 0
    assert index_to_device(flat_index, "cpu") is flat_index and len(moved) == 2
    monkeypatch.setattr(support, "gpu_count", lambda: 0)             # faiss-cpu: the index stays on the CPU
    assert index_to_device(flat_index, "cuda:0") is flat_index and len(moved) == 2


def test_a_cpu_device_keeps_the_same_support_set():
    feats = np.random.default_rng(1).standard_normal((30, 8)).astype(np.float32)
    s = SupportSet.build(feats, "Flat", tau=0.1, top_k=5)
    assert s.to_device("cpu") is s


def test_the_gpu_extra_brings_faiss_gpu():
    import tomllib
    from pathlib import Path
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert any(dep.startswith("faiss-gpu") for dep in project["project"]["optional-dependencies"]["gpu"])
    lock = (Path(__file__).resolve().parents[1] / "requirements" / "gpu.txt").read_text()
    assert "faiss-gpu-cu12==" in lock and "faiss-cpu==" not in lock
