"""code_version: a hash of a stage's source and of every in-repo module it imports, found without importing."""
import textwrap
from pathlib import Path

import pytest

from pipeline.data import provenance
from pipeline.data.provenance import code_files, code_version

FAKE_TREE = {
    "stages/__init__.py": "",
    "stages/encode.py": """
        import sys
        import numpy as np
        from pipeline import paths
        from pipeline.data.shards import write_sharded
        import pipeline.extract.encode

        def main():
            from pipeline.models import clip   # function-level: a submodule named in `from ... import`
            return clip
    """,
    "pipeline/__init__.py": "",
    "pipeline/paths.py": "ROOT = 'x'\n",
    "pipeline/data/__init__.py": "",
    "pipeline/data/shards.py": "from .locks import exclusive_writer\nfrom . import executors\n",
    "pipeline/data/locks.py": "import fcntl\n",
    "pipeline/data/executors.py": "try:\n    import ray\nexcept ImportError:\n    ray = None\n",
    "pipeline/extract/__init__.py": "",
    "pipeline/extract/encode.py": "from ..models.clip import load_clip\n",
    "pipeline/models/__init__.py": "",
    "pipeline/models/clip.py": "def load_clip():\n    return None\n",
    "pipeline/models/diffusion.py": "import torch\n",  # imported by no module of the closure
    "pipeline/unused.py": "X = 1\n",
}


@pytest.fixture
def tree(tmp_path):
    for rel, text in FAKE_TREE.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return tmp_path


def new_process() -> None:
    """Results are cached per process; forget them, as a new stage process would not have them."""
    provenance._code_version.cache_clear()
    provenance._closure.cache_clear()


def append_comment(path: Path) -> None:
    path.write_text(path.read_text() + "\n# a comment\n")


def test_closure_follows_every_import_form_and_stays_in_the_repo(tree):
    assert code_files("stages.encode", root=tree) == [
        "pipeline/__init__.py", "pipeline/data/__init__.py",
        "pipeline/data/shards.py", "pipeline/extract/__init__.py", "pipeline/extract/encode.py",
        "pipeline/models/__init__.py", "pipeline/models/clip.py",
        "stages/__init__.py", "stages/encode.py"]


def test_modules_that_only_schedule_work_are_not_result_code(tree):
    """Paths, executors, locks (and the configuration, provenance itself) decide where and when work
    runs, not what it computes: a change there must not redo every shard."""
    before = code_version("stages.encode", root=tree)
    for changed in ("pipeline/paths.py", "pipeline/data/locks.py", "pipeline/data/executors.py"):
        append_comment(tree / changed)
    new_process()
    assert code_version("stages.encode", root=tree) == before


@pytest.mark.parametrize("changed", ["pipeline/extract/encode.py", "pipeline/models/clip.py",
                                     "pipeline/data/shards.py", "stages/encode.py", "pipeline/__init__.py"])
def test_a_comment_in_the_closure_changes_the_version(tree, changed):
    before = code_version("stages.encode", root=tree)
    assert code_version("stages.encode", root=tree) == before  # stable (and cached)
    append_comment(tree / changed)
    new_process()
    assert code_version("stages.encode", root=tree) != before


@pytest.mark.parametrize("changed", ["pipeline/models/diffusion.py", "pipeline/unused.py"])
def test_a_comment_outside_the_closure_does_not(tree, changed):
    before = code_version("stages.encode", root=tree)
    append_comment(tree / changed)
    new_process()
    assert code_version("stages.encode", root=tree) == before


def test_unknown_or_third_party_module_is_refused(tree):
    with pytest.raises(ValueError, match="not a source file"):
        code_version("stages.nope", root=tree)
    with pytest.raises(ValueError, match="not a source file"):
        code_version("numpy", root=tree)


def test_the_real_encode_stage_covers_its_extraction_code():
    files = code_files("stages.encode")
    assert {"stages/encode.py", "pipeline/extract/encode.py", "pipeline/data/shards.py"} <= set(files)
    assert all(f.startswith(("pipeline/", "stages/")) for f in files)
    assert len(code_version("stages.encode")) == 64
