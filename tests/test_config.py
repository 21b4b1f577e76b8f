"""The typed configuration: every misspelled, ill-typed or out-of-range key fails before any work,
naming the key; params.yaml is read with DVC's YAML rules; speed-only settings stay out of fingerprints."""
import copy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline import config
from pipeline.profiles import resolve_profile

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def offline() -> dict:
    return resolve_profile("offline")


def edited(params: dict, dotted: str, value=None, delete: bool = False, rename: str | None = None) -> dict:
    out = copy.deepcopy(params)
    *parents, key = dotted.split(".")
    node = out
    for part in parents:
        node = node[part]
    if rename is not None:
        node[rename] = node.pop(key)
    elif delete:
        del node[key]
    else:
        node[key] = value
    return out


def error_of(params: dict) -> str:
    with pytest.raises(config.ConfigError) as err:
        config.from_dict(params)
    return str(err.value)


def test_the_offline_profile_parses_and_fills_documented_defaults(offline):
    c = config.from_dict(offline)
    assert c.methods["syntic"].train.decoder.width == 128 and c.methods["syntic"].caption.max_len is None
    assert c.evalsets["demo"].max_pixels == 89_478_485                       # a default, not in the profile
    assert c.methods["capdec"].train.noise_variance == 0.016                 # _like + override


@pytest.mark.parametrize("dotted, typo, suggestion", [
    ("models.clip.pretrained", "pretrianed", "pretrained"),
    ("methods.syntic.train.vocabulary", "vocabluary", "vocabulary"),
    ("methods.pcmnet.train.epochs", "epoch", "epochs"),
    ("rows_per_shard", "rows_per_shards", "rows_per_shard"),
    ("support.top_k", "topk", "top_k"),
    ("methods.syntic.caption.beam_size", "beamsize", "beam_size"),
])
def test_a_misspelled_key_is_named_with_the_nearest_known_one(offline, dotted, typo, suggestion):
    message = error_of(edited(offline, dotted, rename=typo))
    prefix = dotted.rsplit(".", 1)[0] + "." if "." in dotted else ""
    assert f"unknown key `{prefix}{typo}`" in message and f"did you mean `{suggestion}`?" in message


@pytest.mark.parametrize("dotted, value, expected", [
    ("rows_per_shard", "64", "`rows_per_shard` must be an integer, got str '64'"),
    ("rows_per_shard", 0, "`rows_per_shard` must be >= 1, got 0"),
    ("rows_per_shard", True, "`rows_per_shard` must be an integer"),
    ("feature_dtype", "int8", "`feature_dtype` must be one of 'float16', 'float32', got 'int8'"),
    ("methods.syntic.train.optim.lr", "1e-4", "`methods.syntic.train.optim.lr` must be a number, got str '1e-4'"),
    ("methods.syntic.train.fo", "yes", "`methods.syntic.train.fo` must be true or false"),
    ("tag.threshold", 1.5, "`tag.threshold` must lie in [0, 1], got 1.5"),
    ("optimize.tau", 0, "`optimize.tau` must be > 0"),
    ("device", "gpu", "`device` must be cpu, cuda, cuda:N or mps"),
    ("methods.syntic.train.optim.betas", [0.9], "`methods.syntic.train.optim.betas` must be a list of 2 values"),
    ("evalsets.demo.max_images", -1, "`evalsets.demo.max_images` must be >= 1"),
    ("modality_gap.lambdas", [0.0, 1.5], "`modality_gap.lambdas` must lie in [0, 1], got 1.5"),
    ("methods.syntic.caption.support", "flickr30k", "`methods.syntic.caption.support` names 'flickr30k'"),
    ("modality_gap.models", ["no-such-instance"], "`modality_gap.models` names 'no-such-instance'"),
    ("methods.syntic.method", "sintic", "`methods.syntic.method` must name a method module"),
    ("corpus.format", "csv", "`corpus.format` must be one of"),
    ("methods.syntic.train.decoder.dropout", 1.5, "`methods.syntic.train.decoder.dropout` must lie in [0, 1)"),
    ("methods.pcmnet.train.attention_dropout", -0.1, "`methods.pcmnet.train.attention_dropout` must lie in [0, 1)"),
    ("methods.syntic.train.optim.betas", [1.5, 0.999], "`methods.syntic.train.optim.betas` must both lie in [0, 1)"),
    ("generate.guidance_scale", -3, "`generate.guidance_scale` must be >= 0, got -3"),
    ("methods.syntic.train.decoder.heads", 3, "`methods.syntic.train.decoder`: `heads` (3) must divide `width` (128)"),
    ("methods.pcmnet.train.heads", 3, "`methods.pcmnet.train`: `heads` (3) must divide `hidden` (128)"),
])
def test_a_wrong_type_or_value_is_named(offline, dotted, value, expected):
    assert expected in error_of(edited(offline, dotted, value))


def test_a_missing_required_key_is_named(offline):
    assert "missing key `models.clip.name`" in error_of(edited(offline, "models.clip.name", delete=True))


def test_settings_outside_train_and_caption_are_refused_with_a_hint(offline):
    message = error_of(edited(offline, "methods.syntic.beam_size", 2))
    assert "unknown key `methods.syntic.beam_size`" in message and "train/caption" in message


def test_names_that_become_folders_and_stage_names_are_checked(offline):
    params = copy.deepcopy(offline)
    params["evalsets"]["My Set"] = params["evalsets"].pop("demo")
    params["modality_gap"]["evalset"] = "My Set"
    assert "`evalsets.My Set`: the name must be lower-case" in error_of(params)


def test_a_real_architecture_without_weights_needs_random_init(offline):
    params = edited(offline, "models.clip.name", "ViT-B-32")
    message = error_of(params)
    assert "`models.clip.pretrained` is missing for the real architecture 'ViT-B-32'" in message
    assert "random_init: true" in message
    params["models"]["clip"]["random_init"] = True
    assert config.from_dict(params).models.clip.random_init
    assert config.from_dict(edited(offline, "models.clip.pretrained", "openai")).models.clip.name == "synthcap-tiny-vit"


def test_params_yaml_is_read_with_dvc_yaml_rules(tmp_path, offline):
    """YAML 1.2 (DVC, ruamel) reads 1e-4 as a float; PyYAML's YAML 1.1 would read a string."""
    text = yaml.safe_dump(offline, sort_keys=False).replace("lr: 0.001", "lr: 1e-4", 1)
    assert "lr: 1e-4" in text and yaml.safe_load(text)["methods"]["syntic"]["train"]["optim"]["lr"] == "1e-4"
    (tmp_path / "params.yaml").write_text(text)
    assert config.load(tmp_path / "params.yaml").methods["syntic"].train.optim.lr == 1e-4


def test_speed_only_settings_change_no_fingerprint_and_no_dvc_param(offline):
    base = config.from_dict(offline)
    faster = config.from_dict(edited(offline, "encode.batch_size", 2))
    assert config.stage_params("encode_text", faster) == config.stage_params("encode_text", base)
    assert "encode.batch_size" not in config.dvc_params("encode_eval", base, "demo")
    assert config.stage_params("generate", config.from_dict(edited(offline, "generate.steps", 5))) != \
        config.stage_params("generate", base)
    # a batched UNet's pixels can differ by one level from one image's on some CPUs: a parameter
    assert config.stage_params("generate", config.from_dict(edited(offline, "generate.batch_size", 2))) != \
        config.stage_params("generate", base) and "generate" in config.dvc_params("generate", base)
    assert config.dvc_params("encode_text", base) == ["models.clip", "feature_dtype", "rows_per_shard", "device",
                                                     "threads_per_task"]


def test_the_encode_columns_follow_the_instances_that_read_them_and_nothing_else(offline):
    """encode.synthetic_columns / encode.eval_columns are derived from `methods` (pipeline/methods image_columns):
    the encode stages' DVC params and fingerprint change when an instance starts or stops reading a column,
    and never on a decoding setting."""
    base = config.from_dict(offline)
    assert "encode.synthetic_columns" in config.dvc_params("encode_synthetic", base)
    assert "encode.eval_columns" in config.dvc_params("encode_eval", base, "demo")
    beam = config.from_dict(edited(offline, "methods.pcmnet.caption.beam_size", 5))
    for stage in ("encode_synthetic", "encode_eval"):
        assert config.stage_params(stage, beam) == config.stage_params(stage, base)
    # PCM-Net (the only reader of the raw grid) on the projected patches instead: the grid is cached nowhere
    assert "grid" in base.encode.synthetic_columns and "grid" in base.encode.eval_columns
    patches = config.from_dict(edited(offline, "methods.pcmnet.train.encoder_input", "patches"))
    assert "grid" not in patches.encode.synthetic_columns and "grid" not in patches.encode.eval_columns
    assert config.stage_params("encode_synthetic", patches) != config.stage_params("encode_synthetic", base)
    # a list given by hand is checked against what the instances read; a misspelled column is named
    assert ("`encode.synthetic_columns` is ['global'] but the enabled method instances read "
            f"{base.encode.synthetic_columns}") in error_of(edited(offline, "encode.synthetic_columns", ["global"]))
    assert "`encode.eval_columns[1]`" in error_of(edited(offline, "encode.eval_columns", ["global", "patchez"]))
    # params.yaml as `make profile` writes it (every key explicit) parses to the same columns
    assert config.from_dict(config.as_dict(base)).encode == base.encode


@pytest.mark.parametrize("dotted, value, key", [
    ("models.clip.pretrianed", "openai", "models.clip.pretrianed"),
    ("feature_dtype", "int8", "feature_dtype"),
    ("methods.pcmnet.train.epoch", 3, "methods.pcmnet.train.epoch"),
])
def test_a_stage_fails_before_any_work_naming_the_key(tmp_path, offline, dotted, value, key):
    root = tmp_path / "repo"
    for item in ("pipeline", "stages"):
        shutil.copytree(REPO / item, root / item, ignore=shutil.ignore_patterns("__pycache__"))
    params = edited(offline, dotted, value)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = subprocess.run([sys.executable, "-m", "stages.corpus"], cwd=root, capture_output=True, text=True)
    assert out.returncode != 0 and f"`{key}`" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert not (root / "artifacts").exists()


@pytest.mark.parametrize("content, expected", [
    (None, "corpus: `corpus.path` (params.yaml) names {path}, which does not exist"),
    ('[{"image_name": "a.jpg", "captions": [null], "split": "train"}]', "captions.json: item 0"),
])
def test_a_stage_names_bad_input_in_one_line_and_keeps_the_traceback_in_a_log(tmp_path, offline, content, expected):
    root = tmp_path / "repo"
    for item in ("pipeline", "stages"):
        shutil.copytree(REPO / item, root / item, ignore=shutil.ignore_patterns("__pycache__"))
    path = tmp_path / "captions.json"
    if content is not None:
        path.write_text(content)
    params = edited(edited(offline, "corpus.path", str(path)), "corpus.format", "karpathy_list")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = subprocess.run([sys.executable, "-m", "stages.corpus"], cwd=root, capture_output=True, text=True)
    assert out.returncode != 0 and expected.format(path=path) in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "artifacts/logs/corpus.traceback" in out.stderr
    assert "Traceback" in (root / "artifacts/logs/corpus.traceback").read_text()
