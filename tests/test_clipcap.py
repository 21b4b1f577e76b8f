"""The text-feature family (pipeline/methods/clipcap.py): matched captions, CapDec noise, the
inference corrections (mean alignment, DeCap projection), the prefix MLP, training and captioning
through the pipeline entry points on real Flickr8k captions, checkpoints."""
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import paths
from pipeline.methods import clipcap
from pipeline.methods.clipcap import (PrefixMLP, artifact_mean, caption_features, correction_for, inject_noise,
                                      load_checkpoint, matched_partners, mean_shift, settings, variant)
from pipeline.data.shards import ShardedArtifact, feature_array, feature_numpy, fingerprint, write_sharded
from pipeline.support import SupportSet, l2_normalize

ROWS_PER_SHARD = 16
N_CAPTIONS = 61          # 12 Flickr8k images x 5 captions + 1 caption of a 13th image: a singleton group
N_IMAGES = 4
SUPPORT = {"tau": 0.01, "top_k": 8}
TINY = {"language_model": {"name": "synthcap-tiny-gpt2", "pretrained": None, "seed": 0},
        "prefix_length": 2, "max_len": 16, "epochs": 3, "batch_size": 16, "lr": 3e-3, "warmup_steps": 0,
        "lr_schedule": "constant", "beam_size": 2, "caption_batch_size": 8, "seed": 0}
VARIANTS = {
    "unsupervised-clipcap": {"method": "clipcap", "matched": True, "noise_variance": 0.0, "correction": "mean"},
    "capdec": {"method": "clipcap", "matched": False, "noise_variance": 0.016, "correction": "none"},
    "decap": {"method": "clipcap", "matched": False, "noise_variance": 0.0, "correction": "projection",
              "prefix_hidden": 0},
}


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# Cached artifacts built from real data (the module reads nothing else)
# ---------------------------------------------------------------------------------------------
def build_artifacts(root: Path, shared: Path, n_captions: int = N_CAPTIONS, n_images: int = N_IMAGES) -> dict:
    """corpus, text / synthetic / eval features, an eval set and the support set under root, as
    the pipeline's stages write them (Parquet shards + manifests, the CLIP identity in the meta)."""
    from pipeline.data.captions import read_captions
    from pipeline.data.evalsets import load_eval_images, read_references
    from pipeline.extract.encode import encode_image_table, encode_text_table
    from pipeline.models.clip import load_clip

    flickr = shared / "flickr8k"
    clip = load_clip("synthcap-tiny-vit", seed=0)
    records = read_captions(flickr / "Flickr8k.token.txt", split_file=flickr / "Flickr_8k.trainImages.txt").records
    rows = [r.to_dict() for r in records[:n_captions]]
    train = set((flickr / "Flickr_8k.trainImages.txt").read_text().split())
    refs = read_references(flickr / "Flickr8k.token.txt")
    present = sorted(f.name for f in (flickr / "images").iterdir())
    chosen = [name for name in present if name in refs and name not in train][:n_images]
    images, _ = load_eval_images(flickr / "images", {k: refs[k] for k in chosen})
    meta = {"model": clip.identity, "dtype": "float16"}
    d = {"corpus": root / "corpus", "text": root / "features/text", "synthetic": root / "features/synthetic",
         "eval": root / "features/eval", "evalsets": root / "evalsets", "support": root / "support",
         "methods": root / "methods"}

    def sharded(out, n, make, meta):
        write_sharded(out, n, ROWS_PER_SHARD, fingerprint(str(out)), make, meta, desc=out.name)

    sharded(d["corpus"], len(rows), lambda t: pa.Table.from_pylist(rows[t.start:t.stop]), {"model": None})
    sharded(d["text"], len(rows), lambda t: encode_text_table(pa.Table.from_pylist(rows[t.start:t.stop]), clip, 64,
                                                              "float16"), meta)
    fake = l2_normalize(np.random.default_rng(0).standard_normal((len(rows), clip.dim)))   # stand-in synthetic images
    sharded(d["synthetic"], len(rows), lambda t: pa.table({"caption_id": [r["caption_id"] for r in rows[t.start:t.stop]],
                                                          "global": feature_array(fake[t.start:t.stop])}), meta)
    eval_rows = [{"image_id": r["image_id"], "image": r["image"], "references": r["references"]} for r in images]
    sharded(d["evalsets"] / "tiny", len(eval_rows), lambda t: pa.Table.from_pylist(eval_rows[t.start:t.stop]),
            {"model": None})
    sharded(d["eval"] / "tiny", len(eval_rows),
            lambda t: encode_image_table(pa.Table.from_pylist(eval_rows[t.start:t.stop]), clip, "image_id", 8,
                                         "float16"), meta)
    text = np.concatenate([feature_numpy(b.column(0)) for b in ShardedArtifact(d["text"]).iter_batches(["text_feature"])])
    SupportSet.build(text).save(d["support"])
    (d["support"] / "report.json").write_text(json.dumps({"model": clip.identity}))
    return {**d, "clip": clip.identity, "rows": rows, "references": {r["image_id"]: r["references"] for r in images}}


def use_artifacts(monkeypatch, art: dict) -> None:
    for attr, key in (("CORPUS", "corpus"), ("TEXT_FEATURES", "text"), ("SYNTHETIC_FEATURES", "synthetic"),
                      ("EVAL_FEATURES", "eval"), ("EVALSETS", "evalsets"), ("SUPPORT", "support"),
                      ("METHODS", "methods")):
        monkeypatch.setattr(paths, attr, art[key])


def pipeline_params(methods: dict) -> dict:
    return {"device": "cpu", "support": dict(SUPPORT), "evalsets": {"tiny": {"images": "unused"}},
            "models": {"clip": {"name": "synthcap-tiny-vit", "pretrained": None, "seed": 0, "precision": "fp32"}},
            "methods": methods}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, shared_data):
    return build_artifacts(tmp_path_factory.mktemp("clipcap-artifacts"), shared_data)


@pytest.fixture
def art(artifacts, monkeypatch):
    use_artifacts(monkeypatch, artifacts)
    return artifacts


def read_all(folder: Path, column: str) -> np.ndarray:
    return np.concatenate([feature_numpy(pq.read_table(f, columns=[column]).column(0))
                           for f in sorted(Path(folder).glob("part-*.parquet"))])


# ---------------------------------------------------------------------------------------------
# Matched captions (Eq. 2)
# ---------------------------------------------------------------------------------------------
def check_pairing(groups: list[str], partner: np.ndarray) -> None:
    groups = np.asarray(groups)
    sizes = {g: int((groups == g).sum()) for g in set(groups)}
    assert sorted(partner.tolist()) == list(range(len(groups)))            # every caption is a target once
    for i, j in enumerate(partner):
        assert groups[j] == groups[i]                                       # same source image
        assert (j != i) if sizes[groups[i]] > 1 else (j == i)               # never itself, unless alone


def test_matched_partners_stay_in_the_group_never_self_cover_every_caption_and_are_seeded():
    rng = np.random.default_rng(3)
    groups = [f"img{g}" for g, size in enumerate([1, 2, 3, 5, 5, 1, 6, 4]) for _ in range(size)]
    groups = [groups[i] for i in rng.permutation(len(groups))]              # groups need not be contiguous
    for epoch in range(5):
        check_pairing(groups, matched_partners(groups, epoch, seed=0))
    assert np.array_equal(matched_partners(groups, 2, 0), matched_partners(groups, 2, 0))
    assert not all(np.array_equal(matched_partners(groups, 0, 0), matched_partners(groups, e, 0)) for e in range(1, 5))
    assert not np.array_equal(matched_partners(groups, 0, 0), matched_partners(groups, 0, 1))
    assert matched_partners(["only"], 0, 0).tolist() == [0]
    assert matched_partners([], 0, 0).tolist() == []


def test_matched_partners_on_real_flickr8k_groups(artifacts):
    groups = [r["group_id"] for r in artifacts["rows"]]
    assert len(set(groups)) == 13 and groups.count(groups[-1]) == 1          # 12 groups of 5 + a singleton
    partner = matched_partners(groups, 0, 0)
    check_pairing(groups, partner)
    assert partner[-1] == len(groups) - 1


def text_row_of(batch_features: np.ndarray, text: np.ndarray) -> np.ndarray:
    """Which corpus row each (noise-free) batch feature is."""
    rows = (batch_features @ text.T).argmax(axis=1)
    np.testing.assert_allclose(text[rows], batch_features, atol=1e-6)
    return rows


@pytest.mark.parametrize("matched", [True, False])
def test_training_batches_pair_each_feature_with_its_partner_caption(art, matched):
    from pipeline.models.language_model import load_causal_lm
    s = settings({**TINY, "matched": matched})
    lm = load_causal_lm("synthcap-tiny-gpt2", seed=0)
    rows = art["rows"]
    columns = {k: [r[k] for r in rows] for k in ("caption_id", "group_id", "text")}
    text = l2_normalize(read_all(art["text"], "text_feature"))
    for epoch in (0, 1):
        seen, partners = [], matched_partners(columns["group_id"], epoch, s["seed"])
        batches = list(clipcap._epoch_batches(s, lm, ShardedArtifact(art["text"]), columns, epoch, text.shape[1]))
        for batch in batches:
            src = text_row_of(batch["feature"].numpy(), text)
            want = [rows[partners[i]]["text"] if matched else rows[i]["text"] for i in src]
            tokens, lengths = lm.encode(want, s["max_len"])
            assert torch.equal(batch["tokens"], tokens) and torch.equal(batch["lengths"], lengths)
            seen.extend(src.tolist())
        assert sorted(seen) == list(range(len(rows)))                       # each caption once per epoch
        again = list(clipcap._epoch_batches(s, lm, ShardedArtifact(art["text"]), columns, epoch, text.shape[1]))
        assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(batches, again))


# ---------------------------------------------------------------------------------------------
# CapDec noise
# ---------------------------------------------------------------------------------------------
def test_noise_has_the_requested_variance_and_is_off_at_zero():
    x = l2_normalize(np.random.default_rng(0).standard_normal((4000, 64)))
    noisy = inject_noise(x, 0.016, np.random.default_rng(1), renormalize=False)
    n = noisy.astype(np.float64) - x
    assert abs(n.mean()) < 2e-3
    assert n.var() == pytest.approx(0.016, rel=0.02)                        # 256k draws: sd of the estimate ~0.3%
    assert np.var(n, axis=0).min() > 0.016 * 0.8                            # isotropic: every dimension
    renormalised = inject_noise(x, 0.016, np.random.default_rng(1))
    np.testing.assert_allclose(renormalised, l2_normalize(x + n), atol=1e-6)   # normalize(t + n), same draw
    np.testing.assert_allclose(np.linalg.norm(renormalised, axis=1), 1.0, atol=1e-5)
    rng = np.random.default_rng(5)
    state = rng.bit_generator.state
    assert inject_noise(x, 0.0, rng) is not None and np.array_equal(inject_noise(x, 0.0, rng), x)
    assert rng.bit_generator.state == state                                 # 0 = off: nothing drawn
    with pytest.raises(ValueError):
        inject_noise(x, -0.1, rng)


# ---------------------------------------------------------------------------------------------
# Inference corrections
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["synthetic", "eval"])
def test_mean_alignment_equals_a_direct_computation(art, source):
    v = read_all(art["eval"] / "tiny", "global")
    text = read_all(art["text"], "text_feature")
    image = read_all(art["synthetic"] if source == "synthetic" else art["eval"] / "tiny", "global")
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
    mu_t, mu_v = unit(text.astype(np.float64)).mean(0), unit(image.astype(np.float64)).mean(0)
    direct = unit(unit(v.astype(np.float64)) - mu_v + mu_t)
    correct = correction_for({"correction": "mean", "mean_image_source": source}, pipeline_params({}),
                             art["clip"], "tiny")
    np.testing.assert_allclose(correct(v), direct, atol=1e-6)
    np.testing.assert_allclose(artifact_mean(ShardedArtifact(art["text"]), "text_feature"), mu_t, atol=1e-10)
    np.testing.assert_allclose(mean_shift(v, mu_t, mu_v), direct, atol=1e-6)
    # after the shift the image mean sits on the text mean (before renormalisation)
    np.testing.assert_allclose((unit(image) - mu_v + mu_t).mean(0), mu_t, atol=1e-7)


def test_decap_projection_path_equals_support_set_project(art):
    v = read_all(art["eval"] / "tiny", "global")
    support = SupportSet.load(art["support"])
    raw = support.project(v, SUPPORT["tau"], SUPPORT["top_k"])
    p = pipeline_params({})
    plain = correction_for({"correction": "projection", "projection_renormalize": False}, p, art["clip"], "tiny")
    np.testing.assert_array_equal(plain(v), raw)
    renorm = correction_for({"correction": "projection"}, p, art["clip"], "tiny")
    np.testing.assert_allclose(renorm(v), raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)
    assert correction_for({"correction": "none"}, p, art["clip"], "tiny")(v * 3) == pytest.approx(l2_normalize(v))


def test_corrections_refuse_features_of_another_clip_model(art):
    from pipeline.data.shards import ModelMismatchError
    other = {**art["clip"], "weights_sha256": "0" * 64}
    for correction in ("mean", "projection"):
        with pytest.raises(ModelMismatchError):
            correction_for({"correction": correction}, pipeline_params({}), other, "tiny")


# ---------------------------------------------------------------------------------------------
# Model pieces and settings
# ---------------------------------------------------------------------------------------------
def test_prefix_mlp_maps_a_feature_to_prefix_length_embeddings_of_the_lm_width():
    x = torch.randn(3, 64)
    mlp = PrefixMLP(64, 32, 5)
    assert mlp(x).shape == (3, 5, 32)
    assert [m.out_features for m in mlp.net if isinstance(m, torch.nn.Linear)] == [80, 160]   # ClipCap: P*W/2
    single = PrefixMLP(64, 32, 1, hidden=0)                                 # DeCap: one Linear
    assert isinstance(single.net, torch.nn.Linear) and single(x).shape == (3, 1, 32)


def test_variant_labels_and_settings_validation():
    assert variant(VARIANTS["unsupervised-clipcap"]) == "matched+mean"
    assert variant(VARIANTS["capdec"]) == "noise 0.016"
    assert variant(VARIANTS["decap"]) == "projection"
    assert variant({"method": "clipcap"}) == "text only"
    with pytest.raises(ValueError, match="unknown clipcap parameter"):
        settings({"method": "clipcap", "corection": "mean"})
    with pytest.raises(ValueError, match="correction"):
        settings({"correction": "rotation"})
    with pytest.raises(ValueError, match="noise_variance"):
        settings({"noise_variance": -1})


# ---------------------------------------------------------------------------------------------
# Every variant through train / caption, checkpoints
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_each_variant_trains_its_loss_goes_down_and_captions_the_eval_images(art, name, tmp_path):
    cfg = {**VARIANTS[name], **TINY}
    p = pipeline_params({name: cfg})
    report = clipcap.train(name, cfg, p, tmp_path / "model")
    loss = report["epoch_loss"]
    assert len(loss) == TINY["epochs"] and all(np.isfinite(loss))
    assert loss[-1] < loss[0] - 1.0, loss
    assert report["variant"] == variant(cfg) and report["training_captions"] == N_CAPTIONS
    assert report["clip_model"] == art["clip"] and report["language_model"]["name"] == "synthcap-tiny-gpt2"
    if cfg["matched"]:
        assert report["pairs"] == {"captions": 61, "groups": 13, "singleton_captions": 1,
                                   "captions_matched_to_another": 60}
    captions = clipcap.caption(name, cfg, p, tmp_path / "model")
    assert set(captions) == {"tiny"} and set(captions["tiny"]) == set(art["references"])
    assert all(isinstance(c, str) for c in captions["tiny"].values())


def test_checkpoint_round_trip_same_weights_logits_captions_and_another_clip_is_refused(art, tmp_path, monkeypatch):
    from pipeline.data.shards import ModelMismatchError
    cfg = {**VARIANTS["capdec"], **TINY, "epochs": 1}
    p = pipeline_params({"capdec": cfg})
    clipcap.train("capdec", cfg, p, tmp_path)
    path = tmp_path / "model.safetensors"
    meta = clipcap.checkpoint_metadata(path)
    assert meta["config"]["prefix_length"] == 2 and meta["clip_model"] == art["clip"]
    assert meta["language_model"]["name"] == "synthcap-tiny-gpt2"
    model = load_checkpoint(path)
    assert b"pickle" not in path.read_bytes()[:200] and path.read_bytes()[:8] != b"PK\x03\x04"
    clipcap.save_checkpoint(model, tmp_path / "again.safetensors", model.clip_model)
    again = load_checkpoint(tmp_path / "again.safetensors")
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    feats = l2_normalize(read_all(art["eval"] / "tiny", "global"))
    tokens, lengths = model.causal.encode(["a dog runs"] * len(feats), 8)
    with torch.no_grad():
        batch = {"feature": torch.from_numpy(feats), "tokens": tokens, "lengths": lengths}
        assert torch.equal(model.loss(batch), again.loss(batch))
    assert caption_features(model, feats, 2) == caption_features(again, feats, 2)
    assert clipcap.caption("capdec", cfg, p, tmp_path) == clipcap.caption("capdec", cfg, p, tmp_path)  # deterministic
    with pytest.raises(ValueError, match=r"other.safetensors is not a synthcap.clipcap.v1 checkpoint"):
        from safetensors.torch import save_file
        save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"), metadata={"format": "other"})
        load_checkpoint(tmp_path / "other.safetensors")

    # eval features of another CLIP model than the training text features: refused, by name
    real = clipcap.checkpoint_metadata

    def other_clip(path):
        meta = real(path)
        return {**meta, "clip_model": {**meta["clip_model"], "name": "another-clip"}}

    monkeypatch.setattr(clipcap, "checkpoint_metadata", other_clip)
    with pytest.raises(ModelMismatchError, match="another-clip"):
        clipcap.caption("capdec", cfg, p, tmp_path)
