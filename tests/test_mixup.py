"""The modality-gap analysis (pipeline/mixup.py, stage mixup): mix-up features and the whole run."""
import json

import numpy as np
import pytest

from pipeline.analysis.modality_gap import mix_features, run_mixup
from test_clipcap import TINY, VARIANTS, build_artifacts, pipeline_params, read_all, use_artifacts


pytestmark = pytest.mark.usefixtures("one_thread")


def test_mixup_feature_is_the_normalised_interpolation():
    rng = np.random.default_rng(0)
    t, v = rng.standard_normal((5, 16)) * 2, rng.standard_normal((5, 16)) * 0.5      # not unit on purpose
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
    for lam in (0.0, 0.25, 0.5, 0.9, 1.0):
        direct = unit(lam * unit(t) + (1 - lam) * unit(v))
        np.testing.assert_allclose(mix_features(t, v, lam), direct, atol=1e-6)
    np.testing.assert_allclose(mix_features(t, v, 0.0), unit(v), atol=1e-6)         # the image alone
    np.testing.assert_allclose(mix_features(t, v, 1.0), unit(t), atol=1e-6)         # the text alone
    with pytest.raises(ValueError, match="lambda"):
        mix_features(t, v, 1.5)
    with pytest.raises(ValueError, match="same shape"):
        mix_features(t[:3], v, 0.5)


def test_mixup_run_captions_each_lambda_with_the_uncorrected_model_and_writes_json_and_plot(
        tmp_path, shared_data, monkeypatch):
    from pipeline import paths
    from pipeline.methods import clipcap
    from pipeline.models.clip import load_clip

    art = build_artifacts(tmp_path, shared_data, n_captions=20, n_images=3)
    use_artifacts(monkeypatch, art)
    name = "unsupervised-clipcap"
    cfg = {**VARIANTS[name], **TINY, "epochs": 1, "beam_size": 1}
    p = {**pipeline_params({name: cfg}), "mixup": {"evalset": "tiny", "lambdas": [0.5, 1.0]}}
    clipcap.train(name, cfg, p, paths.method_dir(name) / "model")

    fed = []                                         # what the model's own inference path receives
    real_captioner = clipcap.feature_captioner

    def spy(*args):
        run = real_captioner(*args)

        def wrapped(features):
            fed.append(np.array(features))
            return run(features)
        wrapped.clip_model = run.clip_model
        return wrapped

    monkeypatch.setattr(clipcap, "feature_captioner", spy)
    result = run_mixup(name, p, progress=False)

    out = paths.method_dir(name)
    saved = json.loads((out / "mixup.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["lambdas"] == [0.5, 1.0] and saved["images"] == 3 and saved["evalset"] == "tiny"
    assert [r["lambda"] for r in saved["results"]] == [0.5, 1.0]
    for row in saved["results"]:
        assert {"BLEU-4", "METEOR", "ROUGE-L", "CIDEr"} <= set(row) and all(np.isfinite(row[k]) for k in ("BLEU-4", "CIDEr"))
    assert (out / "mixup.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # no correction: the features fed are exactly normalize(lambda t + (1 - lambda) v)
    clip = load_clip("synthcap-tiny-vit", seed=0)
    v = read_all(art["eval"] / "tiny", "global")
    ids = sorted(art["references"])                  # eval rows are in sorted image order
    t = clip.encode_texts([art["references"][i][0] for i in ids])
    assert len(fed) == 2
    for lam, got in zip([0.5, 1.0], fed):
        np.testing.assert_allclose(got, mix_features(t, v, lam), atol=1e-5)
