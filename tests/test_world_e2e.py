"""A small world end to end through `dvc repro`, in a scratch copy of the repo: the world's stages make the
corpus, the eval set and the models (CLIP, detector, text-to-image), every later stage loads them by their
local paths, and SynTIC learns to look at the image: its object F1 must clearly beat its own shuffled-image
control (the same captions scored against other images). A bug that fed the wrong feature at inference, a
projection that does nothing or a decoder that ignores its prefix fails here."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import config
from pipeline.profiles import merge, render, resolve_profile

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.e2e, pytest.mark.xdist_group("world")]    # one worker builds the world (tests/conftest.py)


def small_world(p: dict) -> dict:
    """The world profile cut to SynTIC alone and a world that trains in about two minutes."""
    p = merge(p, {
        "worlds": {"shapes": {"corpus": {"scenes": 300, "captions_per_scene": 2}, "eval": {"images": 40},
                              "clip": {"pairs": 6000, "epochs": 6, "heldout": 200,
                                       "threads": 1},     # make test's other worker has the other core
                              "detector": {"images": 1500, "epochs": 4, "heldout": 100}}},
        "methods": {"_replace": True, "syntic": p["methods"]["syntic"]},
        "external_results": {"_replace": True},
        "modality_gap": {"models": []},
        "evaluate": {"meteor": False},
    })
    p["methods"]["syntic"]["train"]["epochs"] = 30
    return p


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    for item in ("dvc.yaml", ".dvcignore", "pipeline", "stages", "profiles"):
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / item, **(
            {"ignore": shutil.ignore_patterns("__pycache__")} if src.is_dir() else {}))
    params = config.as_dict(config.from_dict(small_world(resolve_profile("world"))))
    (root / "params.yaml").write_text(render(params, "world"))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, check=True, env=env)
    shutil.copy(REPO / ".dvcignore", root / ".dvcignore")
    out = subprocess.run([sys.executable, "-m", "dvc", "repro", "evaluate@syntic-shapes"], cwd=root, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, f"dvc repro failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return root


def test_syntic_learns_from_the_image_in_a_small_world(world):
    metrics = json.loads((world / "artifacts/methods/syntic/metrics/shapes.json").read_text())
    own, shuffled = metrics["object_f1"], metrics["shuffled_control"]["object_f1"]
    assert own >= 2 * shuffled and own - shuffled >= 0.05, metrics      # the bar: twice the control


def test_the_world_models_are_loaded_from_their_local_paths(world):
    art = world / "artifacts"
    for folder, model in (("features/eval/shapes", "artifacts/world/shapes/clip/model.safetensors"),
                          ("synthetic", "artifacts/world/shapes/text_to_image"),
                          ("tags/eval/shapes", "artifacts/world/shapes/detector")):
        manifest = json.loads((art / folder / "_manifest.json").read_text())
        assert manifest["meta"]["model"]["pretrained"] == model, folder
    audit = json.loads((art / "synthetic/report.json").read_text())
    assert 0 < audit["exact_matches"] < audit["pairs"] and set(audit["mistakes_made"]) <= {"binding", "drop", "count", "extra"}
