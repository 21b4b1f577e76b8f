"""The whole pipeline through `dvc repro` on a slice of real Flickr8k data, in a scratch copy of the repo:
resume after SIGKILL, an unchanged rerun does nothing, and every change reruns exactly what depends on
it (a decoding setting, a training setting, a line of code, damaged bytes, an eval set edited or added).

Every test passes alone and in any order: the pipeline runs to the end once per module (``finished``),
tests that only read use that checkout, and each test that changes anything (params, code, bytes, a DVC
remote, git) works on its own copy of it (``workdir``: artifacts, dvc.lock and DVC cache included), so
no test sees another's changes and none retrains what the finished run already holds."""
import contextlib
import fcntl
import hashlib
import importlib.metadata
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

from pipeline import config
from pipeline.profiles import merge, render, resolve_profile

REPO = Path(__file__).resolve().parents[1]
METHODS = ["syntic", "syntic-baseline", "pcmnet", "unsupervised-clipcap", "capdec", "decap", "maccap", "cmsa"]
EVALSET = "flickr8k-test"

pytestmark = pytest.mark.e2e     # `make test` runs these; `make test-fast` does not (pyproject.toml, markers)


def small(p: dict, text: Path, references: Path, images: Path) -> dict:
    """The flickr8k profile on copies of its text files, cut down to run in about a minute."""
    return merge(p, {
        "rows_per_shard": 8,
        "corpus": {"path": str(text), "max_captions": 48},
        "evalsets": {EVALSET: {"images": str(images), "references": str(references), "max_images": 6}},
        "generate": {"steps": 2, "batch_size": 4},
        "optimize": {"epochs": 3},
        "concepts": {"size": 40},
        "methods": {**{m: {"train": {"epochs": 1, "decoder": {"width": 32, "layers": 2, "heads": 2}},
                           "caption": {"beam_size": 2}} for m in ("syntic", "syntic-baseline")},
                    "maccap": {"train": {"epochs": 1}, "caption": {"beam_size": 2, "samples": 2}},
                    "cmsa": {"train": {"mle_epochs": 1, "discriminator_epochs": 1, "rl_epochs": 1,
                                       "decoder": {"width": 32, "layers": 2, "heads": 2}},
                             "caption": {"beam_size": 2}},
                    "pcmnet": {"train": {"epochs": 1, "hidden": 32, "heads": 2, "ffn_dim": 64},
                               "caption": {"beam_size": 2}},
                    **{m: {"train": {"epochs": 1}, "caption": {"beam_size": 2}}
                       for m in ("unsupervised-clipcap", "capdec", "decap")}},
        "modality_gap": {"evalset": EVALSET, "lambdas": [0.0, 1.0]},
        "report": {"gallery_size": 3},
        "evaluate": {"meteor": False},    # METEOR's Java process costs seconds per evaluation; test_metrics scores it
    })


def write_params(root: Path, params: dict) -> None:
    (root / "params.yaml").write_text(render(config.as_dict(config.from_dict(params)), "flickr8k"))


def read_params(root: Path) -> dict:
    return config.read_yaml(root / "params.yaml")


def digests(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("part-*.parquet"))}


def new_checkout(root: Path, shared_data: Path) -> Path:
    """A scratch repository at ``root``: the code, dvc.yaml and the small params.yaml, `dvc init`, nothing run."""
    root.mkdir(parents=True)
    for item in ("dvc.yaml", ".dvcignore", ".gitignore", "pipeline", "stages", "profiles", "data", "docs"):
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / item)
    # the corpus and the eval references each read their own copy of the Flickr8k text folder, so a test
    # may edit a reference; the photos are read in place
    for folder in ("corpus-text", "eval-text"):
        (root / "inputs" / folder).mkdir(parents=True)
        for name in ("Flickr8k.token.txt", "Flickr_8k.trainImages.txt"):
            shutil.copy(shared_data / "flickr8k" / name, root / "inputs" / folder / name)
    # relative paths, as a user's params.yaml has them: another checkout of the same commit (the share
    # test's) finds its own copies, and its dvc.lock entries match
    write_params(root, small(resolve_profile("flickr8k"), Path("inputs/corpus-text"), Path("inputs/eval-text"),
                             shared_data / "flickr8k/images"))
    subprocess.run(dvc_cmd("init", "--no-scm", "-q"), cwd=root, check=True, env=env())
    shutil.copy(REPO / ".dvcignore", root / ".dvcignore")      # dvc init wrote its own
    return root


def copy_checkout(src: Path, dst: Path) -> Path:
    """``src`` as it is (code, params, dvc.lock, artifacts with their fingerprints, DVC cache and run cache)
    at ``dst``. The DVC cache's files are hard links: DVC never writes one in place (objects are named by
    their content, run-cache entries are replaced by a rename), so what a test adds to its cache stays
    its own. ``.dvc/tmp`` (DVC's locks and file-state database) is left out: DVC rebuilds it."""
    cache = src / ".dvc" / "cache"

    def skip(folder: str, names: list[str]) -> set[str]:
        return {"cache", "tmp"} & set(names) if Path(folder) == src / ".dvc" else set()

    shutil.copytree(src, dst, symlinks=True, ignore=skip)
    if cache.is_dir():
        shutil.copytree(cache, dst / ".dvc" / "cache", symlinks=True, copy_function=os.link)
    return dst


@pytest.fixture
def fresh(tmp_path, shared_data) -> Path:
    """A scratch repository of this test's own where nothing has run yet."""
    return new_checkout(tmp_path / "repo", shared_data)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, shared_data, worker_id) -> Path:
    """The scratch repository after a complete `dvc repro`, built once per run. Tests only read it: a test
    that changes anything takes ``workdir``. Under pytest-xdist (`make test`) the workers share one build
    (their basetemps share a parent): the first to need it builds it under a file lock, the others wait for
    it (tests/conftest.py orders the suite so that the wait is short); a failed build is reported to each,
    not retried."""
    base = (tmp_path_factory.mktemp("finished") if worker_id == "master"
            else tmp_path_factory.getbasetemp().parent / "finished")
    base.mkdir(exist_ok=True)
    with open(base / "build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (base / "failed.txt").exists():
            pytest.fail(f"the shared finished checkout failed to build:\n{(base / 'failed.txt').read_text()}")
        if not (base / "done").exists():
            try:
                repro(new_checkout(base / "repo", shared_data))
            except BaseException as error:
                (base / "failed.txt").write_text(str(error))
                raise
            (base / "done").touch()
    return base / "repo"


@contextlib.contextmanager
def using(finished: Path, exclusive: bool):
    """A lock on the finished checkout across pytest-xdist workers: copies of it share the lock, a test that
    runs DVC in it (DVC writes its state and may rewrite dvc.lock) holds it alone."""
    with open(finished.parent / "use.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield


@pytest.fixture
def workdir(finished, tmp_path) -> Path:
    """This test's own copy of the finished repository, to change as it likes."""
    with using(finished, exclusive=False):
        return copy_checkout(finished, tmp_path / "repo")


def env() -> dict:
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def dvc_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def repro(root: Path, *args) -> tuple[list[str], str]:
    out = subprocess.run(dvc_cmd("repro", *args), cwd=root, capture_output=True, text=True, env=env())
    assert out.returncode == 0, f"dvc repro failed:\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    return re.findall(r"Running stage '([^']+)'", out.stdout), out.stdout


def status(root: Path) -> set[str]:
    out = subprocess.run(dvc_cmd("status", "--json"), cwd=root, capture_output=True, text=True, env=env(), check=True)
    return set(json.loads(out.stdout))


def method_stages(method: str) -> set[str]:
    return {f"evaluate@{method}-{EVALSET}"}


def test_killed_generate_stage_resumes_and_matches_an_uninterrupted_run(fresh):
    workdir = fresh
    assert repro(workdir, "corpus")[0] == ["corpus"]
    shards = workdir / "artifacts" / "synthetic"
    proc = subprocess.Popen(dvc_cmd("repro", "generate"), cwd=workdir, env=env(), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    journal = shards / "_journal.jsonl"

    def journaled() -> set[str]:  # a shard is kept only once its hash is journaled (just after its rename)
        lines = journal.read_text().splitlines() if journal.exists() else []
        return {json.loads(line)["file"] for line in lines if line.endswith("}")}

    deadline = time.time() + 180
    while not journaled() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (shards / "_manifest.json").exists(), "the kill must land before the stage finishes"
    survivors = {name: d for name, d in digests(shards).items() if name in journaled()}
    assert 1 <= len(survivors) < 6

    ran, out = repro(workdir, "generate")
    assert "generate" in ran and f"{len(survivors)} kept" in out
    resumed = digests(shards)
    assert len(resumed) == 6 and all(resumed[name] == d for name, d in survivors.items())

    for shard in shards.glob("part-*.parquet"):
        shard.unlink()
    subprocess.run([sys.executable, "-m", "stages.generate"], cwd=workdir, env=env(), check=True, capture_output=True)
    assert digests(shards) == resumed


@pytest.mark.xdist_group("finished")    # with the build, on one worker: tests/conftest.py
def test_full_pipeline_produces_every_artifact_and_finite_metrics(finished):
    workdir = finished                       # the `dvc repro` of the fixture; this test only reads
    art = workdir / "artifacts"
    for folder in ["corpus", f"evalsets/{EVALSET}", "synthetic", "features/text", "features/synthetic",
                   f"features/eval/{EVALSET}", "tags/synthetic", f"tags/eval/{EVALSET}", "optimized"]:
        manifest = json.loads((art / folder / "_manifest.json").read_text())
        assert manifest["num_rows"] > 0 and manifest["shards"], folder
    assert json.loads((art / "corpus/_manifest.json").read_text())["num_rows"] == 48
    assert json.loads((art / f"evalsets/{EVALSET}/_manifest.json").read_text())["num_rows"] == 6
    support = json.loads((art / "supports/corpus/report.json").read_text())
    assert support["support_size"] == 48
    assert all(0.9 < v["mean_cosine"] <= 1.0 + 1e-6 for v in support["top_k_vs_exact_cosine"].values())
    assert (art / "concepts/concepts.parquet").stat().st_size > 0
    for method in METHODS:
        assert (art / f"methods/{method}/model/model.safetensors").stat().st_size > 0, method
        captions = json.loads((art / f"methods/{method}/captions/{EVALSET}.json").read_text())
        assert len(captions) == 6 and all(isinstance(c, str) for c in captions.values()), method
        metrics = json.loads((art / f"methods/{method}/metrics/{EVALSET}.json").read_text())
        for name in ["BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr", "CLIPScore", "RefCLIPScore"]:
            assert isinstance(metrics[name], float) and math.isfinite(metrics[name]), (method, name)
        assert (metrics["images_evaluated"], metrics["images_skipped"]) == (6, 0)
        evaluation = json.loads((art / f"methods/{method}/evaluation/{EVALSET}.json").read_text())
        assert "METEOR" not in metrics and "evaluate.meteor" in evaluation["skipped_metrics"]["METEOR"]
        assert "SPICE" in metrics or "SPICE" in evaluation["skipped_metrics"]
        curve = json.loads((art / f"methods/{method}/train_curve.json").read_text())
        report = json.loads((art / f"methods/{method}/model/train_report.json").read_text())
        assert [row["step"] for row in curve] == list(range(1, report["steps"] + 1)), method
    with using(finished, exclusive=True):
        plots = subprocess.run(dvc_cmd("plots", "show", "--json"), cwd=workdir, capture_output=True, text=True,
                               env=env(), check=True)
        assert repro(workdir)[0] == [], "an unchanged pipeline must not rerun anything"
    assert all(f"artifacts/methods/{m}/train_curve.json" in plots.stdout for m in METHODS)
    gap = json.loads((art / "methods/unsupervised-clipcap/modality_gap.json").read_text())
    assert (art / "methods/unsupervised-clipcap/modality_gap.png").stat().st_size > 0
    assert [r["lambda"] for r in gap["results"]] == [0.0, 1.0] and "CIDEr" in gap["results"][0]
    html = (art / "report/index.html").read_text()
    assert all(method in html for method in METHODS) and html.count("data:image/jpeg;base64,") == 3
    assert "6 images evaluated, 0 skipped" in html
    assert all(f"Training loss of {method} (" in html for method in METHODS)
    torch_version = importlib.metadata.version("torch")
    assert f"torch {torch_version}" in html and "trained with other software" not in html
    assert json.loads((art / "methods/syntic/model/train_report.json").read_text())["environment"]["torch"] == torch_version


def synthcap(root: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=root, capture_output=True, text=True,
                          env=env())


@pytest.mark.xdist_group("finished")    # with the build, on one worker: tests/conftest.py
def test_synthcap_caption_captions_a_photo_with_every_method_and_skips_a_corrupt_one(finished, shared_data,
                                                                                    tmp_path):
    workdir = finished                       # read only: the photos and the output live in tmp_path
    photo = shared_data / "flickr8k/images/1000268201_693b08cb0e.jpg"
    out = synthcap(workdir, "caption", str(photo), "--format", "jsonl")
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert sorted(r["method"] for r in rows) == sorted(read_params(workdir)["methods"])
    assert all(r["image"] == str(photo) and isinstance(r["caption"], str) and isinstance(r["tags"], list)
               for r in rows)
    # the same photo captions the same as in the pipeline's own captioning, where it is an eval image
    captions = json.loads((workdir / f"artifacts/methods/syntic/captions/{EVALSET}.json").read_text())
    if photo.name in captions:
        assert next(r for r in rows if r["method"] == "syntic")["caption"] == captions[photo.name]

    folder = tmp_path / "photos" / "nested"
    folder.mkdir(parents=True)
    shutil.copy(photo, folder / "good.jpg")
    (folder / "broken.jpg").write_bytes(photo.read_bytes()[:300])
    out = synthcap(workdir, "caption", str(tmp_path / "photos"), "--method", "syntic", "--out",
                   str(tmp_path / "out.csv"))
    assert out.returncode == 0, out.stderr
    assert f"skipped {folder / 'broken.jpg'}" in out.stderr
    assert "1 image(s) captioned by 1 method(s), 1 skipped" in out.stderr
    lines = (tmp_path / "out.csv").read_text().splitlines()
    assert lines[0] == "image,method,caption,tags" and len(lines) == 2 and "good.jpg" in lines[1]

    # one photo, one caption: the same photo beside another of another size captions (and tags) the same
    other = sorted((shared_data / "flickr8k/images").glob("*.jpg"))[1]
    out = synthcap(workdir, "caption", str(photo), str(other), "--method", "syntic", "--format", "jsonl")
    assert out.returncode == 0, out.stderr
    alone = next(r for r in rows if r["method"] == "syntic")
    assert [r for r in map(json.loads, out.stdout.splitlines()) if r["image"] == str(photo)] == [alone]

    # nothing captioned (a missing photo, an empty folder): exit 1, and an earlier --out is not left behind
    (tmp_path / "empty").mkdir()
    for missing in (str(tmp_path / "no-such.jpg"), str(tmp_path / "empty")):
        out = synthcap(workdir, "caption", missing, "--method", "syntic", "--out", str(tmp_path / "out.csv"))
        assert out.returncode == 1 and "no image was captioned" in out.stderr, out.stderr
        assert not (tmp_path / "out.csv").exists()
        (tmp_path / "out.csv").write_text("an earlier run's result\n")
    # --out that cannot be written fails before any work, naming it
    out = synthcap(workdir, "caption", str(photo), "--method", "syntic", "--out", str(tmp_path / "empty"))
    assert out.returncode == 2 and f"--out {tmp_path / 'empty'} is a folder" in out.stderr, out.stderr


def fresh_copy(workdir: Path, root: Path, remote: Path) -> Path:
    """A colleague's checkout: the code, dvc.yaml, dvc.lock and params.yaml, no artifact, no cache."""
    root.mkdir(parents=True)
    for item in ("dvc.yaml", "dvc.lock", "params.yaml", ".dvcignore", "pipeline", "stages", "profiles", "data",
                 "inputs"):
        src = workdir / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / item)
    subprocess.run(dvc_cmd("init", "--no-scm", "-q"), cwd=root, check=True, env=env())
    shutil.copy(workdir / ".dvcignore", root / ".dvcignore")
    subprocess.run(dvc_cmd("remote", "add", "-d", "store", str(remote)), cwd=root, check=True, env=env())
    return root


def test_shared_artifacts_pulled_into_a_fresh_checkout_need_no_stage_to_run(workdir, tmp_path, shared_data):
    """dvc push from one checkout; dvc pull in another reproduces nothing. Pulling only the features,
    a training change then trains and evaluates with `dvc repro --allow-missing`, never generating."""
    remote = tmp_path / "remote"
    subprocess.run(dvc_cmd("remote", "add", "-f", "-d", "store", str(remote)), cwd=workdir, check=True, env=env())
    out = subprocess.run(dvc_cmd("push"), cwd=workdir, capture_output=True, text=True, env=env())
    assert out.returncode == 0, out.stderr

    full = fresh_copy(workdir, tmp_path / "b", remote)
    out = subprocess.run(dvc_cmd("pull"), cwd=full, capture_output=True, text=True, env=env())
    assert out.returncode == 0, out.stderr
    assert status(full) == set()
    assert repro(full)[0] == []
    assert digests(full / "artifacts/synthetic") == digests(workdir / "artifacts/synthetic")
    captions = json.loads((workdir / f"artifacts/methods/syntic/captions/{EVALSET}.json").read_text())
    photo = sorted(captions)[0]
    out = synthcap(full, "caption", str(shared_data / "flickr8k/images" / photo), "--method", "syntic",
                   "--format", "jsonl")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["caption"] == captions[photo]         # the pulled model, the pulled features
    # the fingerprint records travel with the artifacts: a stage rerun in the pulled checkout keeps its work
    for stage, kept in ((["encode", "text"], "6 shards: 6 kept"), (["train", "syntic"], "(kept: ")):
        out = subprocess.run([sys.executable, "-m", f"stages.{stage[0]}", *stage[1:]], cwd=full, capture_output=True,
                             text=True, env=env())
        assert out.returncode == 0 and kept in out.stdout + out.stderr, out.stdout + out.stderr

    features = fresh_copy(workdir, tmp_path / "c", remote)
    stages = ["corpus", "encode_text", "encode_synthetic", f"encode_eval@{EVALSET}", f"evalset@{EVALSET}",
              "tag_vocabulary", "tag_synthetic", f"tag_eval@{EVALSET}", "optimize", "support", "concepts", "refine",
              "optimize_refined"]
    out = subprocess.run(dvc_cmd("pull", *stages), cwd=features, capture_output=True, text=True, env=env())
    assert out.returncode == 0, out.stderr
    assert not (features / "artifacts/synthetic").exists()
    params = read_params(features)
    params["methods"]["syntic"]["train"]["epochs"] = 2
    write_params(features, params)
    ran, _ = repro(features, "--allow-missing", f"evaluate@syntic-{EVALSET}")
    assert ran == ["train@syntic", f"evaluate@syntic-{EVALSET}"]
    assert not (features / "artifacts/synthetic").exists()


@pytest.mark.xdist_group("finished")    # with the build, on one worker: tests/conftest.py
def test_synthcap_score_gives_evaluates_numbers_and_names_missing_and_extra_images(finished, tmp_path):
    workdir = finished                       # read only: the result file lives in tmp_path
    captions = json.loads((workdir / f"artifacts/methods/syntic/captions/{EVALSET}.json").read_text())
    expected = json.loads((workdir / f"artifacts/methods/syntic/metrics/{EVALSET}.json").read_text())
    results = tmp_path / "syntic-results.json"                                 # COCO results format
    results.write_text(json.dumps([{"image_id": i, "caption": c} for i, c in captions.items()]))
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "score", str(results), "--evalset", EVALSET],
                         cwd=workdir, capture_output=True, text=True, env=env())
    assert out.returncode == 0, out.stderr
    scores = dict(line.split("\t") for line in out.stdout.splitlines() if "\t" in line)
    assert "6 images matched, 0 missing, 0 results matching no image" in out.stdout
    for metric in ("BLEU-4", "ROUGE-L", "CIDEr", "CLIPScore", "RefCLIPScore"):
        assert float(scores[metric]) == pytest.approx(expected[metric], abs=1e-6), metric
    assert "METEOR" not in expected and scores["METEOR"].startswith("skipped: evaluate.meteor is false")
    first = sorted(captions)[0]
    partial = [{"image_name": i, "prediction": c} for i, c in captions.items() if i != first]
    results.write_text(json.dumps(partial + [{"image_name": "not-an-eval-image.jpg", "prediction": "a dog"}]))
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "score", str(results), "--evalset", EVALSET],
                         cwd=workdir, capture_output=True, text=True, env=env())
    assert out.returncode == 0, out.stderr
    assert "5 images matched, 1 missing, 1 results matching no image" in out.stdout
    assert f"missing: {first}" in out.stdout and "matching no image: not-an-eval-image.jpg" in out.stdout


def test_a_decoding_change_reruns_captioning_and_evaluation_but_never_training(workdir):
    params = read_params(workdir)
    params["methods"]["syntic"]["caption"]["beam_size"] = 1
    write_params(workdir, params)
    assert status(workdir) == {f"evaluate@syntic-{EVALSET}", "report"}
    ran, out = repro(workdir)
    assert set(ran) <= method_stages("syntic") | {"report"} and f"evaluate@syntic-{EVALSET}" in ran
    assert "6 captions made" in out


def test_a_scoring_change_rescores_the_kept_captions_and_damaged_captions_are_made_again(workdir):
    captions = workdir / f"artifacts/methods/syntic/captions/{EVALSET}.json"
    metrics = workdir / f"artifacts/methods/syntic/metrics/{EVALSET}.json"
    made, before = captions.read_bytes(), json.loads(metrics.read_text())
    params = read_params(workdir)
    params["evaluate"]["clipscore_w"] = 1.25                 # half the default 2.5: CLIPScore halves
    write_params(workdir, params)
    ran, out = repro(workdir, f"evaluate@syntic-{EVALSET}")
    assert ran == [f"evaluate@syntic-{EVALSET}"] and "6 captions kept" in out, out
    after = json.loads(metrics.read_text())
    assert after["CLIPScore"] == pytest.approx(before["CLIPScore"] / 2, abs=1e-6) and after["CIDEr"] == before["CIDEr"]
    assert captions.read_bytes() == made
    captions.write_text(json.dumps(dict.fromkeys(json.loads(made), "a caption nobody made")))
    ran, out = repro(workdir, f"evaluate@syntic-{EVALSET}")
    assert ran == [f"evaluate@syntic-{EVALSET}"] and "6 captions made" in out, out
    assert captions.read_bytes() == made


@pytest.mark.parametrize("method, key", [("syntic", "lr"), ("pcmnet", "lr")])
def test_changing_one_training_parameter_reruns_only_that_methods_stages(workdir, method, key):
    params = read_params(workdir)
    params["methods"][method]["train"]["optim"][key] *= 2
    write_params(workdir, params)
    assert status(workdir) == {f"train@{method}", "report"}
    ran, _ = repro(workdir)
    assert {f"train@{method}", f"evaluate@{method}-{EVALSET}", "report"} <= set(ran)
    assert set(ran) <= {f"train@{method}"} | method_stages(method) | {"report"}


def test_a_code_change_redoes_the_shards_it_affects_and_nothing_downstream(workdir):
    before = {a: digests(workdir / "artifacts" / a) for a in ("features/text", "features/synthetic")}
    with open(workdir / "pipeline/extract/encode.py", "a") as f:
        f.write("# a comment changes the code version\n")
    ran, out = repro(workdir)
    assert set(ran) == {"encode_text", "encode_synthetic", f"encode_eval@{EVALSET}"}
    assert len(re.findall(r"shards: 0 kept", out)) == 3, out
    # the comment changes no value: the features come out byte-identical, so nothing downstream reruns
    assert {a: digests(workdir / "artifacts" / a) for a in before} == before


def test_damaged_shard_bytes_are_redone_and_the_artifact_ends_byte_identical(workdir):
    shards = workdir / "artifacts" / "synthetic"
    before = digests(shards)
    target = shards / "part-00003.parquet"
    data = bytearray(target.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(b ^ 0xFF for b in data[middle:middle + 64])
    target.write_bytes(bytes(data))
    ran, out = repro(workdir)
    assert ran == ["generate"] and "redone (damaged: part-00003.parquet)" in out
    assert digests(shards) == before


def git(root: Path, *args) -> str:
    out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, env=env())
    assert out.returncode == 0, out.stderr
    return out.stdout


def dvc_json(root: Path, *args):
    out = subprocess.run(dvc_cmd(*args, "--json"), cwd=root, capture_output=True, text=True, env=env())
    assert out.returncode == 0 and "failed to load" not in out.stderr, out.stderr
    return json.loads(out.stdout)


def test_experiments_and_revisions_compare_metrics_without_retraining(workdir):
    """dvc exp run of a decoding change trains nothing; dvc exp show and dvc metrics diff read every
    method's metrics of the experiment and of main (metrics are cached outputs: any revision's
    dvc.lock finds them in the DVC cache)."""
    git(workdir, "init", "-q", "-b", "main")
    subprocess.run(dvc_cmd("config", "core.no_scm", "false"), cwd=workdir, check=True, env=env())
    git(workdir, "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A")
    git(workdir, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "baseline")
    out = subprocess.run(dvc_cmd("exp", "run", "-n", "beam3", "-S", "methods.pcmnet.caption.beam_size=3"),
                         cwd=workdir, capture_output=True, text=True, env=env())
    assert out.returncode == 0, out.stderr
    ran = re.findall(r"Running stage '([^']+)'", out.stdout)
    assert f"evaluate@pcmnet-{EVALSET}" in ran and not [s for s in ran if s.startswith("train@")]

    rows = dvc_json(workdir, "exp", "show")
    metric_file = f"artifacts/methods/pcmnet/metrics/{EVALSET}.json"
    found = {}
    for row in rows:
        for exp in [row] + [e for group in (row.get("experiments") or []) for e in group.get("revs", [])]:
            data = exp.get("data") or {}
            cider = (data.get("metrics") or {}).get(metric_file, {}).get("data", {}).get("CIDEr")
            found[exp.get("name") or data.get("name") or exp.get("rev")] = cider
    assert "beam3" in found and all(isinstance(v, float) for v in found.values()), found

    git(workdir, "-c", "user.name=t", "-c", "user.email=t@t", "add", "-A")
    git(workdir, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "beam 3")
    diff = dvc_json(workdir, "metrics", "diff", "main~1", "--all")
    assert {f"artifacts/methods/{m}/metrics/{EVALSET}.json" for m in METHODS} <= set(diff) | {metric_file}
    assert "CIDEr" in diff[metric_file]


def test_editing_one_eval_reference_reruns_that_eval_sets_stages_and_trains_nothing(workdir):
    images = json.loads((workdir / "artifacts" / f"evalsets/{EVALSET}/_manifest.json").read_text())
    token_file = workdir / "inputs/eval-text/Flickr8k.token.txt"
    first = sorted(json.loads((workdir / f"artifacts/methods/syntic/captions/{EVALSET}.json").read_text()))[0]
    lines = token_file.read_text().splitlines(keepends=True)
    i = next(k for k, line in enumerate(lines) if line.startswith(first + "#0"))
    lines[i] = f"{first}#0\ta reference rewritten by the test\n"
    token_file.write_text("".join(lines))
    assert images["num_rows"] == 6
    assert status(workdir) == {f"evalset@{EVALSET}"}
    ran, _ = repro(workdir, f"evalset@{EVALSET}")
    assert ran == [f"evalset@{EVALSET}"]
    # the new references reach every method's evaluation of this eval set and nothing that trains
    # (rerunning all eight evaluations would prove no more: each is the same stage on other captions)
    stale = status(workdir)
    assert {f"evaluate@{m}-{EVALSET}" for m in METHODS} <= stale
    assert not [s for s in stale if s.startswith(("train@", "generate", "encode_text", "encode_synthetic"))], stale
    ran, _ = repro(workdir, f"evaluate@syntic-{EVALSET}")     # the eval set's encode and tag stages read it too
    assert set(ran) == {f"encode_eval@{EVALSET}", f"tag_eval@{EVALSET}", f"evaluate@syntic-{EVALSET}"}


def test_adding_an_eval_set_trains_nothing(workdir):
    params = read_params(workdir)
    params["evalsets"]["flickr8k-more"] = {**params["evalsets"][EVALSET], "max_images": 3}
    write_params(workdir, params)
    stale = status(workdir)
    assert "evalset@flickr8k-more" in stale and not [s for s in stale if s.startswith("train@")]


def test_the_toy_method_of_the_adding_a_method_guide_trains_captions_and_evaluates(workdir):
    """docs/ADDING_A_METHOD.md's example, as written, is a method: dropped into pipeline/methods/ and
    named in params.yaml, it trains, captions and evaluates through the same runner and stages."""
    code = re.search(r"```python\n(.*?)```", (REPO / "docs/ADDING_A_METHOD.md").read_text(), re.S).group(1)
    assert len(code.splitlines()) < 100
    (workdir / "pipeline/methods/toy.py").write_text(code)
    params = read_params(workdir)
    params["methods"]["toy"] = {"method": "toy", "train": {"hidden": 32, "epochs": 2}, "caption": {}}
    (workdir / "params.yaml").write_text(render(params, "flickr8k"))      # validated by the stages' own copy
    ran, _ = repro(workdir, f"evaluate@toy-{EVALSET}")
    assert ran == ["train@toy", f"evaluate@toy-{EVALSET}"]
    report = json.loads((workdir / "artifacts/methods/toy/model/train_report.json").read_text())
    assert report["variant"] == "GRU 32" and report["epoch_loss"][1] < report["epoch_loss"][0]
    captions = json.loads((workdir / f"artifacts/methods/toy/captions/{EVALSET}.json").read_text())
    assert len(captions) == 6 and all(isinstance(c, str) for c in captions.values())
    metrics = json.loads((workdir / f"artifacts/methods/toy/metrics/{EVALSET}.json").read_text())
    assert math.isfinite(metrics["CIDEr"]) and metrics["images_evaluated"] == 6
