"""Profiles: params.yaml is the demo's (world) profile, fully expanded; the paper profiles carry METHODS.md's numbers
and plan every stage."""
import re
import shutil
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from conftest import methods_md_section
from pipeline import config
from pipeline.profiles import DEMO_PROFILE, PARAMS, expand_instances, merge, render, resolve_profile, use_profile

REPO = Path(__file__).resolve().parents[1]


def test_params_yaml_is_the_rendered_demo_profile_with_every_key_explicit():
    expanded = config.as_dict(config.from_dict(resolve_profile(DEMO_PROFILE)))
    assert PARAMS.read_text() == render(expanded, DEMO_PROFILE)
    assert config.read_yaml(PARAMS) == expanded      # DVC sees every value a stage reads, defaults included


PROFILES = ["offline", "world", "flickr8k", "paper-syntic-coco", "paper-coco", "paper-coco-to-flickr30k", "paper-capdec-coco",
            "paper-pcmnet-l14-coco"]


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_is_a_valid_configuration(profile):
    config.from_dict(resolve_profile(profile))


@pytest.mark.parametrize("profile, synthetic, real", [
    # by hand from the profiles' instances: SynTIC, CMSA and the ClipCap family read the global feature only;
    # PCM-Net the projected patches (Eq. 2) and the raw grid (its encoder, as released); MacCap's sub-region
    # aggregation the eval images' patches and attention map (Eq. 10-13); nobody the CLS row alone
    ("paper-syntic-coco", ["global"], ["global"]),
    ("paper-capdec-coco", ["global"], ["global"]),
    ("paper-coco", ["global", "patches", "grid"], ["global", "patches", "grid", "attention"]),
    ("paper-coco-to-flickr30k", ["global", "patches", "grid"], ["global", "patches", "grid", "attention"]),
    ("paper-pcmnet-l14-coco", ["global", "patches", "grid"], ["global", "patches", "grid"]),
    ("world", ["global", "patches"], ["global", "patches", "attention"]),
])
def test_each_profile_encodes_exactly_the_image_columns_its_instances_read(profile, synthetic, real):
    c = config.from_dict(resolve_profile(profile))
    assert (c.encode.synthetic_columns, c.encode.eval_columns) == (synthetic, real)


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


def test_an_overlays_change_to_an_instance_reaches_the_instances_made_like_it_in_the_base():
    offline, world = resolve_profile("offline")["methods"], resolve_profile("world")["methods"]
    assert offline["syntic-baseline"]["train"]["epochs"] == offline["syntic"]["train"]["epochs"] == 20
    assert world["syntic-baseline"]["train"]["epochs"] == world["syntic"]["train"]["epochs"] == 10   # world.yaml: syntic only
    assert world["syntic-baseline"]["train"]["fo"] is False                      # its own switches stay
    assert world["capdec"]["train"]["epochs"] == world["decap"]["train"]["epochs"] == 15
    assert world["capdec"]["train"]["noise_variance"] == 0.016 and world["decap"]["train"]["start_token"] is True


def test_overlay_merges_mappings_and_replaces_the_rest():
    base = {"a": {"x": 1, "y": [1, 2]}, "b": 2}
    assert merge(base, {"a": {"y": [3]}, "c": None}) == {"a": {"x": 1, "y": [3]}, "b": 2, "c": None}
    assert merge(base, {"a": {"_replace": True, "z": 3}}) == {"a": {"z": 3}, "b": 2}


def test_unknown_profile_names_the_known_ones():
    with pytest.raises(FileNotFoundError, match="known: .*offline.*paper-syntic-coco"):
        resolve_profile("no-such-profile")




@pytest.fixture(scope="module")
def methods_md() -> str:
    return methods_md_section("## 1. SynTIC", "## 2. PCM-Net")


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


def typed(profile: str) -> config.Config:
    return config.from_dict(resolve_profile(profile))


def test_paper_coco_profile_has_pcmnet_hyper_parameters_of_methods_md():
    md = methods_md_section("## 2. PCM-Net", "## 3. MacCap")
    instance = typed("paper-coco").methods["pcmnet"]
    pcm, cap = instance.train, instance.caption
    assert pcm.salient_k == int(re.search(r"K = (\d+) salient concepts", md).group(1))
    assert pcm.mix_m == int(re.search(r"top-M \(M = (\d+)\)", md).group(1))
    assert pcm.encoder_layers == int(re.search(r"N_e = (\d+)", md).group(1))
    decoder_layers, hidden = re.search(r"N_d = (\d+), hidden (\d+)", md).group(1, 2)
    assert (pcm.decoder_layers, pcm.hidden) == (int(decoder_layers), int(hidden))
    assert pcm.noise_variance == float(re.search(r"σ² = ([\d.]+)", md).group(1))
    assert pcm.clip_w == float(re.search(r"w = ([\d.]+) for ViT-B/32", md).group(1)) == 2.5
    epochs, warmup, batch, beam = re.search(
        r"(\d+) epochs, Noam schedule with (\d+)k warm-up, batch (\d+); beam size (\d+)", md).group(1, 2, 3, 4)
    assert (pcm.epochs, pcm.optim.warmup_steps, pcm.batch_size, cap.beam_size) == (
        int(epochs), int(warmup) * 1000, int(batch), int(beam))
    # the released loss and recipe (METHODS.md: "label smoothing 0.1", "(1 − p_target)^γ, γ = 2", ...)
    assert pcm.label_smoothing == float(re.search(r"label smoothing ([\d.]+)", md).group(1)) == 0.1
    assert pcm.focal_gamma == float(re.search(r"γ = (\d+)", md).group(1)) == 2
    drops = re.search(r"dropouts embedding ([\d.]+),\s+hidden/FFN ([\d.]+), attention ([\d.]+), predictor ([\d.]+)",
                      md).group(1, 2, 3, 4)
    assert (pcm.embedding_dropout, pcm.dropout, pcm.attention_dropout, pcm.predictor_dropout) == tuple(map(float, drops))
    assert pcm.optim.betas == (0.9, 0.999) and pcm.optim.eps == 1e-8 and pcm.optim.grad_clip_value == 0.1
    assert pcm.vocabulary == "words" and pcm.vocabulary_size == 10200 and pcm.max_len == 22   # 20 words + start, end
    assert pcm.mix_select == "pairs" and pcm.embedding_relu and pcm.w_g_layernorm
    assert cap.length_normalize is False                                   # "beams ranked by summed log-prob"


def test_pcmnet_table_3_is_the_vit_l14_run_with_w_4():
    md = methods_md_section("## 2. PCM-Net", "## 3. MacCap")
    p = typed("paper-pcmnet-l14-coco")
    assert p.models.clip.name == "ViT-L-14" and "4 for ViT-L/14" in md
    assert {name: (m.train.mixup, m.train.cxe) for name, m in p.methods.items()} == {
        "pcmnet": (True, True), "pcmnet-base": (False, False), "pcmnet-mixup": (True, False),
        "pcmnet-cxe": (False, True)}, "Table 3's four rows"
    assert {m.train.clip_w for m in p.methods.values()} == {4.0}


def test_paper_coco_profile_has_the_text_feature_family_of_methods_md():
    md = methods_md_section("## 4. Unsupervised-ClipCap", "## 5. CMSA")
    m = typed("paper-coco").methods
    sigma2 = float(re.search(r"Gaussian noise on the text feature \(σ² = ([\d.]+)\)", md).group(1))
    # Table 1's main row (C 74.6) is matched captions with NO correction; the ablations are rows of their own
    assert "matched captions, **no**\n  correction" in md or "no** correction" in md.replace("\n  ", " ")
    main = m["unsupervised-clipcap"]
    assert main.train.matched and main.caption.correction == "none"
    assert not m["unsupervised-clipcap-unmatched"].train.matched
    assert m["unsupervised-clipcap-mean"].caption.correction == "mean" and m["unsupervised-clipcap-mean"].train.matched
    assert main.train.language_model.pretrained == "gpt2"
    # CapDec's released setting: RN50x4, transformer mapper of 8 layers, prefix 40, batch 34, lr 2e-5, 10 epochs,
    # AdamW without weight decay, noise variance 0.016, beam 5
    capdec = m["capdec"]
    layers, prefix, batch, lr, epochs, beam = re.search(
        r"transformer mapper of\s+(\d+) layers with prefix length (\d+), batch (\d+), lr (\S+), (\d+) epochs, AdamW "
        r"without weight decay, noise\s+variance [\d.]+, beam (\d+)", md).group(1, 2, 3, 4, 5, 6)
    assert (capdec.train.mapper, capdec.train.mapper_layers, capdec.train.prefix_length) == (
        "transformer", int(layers), int(prefix))
    assert (capdec.train.batch_size, capdec.train.optim.lr, capdec.train.epochs, capdec.caption.beam_size) == (
        int(batch), float(lr), int(epochs), int(beam))
    assert capdec.train.optim.weight_decay == 0 and capdec.train.noise_variance == sigma2 and not capdec.train.matched
    assert typed("paper-capdec-coco").models.clip.name == "RN50x4" and "RN50x4" in md
    # DeCap: no weight decay, 64 on each of 2 GPUs (128), label smoothing 0.1, 1,000 warm-up steps
    decap = m["decap"]
    assert decap.caption.correction == "projection" and decap.train.noise_variance == 0
    assert (decap.train.optim.weight_decay, decap.train.batch_size, decap.train.label_smoothing,
            decap.train.optim.warmup_steps) == (0.0, 128, 0.1, 1000)
    table4 = {(i.train.fo, i.train.fp, i.train.af) for i in m.values() if i.method == "syntic"}
    assert len(table4) == 8, "Table 4: Baseline, +FO, +FP, +AF, the three pairs and SynTIC"
    assert {i.train.optim.name for i in m.values() if i.method == "syntic"} == {"adam"}   # "Optimiser: Adam (paper)"


def test_paper_corpora_keep_every_caption():
    for profile in ("paper-syntic-coco", "paper-coco", "paper-coco-to-flickr30k", "paper-capdec-coco",
                    "paper-pcmnet-l14-coco"):
        c = typed(profile)
        assert c.corpus.max_words is None and not c.corpus.deduplicate, profile
        assert all(t.max_words is None and not t.deduplicate for t in c.target_supports.values()), profile


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
    use_profile(DEMO_PROFILE, target)
    assert target.read_text() == PARAMS.read_text()


@pytest.mark.parametrize("profile", [p for p in PROFILES if p.startswith("paper-")])
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
    assert {s for s in planned if s.startswith("evaluate@")} == {f"evaluate@{m}-{e}" for m in p.methods
                                                               for e in p.evalsets}
    assert {s for s in planned if s.startswith("modality_gap@")} == {f"modality_gap@{m}" for m in p.modality_gap.models}
    assert planned[-1] == "report"
