"""Shared fixtures.

Tests that read the real data in ``../shared/data`` use the ``shared_data`` fixture: on a user's
machine without that folder they skip with a reason; under CI (``CI`` set) a missing folder is a
failure, never a silent skip.
"""
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SYNTHCAP_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the real-data tests but {SHARED_DATA} does not exist")
        pytest.skip(f"real data not found at {SHARED_DATA} (set SYNTHCAP_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one intra-op thread: on a shared 2-core machine that is several times faster for
    the tiny models of the tests (no oversubscription). Use with pytestmark = usefixtures("one_thread")."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def artifacts_root(tmp_path, monkeypatch) -> Path:
    """Point every artifact path (pipeline/paths.py) at a fresh folder: stages and the runner then
    read and write there."""
    from pipeline import paths
    root = tmp_path / "artifacts"
    for key, value in paths.layout(root).items():
        monkeypatch.setattr(paths, key, value)
    return root
