"""Profiles: params.yaml is the offline profile; the paper profile carries METHODS.md's numbers and plans every stage."""
import re
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import yaml

from pipeline.params import PARAMS, load_params, merge, render, resolve_profile

REPO = Path(__file__).resolve().parents[1]
METHODS_MD = REPO.parent / "shared" / "docs" / "METHODS.md"


def test_params_yaml_is_the_rendered_offline_profile():
    assert PARAMS.read_text() == render(resolve_profile("offline"), "offline")


def test_overlay_merges_mappings_and_replaces_the_rest():
    base = {"a": {"x": 1, "y": [1, 2]}, "b": 2}
    assert merge(base, {"a": {"y": [3]}, "c": None}) == {"a": {"x": 1, "y": [3]}, "b": 2, "c": None}


def test_unknown_profile_names_the_known_ones():
    with pytest.raises(FileNotFoundError, match="known: .*offline.*paper-syntic-coco"):
        resolve_profile("no-such-profile")


@pytest.fixture(scope="module")
def methods_md() -> str:
    if not METHODS_MD.is_file():
        pytest.skip(f"{METHODS_MD} not found")
    text = METHODS_MD.read_text(encoding="utf-8")
    return text[text.index("## 1. SynTIC"):text.index("## 2. PCM-Net")]


def test_paper_profile_has_the_syntic_hyper_parameters_of_methods_md(methods_md):
    p = resolve_profile("paper-syntic-coco")
    steps, size = re.search(r"(\d+) sampling steps, (\d+)×(\d+)", methods_md).group(1, 2)
    assert p["generate"]["steps"] == int(steps) and p["generate"]["resolution"] == int(size)
    tau2, lr = re.search(r"τ = 1/(\d+), Adam lr (\S+)\.", methods_md).group(1, 2)
    assert p["optimize"]["tau"] == float(Fraction(1, int(tau2))) and p["optimize"]["lr"] == float(lr)
    coco_tau = re.search(r"τ = 1/(\d+) \(COCO", methods_md).group(1)
    assert p["support"]["tau"] == float(Fraction(1, int(coco_tau)))
    layers, heads = re.search(r"(\d+) layers, (\d+) heads", methods_md).group(1, 2)
    decoder = p["methods"]["syntic"]["decoder"]
    assert (decoder["layers"], decoder["heads"]) == (int(layers), int(heads))
    assert "Stable Diffusion v1-5" in methods_md and p["models"]["diffusion"]["pretrained"].endswith("stable-diffusion-v1-5")
    assert p["models"]["clip"] == {**p["models"]["clip"], "name": "ViT-B-32", "pretrained": "openai"}
    assert p["models"]["detector"]["pretrained"] == "facebook/detr-resnet-50"
    assert p["methods"]["syntic"]["fo"] and p["methods"]["syntic"]["fp"] and p["methods"]["syntic"]["af"]
    assert p["corpus"]["max_words"] == 15


def test_switching_profiles_rewrites_params_yaml(tmp_path):
    from pipeline.params import use_profile
    target = tmp_path / "params.yaml"
    use_profile("paper-syntic-coco", target)
    assert load_params(target)["models"]["clip"]["name"] == "ViT-B-32"
    use_profile("offline", target)
    assert target.read_text() == PARAMS.read_text()


def test_paper_profile_dry_run_plans_every_stage(tmp_path):
    for item in ("dvc.yaml", "pipeline", "stages", "profiles", "data"):
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / item)
    (tmp_path / "params.yaml").write_text(render(resolve_profile("paper-syntic-coco"), "paper-syntic-coco"))
    # the user's inputs the paper profile names (an empty Karpathy file stands in for dataset_coco.json)
    (tmp_path / "data" / "coco" / "val2014").mkdir(parents=True)
    (tmp_path / "data" / "coco" / "dataset_coco.json").write_text('{"images": []}')
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run(dvc + ["init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    out = subprocess.run(dvc + ["repro", "--dry", "--force"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    planned = re.findall(r"Running stage '([^']+)'", out.stdout)
    assert planned == ["corpus", "evalsets", "generate", "encode", "tag", "optimize", "support",
                       "train@syntic", "caption@syntic", "evaluate@syntic", "report"]
