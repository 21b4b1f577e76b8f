"""The modality-gap analysis (pipeline/analysis/modality_gap.py, stage modality_gap): mix-up features,
the curve's plot, and the whole run on a captioner trained through the runner."""
import json
from types import SimpleNamespace

import numpy as np
import pytest

from pipeline import config as cfg
from pipeline import paths, runner
from pipeline.analysis.modality_gap import mix_features, plot_curve, run_modality_gap
from pipeline.methods import clipcap, syntic
from test_clipcap import TINY, VARIANTS, read_all

pytestmark = pytest.mark.usefixtures("one_thread")


def test_mixup_feature_is_the_normalised_interpolation():
    rng = np.random.default_rng(0)
    t, v = rng.standard_normal((5, 16)) * 2, rng.standard_normal((5, 16)) * 0.5      # not unit on purpose
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)                   # noqa: E731
    for lam in (0.0, 0.25, 0.5, 0.9, 1.0):
        direct = unit(lam * unit(t) + (1 - lam) * unit(v))
        np.testing.assert_allclose(mix_features(t, v, lam), direct, atol=1e-6)
    np.testing.assert_allclose(mix_features(t, v, 0.0), unit(v), atol=1e-6)         # the image alone
    np.testing.assert_allclose(mix_features(t, v, 1.0), unit(t), atol=1e-6)         # the text alone
    with pytest.raises(ValueError, match="lambda"):
        mix_features(t, v, 1.5)
    with pytest.raises(ValueError, match="same shape"):
        mix_features(t[:3], v, 0.5)


def test_plot_curve_writes_a_png_even_with_missing_scores(tmp_path):
    rows = [{"lambda": 0.0, "CIDEr": 0.1, "BLEU-4": 0.02}, {"lambda": 0.5, "CIDEr": float("nan")},
            {"lambda": 1.0, "CIDEr": 0.4, "BLEU-4": 0.0}]
    out = plot_curve(rows, tmp_path / "curve.png", title="t")
    assert out == tmp_path / "curve.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def analysis_config(name: str, inst: cfg.MethodInstance, lambdas, evalset="tiny"):
    """What run_modality_gap reads of the typed configuration: the instance, the analysis section, the
    CLIP text encoder, whether METEOR is scored and the device."""
    return SimpleNamespace(
        methods={name: inst}, device="cpu", evaluate=cfg.parse(cfg.Evaluate, {}, "evaluate"),
        modality_gap=cfg.parse(cfg.ModalityGap, {"models": [name], "evalset": evalset, "lambdas": lambdas},
                               "modality_gap"),
        models=SimpleNamespace(clip=cfg.parse(cfg.ModelRef, {"name": "synthcap-tiny-vit", "seed": 0},
                                              "models.clip")))


@pytest.fixture(scope="module")
def built(tmp_path_factory, shared_data):
    from test_runner import build_real_artifacts
    return build_real_artifacts(tmp_path_factory.mktemp("modality-gap-artifacts"), shared_data, {"support"},
                                n_groups=4, n_eval=3)


def test_modality_gap_run_captions_each_lambda_with_the_uncorrected_model_and_writes_json_and_plot(
        built, artifacts_root, monkeypatch):
    from test_runner import use_real_artifacts
    from pipeline.models.clip import clip_for
    art = use_real_artifacts(built, artifacts_root)
    name = "unsupervised-clipcap"
    train, caption = VARIANTS[name]                                  # its own inference corrects by the means
    inst = cfg.MethodInstance(method="clipcap", train=cfg.parse(clipcap.Train, {**TINY, **train, "epochs": 1}, "t"),
                              caption=cfg.parse(clipcap.Caption, {**caption, "beam_size": 1, "batch_size": 4}, "c"))
    runner.train(name, inst, "cpu", progress=False)

    fed = []                                         # what the model's own inference path receives
    real_decode = clipcap.decode_features

    def spy(model, features, beam_size=1, batch_size=64):
        fed.append(np.array(features))
        assert (beam_size, batch_size) == (1, 4)                     # the instance's caption settings
        return real_decode(model, features, beam_size, batch_size)

    monkeypatch.setattr(clipcap, "decode_features", spy)
    out = paths.method(name)
    result = run_modality_gap(name, analysis_config(name, inst, [0.5, 1.0]), out, progress=False)

    saved = json.loads((out / "modality_gap.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["lambdas"] == [0.5, 1.0] and saved["images"] == 3 and saved["evalset"] == "tiny"
    assert saved["model"] == name and saved["method"] == "clipcap" and saved["variant"] == "matched"
    assert [r["lambda"] for r in saved["results"]] == [0.5, 1.0]
    for row in saved["results"]:
        assert {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr"} <= set(row) and all(np.isfinite(row[k]) for k in ("BLEU-4", "CIDEr"))
    assert set(saved["examples"]) == set(art["eval_ids"]) and all(set(e) == {"0.5", "1.0"}
                                                                  for e in saved["examples"].values())
    assert (out / "modality_gap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # no correction: the features fed are exactly normalize(lambda t + (1 - lambda) v)
    clip = clip_for("synthcap-tiny-vit", None, 0, "fp32", "cpu")
    v = read_all(paths.eval_features("tiny"), "global")
    ids = sorted(art["references"])                  # eval rows are in sorted image order
    t = clip.encode_texts([art["references"][i][0] for i in ids])
    assert len(fed) == 2
    for lam, got in zip([0.5, 1.0], fed):
        np.testing.assert_allclose(got, mix_features(t, v, lam), atol=1e-5)


def test_modality_gap_refuses_a_captioner_without_decode_features_and_another_clip(built, artifacts_root):
    from pipeline.data.shards import ModelMismatchError
    from test_runner import use_real_artifacts
    use_real_artifacts(built, artifacts_root)
    inst = cfg.MethodInstance(method="syntic", train=syntic.Train(), caption=syntic.Caption())
    with pytest.raises(ValueError, match="'syntic' .*has no decode_features"):
        run_modality_gap("s", analysis_config("s", inst, [0.5]), artifacts_root / "s", progress=False)
    # a text encoder other than the one the captioner's features came from
    name = "capdec"
    train, caption = VARIANTS[name]
    inst = cfg.MethodInstance(method="clipcap", train=cfg.parse(clipcap.Train, {**TINY, **train, "epochs": 1}, "t"),
                              caption=cfg.parse(clipcap.Caption, caption, "c"))
    runner.train(name, inst, "cpu", progress=False)
    config = analysis_config(name, inst, [0.5])
    config.models.clip = cfg.parse(cfg.ModelRef, {"name": "synthcap-tiny-vit", "seed": 1}, "models.clip")
    with pytest.raises(ModelMismatchError, match="text_encoder"):
        run_modality_gap(name, config, paths.method(name), progress=False)
