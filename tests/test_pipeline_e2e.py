"""The whole pipeline through `dvc repro` on a slice of real Flickr8k data, in a scratch copy of the repo."""
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.params import merge, render, resolve_profile

REPO = Path(__file__).resolve().parents[1]
METHODS = ["syntic", "pcmnet", "unsupervised-clipcap", "capdec", "decap"]


def small(p: dict, shared: Path) -> dict:
    """The flickr8k profile, pointed at ``shared`` and cut down to run in about a minute."""
    return merge(p, {
        "rows_per_shard": 8,
        "corpus": {"path": str(shared / "flickr8k/Flickr8k.token.txt"),
                   "split_file": str(shared / "flickr8k/Flickr_8k.trainImages.txt"), "max_captions": 48},
        "evalsets": {"flickr8k-test": {"images": str(shared / "flickr8k/images"),
                                       "references": str(shared / "flickr8k/Flickr8k.token.txt"),
                                       "exclude_split_file": str(shared / "flickr8k/Flickr_8k.trainImages.txt"),
                                       "max_images": 6}},
        "generate": {"steps": 2, "batch_size": 4},
        "optimize": {"steps": 3},
        "concepts": {"size": 40},
        "methods": {"syntic": {"epochs": 1, "beam_size": 2, "decoder": {"width": 32, "layers": 2, "heads": 2}},
                    "pcmnet": {"epochs": 1, "beam_size": 2, "hidden": 32, "heads": 2, "ffn_dim": 64},
                    **{m: {"epochs": 1, "beam_size": 2} for m in ("unsupervised-clipcap", "capdec", "decap")}},
        "mixup": {"evalset": "flickr8k-test", "lambdas": [0.0, 1.0]},
        "evaluate": {"gallery_size": 3},
    })


def digests(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("part-*.parquet"))}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("repo")
    for item in ("dvc.yaml", "pipeline", "stages", "profiles", "data"):
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / item)
    (root / "params.yaml").write_text(render(small(resolve_profile("flickr8k"), shared_data), "flickr8k"))
    subprocess.run(dvc_cmd("init", "--no-scm", "-q"), cwd=root, check=True, env=env())
    return root


def env() -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def dvc_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def repro(root: Path, *args) -> list[str]:
    out = subprocess.run(dvc_cmd("repro", *args), cwd=root, capture_output=True, text=True, env=env())
    assert out.returncode == 0, f"dvc repro failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return re.findall(r"Running stage '([^']+)'", out.stdout)


def test_killed_generate_stage_resumes_and_matches_an_uninterrupted_run(workdir):
    assert repro(workdir, "corpus") == ["corpus"]
    shards = workdir / "artifacts" / "synthetic"
    proc = subprocess.Popen(dvc_cmd("repro", "generate"), cwd=workdir, env=env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not list(shards.glob("part-*.parquet")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (shards / "_manifest.json").exists(), "the kill must land before the stage finishes"
    survivors = digests(shards)
    assert 1 <= len(survivors) < 6

    assert "generate" in repro(workdir, "generate")
    resumed = digests(shards)
    assert len(resumed) == 6 and all(resumed[name] == d for name, d in survivors.items())

    for shard in shards.glob("part-*.parquet"):
        shard.unlink()
    subprocess.run([sys.executable, "-m", "stages.generate"], cwd=workdir, env=env(), check=True,
                   capture_output=True)
    assert digests(shards) == resumed


def test_full_pipeline_produces_every_artifact_and_finite_metrics(workdir):
    repro(workdir)
    art = workdir / "artifacts"
    for folder in ["corpus", "evalsets/flickr8k-test", "synthetic", "features/text", "features/synthetic",
                   "features/eval/flickr8k-test", "tags/synthetic", "tags/eval/flickr8k-test", "optimized"]:
        manifest = json.loads((art / folder / "_manifest.json").read_text())
        assert manifest["num_rows"] > 0 and manifest["shards"], folder
    assert json.loads((art / "corpus/_manifest.json").read_text())["num_rows"] == 48
    assert json.loads((art / "evalsets/flickr8k-test/_manifest.json").read_text())["num_rows"] == 6
    support = json.loads((art / "support/report.json").read_text())
    assert support["support_size"] == 48
    assert all(0.9 < v["mean_cosine"] <= 1.0 + 1e-6 for v in support["top_k_vs_exact_cosine"].values())
    assert (art / "concepts/concepts.parquet").stat().st_size > 0
    for method in METHODS:
        assert (art / f"methods/{method}/model/model.safetensors").stat().st_size > 0, method
        captions = json.loads((art / f"methods/{method}/captions/flickr8k-test.json").read_text())
        assert len(captions) == 6 and all(isinstance(c, str) for c in captions.values()), method
        metrics = json.loads((art / f"methods/{method}/metrics.json").read_text())["flickr8k-test"]
        for name in ["BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "CLIPScore", "RefCLIPScore"]:
            assert isinstance(metrics[name], float) and math.isfinite(metrics[name]), (method, name)
        evaluation = json.loads((art / f"methods/{method}/evaluation.json").read_text())["flickr8k-test"]
        assert "SPICE" in metrics or "SPICE" in evaluation["skipped"]
    mixup = json.loads((art / "methods/unsupervised-clipcap/mixup.json").read_text())
    assert (art / "methods/unsupervised-clipcap/mixup.png").stat().st_size > 0
    assert "CIDEr" in json.dumps(mixup) and "1.0" in json.dumps(mixup)
    html = (art / "report/index.html").read_text()
    assert all(method in html for method in METHODS) and html.count("data:image/jpeg;base64,") == 3

    assert repro(workdir) == [], "an unchanged pipeline must not rerun anything"


@pytest.mark.parametrize("method, key", [("syntic", "lr"), ("pcmnet", "lr_factor")])
def test_changing_one_method_parameter_reruns_only_that_methods_stages(workdir, method, key):
    params_path = workdir / "params.yaml"
    p = yaml.safe_load(params_path.read_text())
    p["methods"][method][key] *= 2
    params_path.write_text(yaml.safe_dump(p, sort_keys=False))
    ran = repro(workdir)
    assert {f"train@{method}", f"caption@{method}", "report"} <= set(ran)
    assert set(ran) <= {f"train@{method}", f"caption@{method}", f"evaluate@{method}", "report"}
