"""Shared fixtures.

Tests that read the real data in ``../shared/data`` use the ``shared_data`` fixture: on a user's
machine without that folder they skip with a reason; under CI (``CI`` set) a missing folder is a
failure, never a silent skip.
"""
import json
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SYNTHCAP_SHARED_DATA", REPO.parent / "shared" / "data"))
METHODS_MD = REPO.parent / "shared" / "docs" / "METHODS.md"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest-xdist workers on two cores: each worker, and every stage process it starts
    # (they inherit the variable), uses one torch thread, so that the two never wait on each other's threads.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


def methods_md_section(title: str | None = None, next_title: str | None = None) -> str:
    """../shared/docs/METHODS.md (the methods' values, checked against the papers), from the heading
    ``title`` up to ``next_title`` (None: from the start / to the end). Skips where the file is absent;
    under CI that is a failure."""
    if not METHODS_MD.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"CI must check the profiles and the papers' table against {METHODS_MD}, which does not exist")
        pytest.skip(f"{METHODS_MD} not found")
    text = METHODS_MD.read_text(encoding="utf-8")
    return text[text.index(title) if title else 0:text.index(next_title) if next_title else len(text)]


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


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# Caption and reference files of each format, hand-sized (the corpus and the eval-set readers both read them)
@pytest.fixture
def karpathy_dataset_file(tmp_path):
    return write_json(tmp_path / "dataset_tiny.json", {"dataset": "tiny", "images": [
        {"filename": "a.jpg", "filepath": "val2014", "split": "train", "imgid": 0,
         "sentences": [{"raw": "A cat.", "tokens": ["a", "cat"]}, {"raw": "A cat sleeps."}]},
        {"filename": "b.jpg", "split": "restval", "sentences": [{"raw": "A dog."}]},
        {"filename": "c.jpg", "split": "test", "sentences": [{"raw": "A bird."}, {"raw": "Birds."}]},
    ]})


@pytest.fixture
def coco_file(tmp_path):
    return write_json(tmp_path / "captions_val.json", {
        "images": [{"id": 42, "file_name": "COCO_val_42.jpg"}, {"id": 7, "file_name": "COCO_val_7.jpg"}],
        "annotations": [
            {"image_id": 42, "id": 1, "caption": "A red bus."},
            {"image_id": 7, "id": 2, "caption": "A plate of food."},
            {"image_id": 42, "id": 3, "caption": "A bus on a street."},
        ],
    })


def pytest_collection_modifyitems(config, items):
    """The order that keeps `make test`'s two workers (pytest-xdist, ``--dist loadgroup``) busy: first the long
    builds, each group (``xdist_group``) one worker's (the end-to-end pipeline's ``finished`` checkout with the
    tests that read it in place, the small world), then every other test, and last the end-to-end tests that
    copy the finished checkout, by when it exists. Without xdist the order changes nothing: every test passes
    alone and in any order."""
    def rank(item) -> int:
        if item.get_closest_marker("xdist_group"):
            return 0
        return 2 if "workdir" in item.fixturenames else 1
    items.sort(key=rank)          # stable: collection order within a rank
