"""Profiles: params.yaml is the offline profile, fully expanded; the paper profiles carry METHODS.md's numbers
and plan every stage."""
import os
import re
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from pipeline import config
from pipeline.profiles import PARAMS, expand_instances, merge, render, resolve_profile, use_profile

REPO = Path(__file__).resolve().parents[1]
METHODS_MD = REPO.parent / "shared" / "docs" / "METHODS.md"


def test_params_yaml_is_the_rendered_offline_profile_with_every_key_explicit():
    expanded = config.as_dict(config.from_dict(resolve_profile("offline")))
    assert PARAMS.read_text() == render(expanded, "offline")
    assert config.read_yaml(PARAMS) == expanded      # DVC sees every value a stage reads, defaults included


@pytest.mark.parametrize("profile", ["offline", "flickr8k", "paper-syntic-coco", "paper-coco", "paper-coco-to-flickr30k"])
def test_every_profile_is_a_valid_configuration(profile):
    config.from_dict(resolve_profile(profile))


def test_an_instance_starts_from_another_with_like():
    methods = expand_instances({"a": {"method": "m", "train": {"x": 1, "y": {"p": 1, "q": 2}}},
                                "b": {"_like": "a", "train": {"y": {"q": 3}}},
                                "c": {"_like": "b", "caption": {"z": 0}}})
    assert methods["b"] == {"method": "m", "train": {"x": 1, "y": {"p": 1, "q": 3}}}
    assert methods["c"] == {"method": "m", "train": {"x": 1, "y": {"p": 1, "q": 3}}, "caption": {"z": 0}}
    with pytest.raises(config.ConfigError, match="cycle"):
        expand_instances({"a": {"_like": "b"}, "b": {"_like": "a"}})
    with pytest.raises(config.ConfigError, match="`methods.a._like` names 'nope'"):
        expand_instances({"a": {"_like": "nope"}})


def test_overlay_merges_mappings_and_replaces_the_rest():
    base = {"a": {"x": 1, "y": [1, 2]}, "b": 2}
    assert merge(base, {"a": {"y": [3]}, "c": None}) == {"a": {"x": 1, "y": [3]}, "b": 2, "c": None}
    assert merge(base, {"a": {"_replace": True, "z": 3}}) == {"a": {"z": 3}, "b": 2}


def test_unknown_profile_names_the_known_ones():
    with pytest.raises(FileNotFoundError, match="known: .*offline.*paper-syntic-coco"):
        resolve_profile("no-such-profile")


def methods_section(title: str, next_title: str) -> str:
    if not METHODS_MD.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"CI must check the profiles against {METHODS_MD}, which does not exist")
        pytest.skip(f"{METHODS_MD} not found")
    text = METHODS_MD.read_text(encoding="utf-8")
    return text[text.index(title):text.index(next_title)]


@pytest.fixture(scope="module")
def methods_md() -> str:
    return methods_section("## 1. SynTIC", "## 2. PCM-Net")


def test_paper_profile_has_the_syntic_hyper_parameters_of_methods_md(methods_md):
    p = resolve_profile("paper-syntic-coco")
    syntic = p["methods"]["syntic"]["train"]
    steps, size = re.search(r"(\d+) sampling steps, (\d+)×(\d+)", methods_md).group(1, 2)
    assert p["generate"]["steps"] == int(steps) and p["generate"]["resolution"] == int(size)
    tau2, lr = re.search(r"τ = 1/(\d+), Adam lr (\S+)\.", methods_md).group(1, 2)
    assert p["optimize"]["tau"] == float(Fraction(1, int(tau2))) and p["optimize"]["lr"] == float(lr)
    coco_tau = re.search(r"τ = 1/(\d+) \(COCO", methods_md).group(1)
    assert p["support"]["tau"] == float(Fraction(1, int(coco_tau)))
    layers, heads = re.search(r"(\d+) layers, (\d+) heads", methods_md).group(1, 2)
    decoder = syntic["decoder"]
    assert (decoder["layers"], decoder["heads"]) == (int(layers), int(heads))
    assert "Stable Diffusion v1-5" in methods_md and p["models"]["diffusion"]["pretrained"].endswith("stable-diffusion-v1-5")
    assert p["models"]["clip"] == {**p["models"]["clip"], "name": "ViT-B-32", "pretrained": "openai"}
    assert p["models"]["detector"]["pretrained"] == "facebook/detr-resnet-50"
    assert syntic["fo"] and syntic["fp"] and syntic["af"]
    assert "SS1M corpus is" in methods_md or "SS1M" in methods_md
    assert p["corpus"]["max_words"] is None and p["corpus"]["deduplicate"] is False   # COCO's captions as given


def test_paper_coco_profile_has_pcmnet_hyper_parameters_of_methods_md():
    md = methods_section("## 2. PCM-Net", "## 3. MacCap")
    p = {name: {**m.get("train", {}), **m.get("caption", {})} for name, m in resolve_profile("paper-coco")["methods"].items()}
    pcm = p["pcmnet"]
    assert pcm["salient_k"] == int(re.search(r"K = (\d+) salient concepts", md).group(1))
    assert pcm["mix_m"] == int(re.search(r"top-M \(M = (\d+)\)", md).group(1))
    assert pcm["encoder_layers"] == int(re.search(r"N_e = (\d+)", md).group(1))
    decoder_layers, hidden = re.search(r"N_d = (\d+), hidden (\d+)", md).group(1, 2)
    assert (pcm["decoder_layers"], pcm["hidden"]) == (int(decoder_layers), int(hidden))
    assert pcm["noise_variance"] == float(re.search(r"σ² = ([\d.]+)", md).group(1))
    assert pcm["clip_w"] == float(re.search(r"w = ([\d.]+) for ViT-B/32", md).group(1))
    epochs, warmup, batch, beam = re.search(
        r"(\d+) epochs, Noam schedule with (\d+)k warm-up, batch (\d+); beam size (\d+)", md).group(1, 2, 3, 4)
    assert (pcm["epochs"], pcm["optim"]["warmup_steps"], pcm["batch_size"], pcm["beam_size"]) == (
        int(epochs), int(warmup) * 1000, int(batch), int(beam))
    assert {(p[n]["mixup"], p[n]["cxe"]) for n in ("pcmnet", "pcmnet-base", "pcmnet-mixup", "pcmnet-cxe")} == {
        (True, True), (False, False), (True, False), (False, True)}, "Table 3's four rows"


def test_paper_coco_profile_has_the_text_feature_family_of_methods_md():
    md = methods_section("## 4. Unsupervised-ClipCap", "## 5. CMSA")
    instances = resolve_profile("paper-coco")["methods"]
    p = {name: {"method": m["method"], **m.get("train", {}), **m.get("caption", {})} for name, m in instances.items()}
    sigma2 = float(re.search(r"Gaussian noise on the text feature \(σ² = ([\d.]+)\)", md).group(1))
    assert p["capdec"]["noise_variance"] == sigma2 and not p["capdec"]["matched"]
    assert p["unsupervised-clipcap"]["matched"] and p["unsupervised-clipcap"]["correction"] == "mean"
    assert p["decap"]["correction"] == "projection" and p["decap"]["noise_variance"] == 0
    assert p["unsupervised-clipcap"]["language_model"]["pretrained"] == "gpt2"
    table4 = {(m["fo"], m["fp"], m["af"]) for m in p.values() if m["method"] == "syntic"}
    assert len(table4) == 8, "Table 4: Baseline, +FO, +FP, +AF, the three pairs and SynTIC"


def test_cross_domain_profile_projects_onto_target_captions_with_their_own_tau():
    p = config.from_dict(resolve_profile("paper-coco-to-flickr30k"))
    assert list(p.evalsets) == ["flickr30k-test"]
    assert p.support.tau == 0.01                                   # COCO's captions, in training and on COCO
    assert p.target_supports["flickr30k"].tau == 0.0125            # 1/80: only where Flickr30k's captions are used
    assert p.methods["syntic-tt"].caption.support == "flickr30k"
    assert p.methods["syntic"].caption.support == "corpus"


def test_switching_profiles_rewrites_params_yaml(tmp_path):
    target = tmp_path / "params.yaml"
    use_profile("paper-syntic-coco", target)
    assert config.read_yaml(target)["models"]["clip"]["name"] == "ViT-B-32"
    use_profile("offline", target)
    assert target.read_text() == PARAMS.read_text()


@pytest.mark.parametrize("profile", ["paper-syntic-coco", "paper-coco", "paper-coco-to-flickr30k"])
def test_paper_profile_dry_run_plans_every_stage(tmp_path, profile):
    for item in ("dvc.yaml", "pipeline", "stages", "profiles", "data"):
        src = REPO / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, tmp_path / item)
    use_profile(profile, tmp_path / "params.yaml")
    # the user's inputs the paper profiles name (empty Karpathy files stand in for dataset_*.json)
    for dataset in ("coco", "flickr30k"):
        (tmp_path / "data" / dataset / "images").mkdir(parents=True)
        (tmp_path / "data" / dataset / f"dataset_{dataset}.json").write_text('{"images": []}')
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run(dvc + ["init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    out = subprocess.run(dvc + ["repro", "--dry", "--force"], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    planned = re.findall(r"Running stage '([^']+)'", out.stdout)
    p = config.from_dict(resolve_profile(profile))
    data_plane = {"corpus", "demo_photos", "generate", "encode_text", "encode_synthetic", "tag_vocabulary",
                  "tag_synthetic", "optimize", "support", "concepts"}
    data_plane |= {f"{stage}@{e}" for e in p.evalsets for stage in ("evalset", "encode_eval", "tag_eval")}
    data_plane |= {f"target_support@{t}" for t in p.target_supports}
    assert data_plane <= set(planned)
    assert {s for s in planned if s.startswith("train@")} == {f"train@{m}" for m in p.methods}
    for stage in ("caption", "evaluate"):
        assert {s for s in planned if s.startswith(stage + "@")} == {f"{stage}@{m}-{e}" for m in p.methods
                                                                    for e in p.evalsets}
    assert {s for s in planned if s.startswith("modality_gap@")} == {f"modality_gap@{m}" for m in p.modality_gap.models}
    assert planned[-1] == "report"
