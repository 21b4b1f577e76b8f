"""Every paper profile runs end to end: each of its method instances is encoded for (only the image columns
the profile's instances read, ``encode.synthetic_columns`` / ``encode.eval_columns``), trained and made to
caption, through the code the stages run (``encode_image_table`` and ``patch_grid`` as stages/encode.py
calls them, ``runner.train`` and ``runner.caption`` as stages/train.py and stages/evaluate.py do), on small
models of the architecture family each profile names: a ViT or a ResNet CLIP, an OPT- or GPT-2-shaped
language model, a RoBERTa classifier. A profile that cannot run (a CLIP family the encoder cannot read, a
column no stage caches, a language model family the loader cannot build) fails here, not on a GPU.

The data is tests/test_runner.py's ``build_real_artifacts`` (Flickr8k photos standing in for synthetic images),
built once per CLIP and column set; a training shared by several instances or profiles runs once (the
runner keeps a model whose fingerprint is unchanged). Sizes shrink (one epoch, narrow models, 2 beams); the
architectures, switches and decoding choices of every instance stay the profile's."""
import dataclasses
import hashlib
import json
import math
import re
import shutil
from pathlib import Path

import open_clip
import pytest

from pipeline import config as cfg
from pipeline import paths, runner
from pipeline.data.shards import ShardedArtifact
from pipeline.methods import get
from pipeline.models import CONFIG_DIR
from pipeline.profiles import PROFILES, merge, resolve_profile

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

PAPER_PROFILES = sorted(p.stem for p in PROFILES.glob("paper-*.yaml"))

# The small model of each architecture family (built from pipeline/models/configs, random seeded weights)
SMALL_CLIP = {"vit": "synthcap-tiny-vit", "resnet": "synthcap-tiny-rn"}
SMALL_LM = {"gpt2": "synthcap-tiny-gpt2", "opt": "synthcap-tiny-opt"}
# The family of a model named by a Hugging Face id (the suite never downloads one to look)
HUB_FAMILIES = [(r"^(openai-community/)?(gpt2|distilgpt2)(-medium|-large|-xl)?$", "gpt2"),
                (r"^facebook/opt-[0-9.]+[mb]$", "opt"), (r"^(FacebookAI/)?roberta-(base|large)$", "roberta")]

SMALL_TRAIN = {        # sizes only: one epoch, two steps of 32 rows, narrow models, captions of at most 12 tokens
    "syntic": {"epochs": 1, "batch_size": 32, "decoder": {"width": 32, "layers": 1, "heads": 2, "max_len": 12}},
    "pcmnet": {"epochs": 1, "batch_size": 32, "hidden": 32, "heads": 2, "ffn_dim": 64, "encoder_layers": 1,
               "decoder_layers": 1, "max_len": 12},
    "clipcap": {"epochs": 1, "batch_size": 32, "mapper_layers": 1, "max_len": 12},
    "maccap": {"epochs": 1, "batch_size": 32, "queries": 4, "ffn_dim": 64, "max_len": 12},
    "cmsa": {"mle_epochs": 1, "discriminator_epochs": 1, "rl_epochs": 1, "batch_size": 32,
             "decoder": {"width": 32, "layers": 1, "heads": 2, "max_len": 12}, "discriminator": {"max_len": 24}},
}
SMALL_CAPTION = {"beam_size": 2, "samples": 2, "max_new_tokens": 8}


def clip_family(name: str) -> str:
    """vit | resnet, from open_clip's configuration of the architecture (a ResNet's layers are a list)."""
    config = open_clip.get_model_config(name)
    if config is None:
        pytest.fail(f"open_clip has no configuration {name!r}: its architecture family is unknown")
    return "resnet" if isinstance(config["vision_cfg"]["layers"], (list, tuple)) else "vit"


def model_family(ref: dict) -> str:
    if ref.get("pretrained") is None:          # built from configuration: its model_type
        return json.loads((CONFIG_DIR / f"{ref['name']}.json").read_text())["model_type"]
    for pattern, family in HUB_FAMILIES:
        if re.match(pattern, ref["pretrained"]):
            return family
    pytest.fail(f"no small stand-in for the model {ref['pretrained']!r}: add its family to HUB_FAMILIES")


def shrink(settings: dict, small: dict) -> dict:
    """``settings`` with the keys of ``small`` that it has set to the small values (mappings merged)."""
    out = dict(settings)
    for key, value in small.items():
        if key in out:
            out[key] = shrink(out[key] or {}, value) if isinstance(value, dict) else value
    return out


def small_models(settings: dict, roberta: Path) -> dict:
    """``settings`` with every model it names (a mapping with ``name`` and ``pretrained``) swapped for the
    small model of the same family."""
    out = {}
    for key, value in settings.items():
        if isinstance(value, dict) and {"name", "pretrained"} <= set(value):
            family = model_family(value)
            if family == "roberta":
                value = {**value, "name": "roberta-base", "pretrained": str(roberta)}
            else:
                assert family in SMALL_LM, f"no small causal LM of family {family!r}"
                value = {**value, "name": SMALL_LM[family], "pretrained": None}
        elif isinstance(value, dict):
            value = small_models(value, roberta)
        out[key] = value
    return out


def small_profile(name: str, roberta: Path) -> tuple[cfg.Config, str]:
    """Profile ``name`` on small models, validated as `make profile` validates it, and its CLIP's family."""
    params = resolve_profile(name)
    family = clip_family(params["models"]["clip"]["name"])
    params = merge(params, {"device": "cpu", "models": {"clip": {"name": SMALL_CLIP[family], "pretrained": None,
                                                                  "seed": 0, "precision": "fp32"}}})
    methods = {}
    for n, m in params["methods"].items():
        full = cfg.as_dict(cfg.MethodInstance.parse(m, f"methods.{n}"))      # every setting, defaults included
        methods[n] = {"method": m["method"], "train": shrink(small_models(full["train"], roberta), SMALL_TRAIN[m["method"]]),
                      "caption": shrink(full["caption"], SMALL_CAPTION)}
    return cfg.from_dict({**params, "methods": methods}), family


@pytest.fixture(scope="module")
def roberta(tmp_path_factory) -> Path:
    from test_cmsa import tiny_roberta
    return tiny_roberta(tmp_path_factory.mktemp("roberta"))


_BUILT: dict[tuple, Path] = {}


def artifacts_for(config: cfg.Config, shared: Path, scratch: Path) -> Path:
    """The artifacts of this CLIP and these columns (built once per module), with a support set of each of
    the profile's target domains."""
    from test_runner import build_real_artifacts
    c = config.models.clip
    key = (c.name, tuple(config.encode.synthetic_columns), tuple(config.encode.eval_columns))
    if key not in _BUILT:
        root = scratch / hashlib.sha256(repr(key).encode()).hexdigest()[:12]
        build_real_artifacts(root, shared, {"optimized", "tags", "support", "target", "concepts"},
                             clip_config=(c.name, c.pretrained, c.seed, c.precision, "cpu"),
                             synthetic_columns=key[1], eval_columns=key[2])
        _BUILT[key] = root
    root = _BUILT[key]
    for target in config.target_supports:        # build_real_artifacts' COCO captions stand in for every target
        if not paths.layout(root)["SUPPORTS"].joinpath(target).exists():
            shutil.copytree(paths.layout(root)["SUPPORTS"] / "coco", paths.layout(root)["SUPPORTS"] / target)
    return root


@pytest.mark.parametrize("profile", PAPER_PROFILES)
def test_every_instance_of_a_paper_profile_encodes_trains_and_captions_on_small_models(
        profile, roberta, shared_data, tmp_path_factory, tmp_path, monkeypatch):
    config, family = small_profile(profile, roberta)
    root = artifacts_for(config, shared_data, tmp_path_factory.getbasetemp() / "paper-profile-artifacts")
    for key, value in paths.layout(root).items():
        monkeypatch.setattr(paths, key, value)
    # only the columns the profile's instances read were cached, and every instance below finds its own
    assert ShardedArtifact(paths.SYNTHETIC_FEATURES).columns == ["caption_id", *config.encode.synthetic_columns]
    assert ShardedArtifact(paths.eval_features("tiny")).columns == ["image_id", *config.encode.eval_columns]
    eval_ids = ShardedArtifact(paths.evalset("tiny")).read_column("image_id").to_pylist()
    if any(getattr(i.train, "pairs", "original") == "refined" for i in config.methods.values()):
        # the refine stage's code on these features, its sentence-transformers model swapped for a small one
        from stages import refine as stage
        from test_refine import tiny_sentence_model
        from test_runner import REAL_ROWS_PER_SHARD
        assert config.refine.text_similarity.startswith("sentence-transformers/"), config.refine.text_similarity
        small = str(tiny_sentence_model(tmp_path))
        refine_config = dataclasses.replace(config, rows_per_shard=REAL_ROWS_PER_SHARD,
                                            refine=dataclasses.replace(config.refine, text_similarity=small))
        monkeypatch.setattr(stage, "start", lambda name: refine_config)
        monkeypatch.setattr(stage, "pair_audits", lambda *_: None)   # the checker's audit needs the world's scenes
        stage.main()
    widths = []         # every training batch's tokens are cut after its longest caption (nn.tokenizer.to_longest)
    for module in {get(i.method) for i in config.methods.values()}:
        def spy(*args, real=module.batch, **kwargs):
            out = real(*args, **kwargs)
            if "tokens" in out:
                widths.append((out["tokens"].shape[1], int(out["lengths"].max())))
            return out
        monkeypatch.setattr(module, "batch", spy)
    for name, instance in config.methods.items():
        # instances that share their training share one model (kept by the runner on the second call)
        trained = f"{instance.method}-{hashlib.sha256(repr(cfg.as_dict(instance.train)).encode()).hexdigest()[:12]}"
        report = runner.train(trained, instance, "cpu", progress=False)
        assert report["epoch_loss"] and all(math.isfinite(x) for x in report["epoch_loss"]), name
        captions = runner.caption(trained, instance, "tiny", "cpu", progress=False)
        assert sorted(captions) == sorted(eval_ids), name
        assert all(isinstance(c, str) for c in captions.values()), name
    assert all(width == longest for width, longest in widths), widths
    if profile == "paper-capdec-coco":      # RN50x4: the ResNet CLIP ran, and was asked for the global feature only
        assert family == "resnet" and config.encode.synthetic_columns == config.encode.eval_columns == ["global"]
