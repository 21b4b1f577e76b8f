"""The text-feature family (pipeline/methods/clipcap.py): matched captions, CapDec noise, the
inference corrections (mean alignment, DeCap projection), the prefix MLP, the method contract (needs /
prepare / batch / correct), and training and captioning through the runner on real Flickr8k captions,
checkpoints."""
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import config as cfg
from pipeline import paths, runner
from pipeline.data.aligned import shard_order
from pipeline.data.shards import ModelMismatchError, ShardedArtifact, feature_numpy, write_sharded
from pipeline.methods import Data, Step, clipcap
from pipeline.methods.clipcap import (PrefixMLP, decode_features, inject_noise, matched_partners, mean_shift,
                                      pairing_stats, variant)
from pipeline.support import SupportSet
from pipeline.vectors import l2_normalize, mean_direction

N_CAPTIONS = 61          # 12 Flickr8k images x 5 captions + 1 caption of a 13th image: a singleton group
N_IMAGES = 4
TINY = {"language_model": {"name": "synthcap-tiny-gpt2", "pretrained": None, "seed": 0},
        "prefix_length": 2, "max_len": 16, "epochs": 3, "batch_size": 16,
        "optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.01, "schedule": "constant", "warmup_steps": 0},
        "seed": 0}
TINY_CAPTION = {"beam_size": 2, "batch_size": 8}
VARIANTS = {   # (train, caption) settings of each paper's row
    "unsupervised-clipcap": ({"matched": True}, {"correction": "mean"}),
    "capdec": ({"noise_variance": 0.016}, {"correction": "none"}),
    "decap": ({"prefix_hidden": 0}, {"correction": "projection"}),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def train_settings(**kw) -> clipcap.Train:
    return cfg.parse(clipcap.Train, {**TINY, **kw}, "methods.clipcap.train")


def caption_settings(**kw) -> clipcap.Caption:
    return cfg.parse(clipcap.Caption, {**TINY_CAPTION, **kw}, "methods.clipcap.caption")


def instance(name: str, **train) -> cfg.MethodInstance:
    t, c = VARIANTS[name]
    return cfg.MethodInstance(method="clipcap", train=train_settings(**{**t, **train}), caption=caption_settings(**c))


# ---------------------------------------------------------------------------------------------
# Cached artifacts built from real data (the module reads nothing else): tests/test_runner.py
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory, shared_data):
    from test_runner import build_real_artifacts
    return build_real_artifacts(tmp_path_factory.mktemp("clipcap-artifacts"), shared_data, {"support"},
                                n_eval=N_IMAGES)


@pytest.fixture
def art(built, artifacts_root):
    from test_runner import use_real_artifacts
    return use_real_artifacts(built, artifacts_root)


@pytest.fixture(scope="module")
def model():
    """The tiny ClipCap captioner (its LM built from configuration, seeded) for the contract tests."""
    s = train_settings()
    return clipcap.create(s, {"feature_dim": 64})


def read_all(folder: Path, column: str) -> np.ndarray:
    return np.concatenate([feature_numpy(pq.read_table(f, columns=[column]).column(0))
                           for f in sorted(Path(folder).glob("part-*.parquet"))])


def write_other_clip_copy(source: Path, out: Path, clip: dict) -> None:
    """The artifact at ``source`` again, as if another CLIP model had made it."""
    art = ShardedArtifact(source)
    meta = {**art.meta, "model": clip}
    write_sharded(out, art.num_rows, art.manifest["shards"][0]["rows"], "other-clip-copy",
                  lambda t: art.read_shard(t.index), meta)


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


def test_matched_partners_on_real_flickr8k_groups(built):
    groups = [r["group_id"] for r in built["rows"]]
    assert len(groups) == N_CAPTIONS
    assert len(set(groups)) == 13 and groups.count(groups[-1]) == 1          # 12 groups of 5 + a singleton
    partner = matched_partners(groups, 0, 0)
    check_pairing(groups, partner)
    assert partner[-1] == len(groups) - 1
    assert pairing_stats(groups) == {"captions": 61, "groups": 13, "singleton_captions": 1,
                                     "captions_matched_to_another": 60}


def text_row_of(batch_features: np.ndarray, text: np.ndarray) -> np.ndarray:
    """Which corpus row each (noise-free) batch feature is."""
    rows = (batch_features @ text.T).argmax(axis=1)
    np.testing.assert_allclose(text[rows], batch_features, atol=1e-6)
    return rows


def epoch_batches(inputs: runner.Inputs, model, s: clipcap.Train, epoch: int) -> list[dict]:
    """One epoch as the runner makes it: shards in the seeded order, prepare per shard, rows shuffled."""
    offsets = np.r_[0, np.cumsum(inputs.shard_rows())]
    out = []
    for k, shard in inputs.shards(shard_order(inputs.num_shards, epoch, s.seed)):
        step = Step(epoch=epoch, shard=k, offset=int(offsets[k]), seed=s.seed)
        rows = clipcap.prepare(shard, s, inputs.data, step)
        perm = np.random.default_rng([s.seed, epoch, k]).permutation(len(rows["caption_id"]))
        out += [clipcap.batch(model, rows, perm[i:i + s.batch_size], s, inputs.data, step)
                for i in range(0, len(perm), s.batch_size)]
    return out


@pytest.mark.parametrize("matched", [True, False])
def test_training_batches_pair_each_feature_with_its_partner_caption(art, model, matched):
    s = train_settings(matched=matched)
    inputs = runner.Inputs(clipcap.needs(s), "cpu")
    rows = art["rows"]
    assert inputs.data.corpus["group_id"] == [r["group_id"] for r in rows]
    text = l2_normalize(read_all(paths.TEXT_FEATURES, "text_feature"))
    for epoch in (0, 1):
        seen, partners = [], matched_partners(inputs.data.corpus["group_id"], epoch, s.seed)
        batches = epoch_batches(inputs, model, s, epoch)
        for batch in batches:
            src = text_row_of(batch["feature"].numpy(), text)
            want = [rows[partners[i]]["text"] if matched else rows[i]["text"] for i in src]
            tokens, lengths = model.causal.encode(want, s.max_len)
            assert torch.equal(batch["tokens"], tokens) and torch.equal(batch["lengths"], lengths)
            seen.extend(src.tolist())
        assert sorted(seen) == list(range(len(rows)))                       # each caption once per epoch
        again = epoch_batches(inputs, model, s, epoch)
        assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(batches, again))


def test_prepare_refuses_text_features_of_other_captions_than_the_corpus_rows(art):
    s = train_settings()
    inputs = runner.Inputs(clipcap.needs(s), "cpu")
    _, shard = next(inputs.shards([1]))
    assert clipcap.prepare(shard, s, inputs.data, Step(epoch=0, shard=1, offset=16, seed=0))["feature"].shape == (16, 64)
    with pytest.raises(ValueError, match="shard 1 of the text features holds other captions than rows 0"):
        clipcap.prepare(shard, s, inputs.data, Step(epoch=0, shard=1, offset=0, seed=0))


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


def test_training_noise_is_drawn_per_seed_epoch_and_shard(art):
    s = train_settings(noise_variance=0.016)
    inputs = runner.Inputs(clipcap.needs(s), "cpu")
    _, shard = next(inputs.shards([0]))
    noisy = lambda epoch, seed=0: clipcap.prepare(shard, train_settings(noise_variance=0.016, seed=seed),  # noqa
                                                  inputs.data, Step(epoch, 0, 0, seed))["feature"]
    clean = l2_normalize(shard["feature"])
    assert np.array_equal(noisy(0), noisy(0))                                # reproducible
    assert not np.array_equal(noisy(0), noisy(1)) and not np.array_equal(noisy(0), noisy(0, seed=1))
    np.testing.assert_allclose(np.linalg.norm(noisy(0), axis=1), 1.0, atol=1e-5)       # renormalised (CapDec code)
    expected = inject_noise(clean, 0.016, np.random.default_rng([0, 0, 0, 1]))
    np.testing.assert_array_equal(noisy(0), expected)
    off = clipcap.prepare(shard, train_settings(), inputs.data, Step(0, 0, 0, 0))["feature"]
    np.testing.assert_array_equal(off, clean)                                # no noise: the unit text features
    assert clipcap.prepare(shard, s, inputs.data, None) is shard             # captioning: corrections apply later


# ---------------------------------------------------------------------------------------------
# Inference corrections
# ---------------------------------------------------------------------------------------------
def test_needs_follow_the_correction():
    s = train_settings()
    assert clipcap.needs(s).rows == {"feature": "text.text_feature"}
    assert clipcap.needs(s).corpus == ("caption_id", "group_id", "text")
    assert clipcap.needs(s, caption_settings()).rows == {"feature": "image.global"}
    assert clipcap.needs(s, caption_settings(correction="mean")).means == ("text", "synthetic")
    assert clipcap.needs(s, caption_settings(correction="mean", mean_image_source="eval")).means == ("text", "eval")
    assert clipcap.needs(s, caption_settings(correction="projection", support="coco")).support == "coco"
    assert clipcap.needs(s, caption_settings()).support is None and clipcap.needs(s, caption_settings()).means == ()


@pytest.mark.parametrize("source", ["synthetic", "eval"])
def test_mean_alignment_equals_a_direct_computation(art, source):
    v = read_all(paths.eval_features("tiny"), "global")
    text = read_all(paths.TEXT_FEATURES, "text_feature")
    image = read_all(paths.SYNTHETIC_FEATURES if source == "synthetic" else paths.eval_features("tiny"), "global")
    unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)           # noqa: E731
    mu_t, mu_v = unit(text.astype(np.float64)).mean(0), unit(image.astype(np.float64)).mean(0)
    direct = unit(unit(v.astype(np.float64)) - mu_v + mu_t)
    caption = caption_settings(correction="mean", mean_image_source=source)
    data = Data(clip=art["clip"], feature_dim=64, means={"text": mu_t, source: mu_v})
    np.testing.assert_allclose(clipcap.correct(v, caption, data), direct, atol=1e-6)
    # the means the runner hands the method: streamed over the artifacts, float64
    inputs = runner.Inputs(clipcap.needs(train_settings(), caption), "cpu", evalset="tiny")
    assert set(inputs.data.means) == {"text", source}
    np.testing.assert_allclose(inputs.data.means["text"], mu_t, atol=1e-10)
    np.testing.assert_allclose(inputs.data.means[source], mu_v, atol=1e-10)
    np.testing.assert_allclose(mean_direction(np.array_split(text, 5)), mu_t, atol=1e-12)
    np.testing.assert_allclose(clipcap.correct(v, caption, inputs.data), direct, atol=1e-6)
    np.testing.assert_allclose(mean_shift(v, mu_t, mu_v), direct, atol=1e-6)
    # after the shift the image mean sits on the text mean (before renormalisation)
    np.testing.assert_allclose((unit(image) - mu_v + mu_t).mean(0), mu_t, atol=1e-7)


def test_decap_projection_path_equals_support_set_project(art):
    v = read_all(paths.eval_features("tiny"), "global")
    support = SupportSet.load(paths.support("corpus"))
    assert (support.tau, support.top_k) == (0.01, 8)                        # the corpus set's own settings
    raw = support.project(v, 0.01, top_k=8)
    data = Data(clip=art["clip"], feature_dim=64, support=support)
    plain = clipcap.correct(v, caption_settings(correction="projection", projection_renormalize=False), data)
    np.testing.assert_array_equal(plain, raw)
    renorm = clipcap.correct(v, caption_settings(correction="projection"), data)
    np.testing.assert_allclose(renorm, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)
    assert clipcap.correct(v * 3, caption_settings(), data) == pytest.approx(l2_normalize(v))
    inputs = runner.Inputs(clipcap.needs(train_settings(), caption_settings(correction="projection")), "cpu",
                           evalset="tiny")
    np.testing.assert_array_equal(inputs.data.support.project(v), raw)      # the set the runner opens


def softmax_over_the_whole_memory(v: np.ndarray, memory: np.ndarray, tau: float) -> np.ndarray:
    """Eq. 3 written out over every memory entry (DeCap's released ``softmax(sim * 100) @ text_features``), float64."""
    q, t = l2_normalize(v, np.float64), l2_normalize(memory, np.float64)
    out = np.zeros_like(q)
    for i in range(len(q)):
        logits = np.array([q[i] @ t[j] / tau for j in range(len(t))])
        w = np.exp(logits - logits.max())
        out[i] = (w[:, None] * t).sum(0) / w.sum()
    return out


def test_decaps_exact_projection_is_a_softmax_over_every_support_caption(art):
    """projection: exact (DeCap's released inference) ignores the set's top-k: the softmax-weighted sum over the
    whole memory; projection: top_k keeps the set's own top-k (8 of 61 here)."""
    v = read_all(paths.eval_features("tiny"), "global") * 3
    support = SupportSet.load(paths.support("corpus"))
    memory = read_all(paths.TEXT_FEATURES, "text_feature")
    assert support.top_k == 8 < len(memory) == support.n
    data = Data(clip=art["clip"], feature_dim=64, support=support)
    direct = softmax_over_the_whole_memory(v, memory, 0.01)
    exact = clipcap.correct(v, caption_settings(correction="projection", projection="exact",
                                                projection_renormalize=False), data)
    np.testing.assert_allclose(exact, direct, atol=2e-6)
    np.testing.assert_allclose(clipcap.correct(v, caption_settings(correction="projection", projection="exact"), data),
                               direct / np.linalg.norm(direct, axis=1, keepdims=True), atol=2e-6)
    top_k = clipcap.correct(v, caption_settings(correction="projection", projection_renormalize=False), data)
    np.testing.assert_array_equal(top_k, support.project(v, 0.01, top_k=8))
    assert caption_settings().projection == "top_k"
    with pytest.raises(cfg.ConfigError, match="projection"):
        caption_settings(projection="top_1000")


def test_the_support_agreement_stage_measures_real_eval_image_features(art, monkeypatch):
    """support_agreement@EVALSET: the corpus set's top-k projection against the exact one on the eval set's own
    image features (the queries projected at inference), as cosines computed here by hand."""
    from types import SimpleNamespace
    from stages import support as stage
    config = SimpleNamespace(evalsets={"tiny": None}, support=SimpleNamespace(agreement_sample=3))
    monkeypatch.setattr(stage, "start", lambda *a: config)
    stage.eval_agreement("tiny")
    report = json.loads(paths.support_agreement("tiny").read_text())
    queries = read_all(paths.eval_features("tiny"), "global")[:3]
    memory = read_all(paths.TEXT_FEATURES, "text_feature")
    support = SupportSet.load(paths.support("corpus"))
    top = l2_normalize(memory, np.float64)[np.argsort(-(l2_normalize(queries) @ l2_normalize(memory).T), axis=1)[:, :8]]
    q = l2_normalize(queries, np.float64)
    w = np.exp((np.einsum("qkd,qd->qk", top, q) - 1) / 0.01)
    approx = (w[..., None] * top).sum(1) / w.sum(1, keepdims=True)
    exact = softmax_over_the_whole_memory(queries, memory, 0.01)
    cos = (approx * exact).sum(1) / np.linalg.norm(approx, axis=1) / np.linalg.norm(exact, axis=1)
    got = report["top_k_vs_exact_cosine"]["eval images (tiny)"]
    assert got["n"] == 3 and got["top_k"] == 8 and report["support_size"] == support.n
    assert got["mean_cosine"] == pytest.approx(cos.mean(), abs=1e-6)
    assert got["min_cosine"] == pytest.approx(cos.min(), abs=1e-6)
    config.evalsets = {}
    with pytest.raises(SystemExit, match="no eval set 'tiny'"):
        stage.eval_agreement("tiny")


def test_corrections_refuse_features_of_another_clip_model(art):
    other = {**art["clip"], "weights_sha256": "0" * 64}
    write_other_clip_copy(paths.eval_features("tiny"), paths.eval_features("other"), other)
    for correction in ("mean", "projection"):
        needs = clipcap.needs(train_settings(), caption_settings(correction=correction))
        with pytest.raises(ModelMismatchError, match="000000000000"):
            runner.Inputs(needs, "cpu", evalset="other")


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


def test_decaps_start_token_follows_the_prefix_in_training_and_decoding():
    """start_token (the released DeCap's [prefix, SOT, words]): the loss and the greedy caption equal a
    direct computation on the LM with the start token's embedding after the prefix."""
    torch.manual_seed(0)
    m = clipcap.create(train_settings(start_token=True, prefix_hidden=0, prefix_length=1), {"feature_dim": 64}).eval()
    plain = clipcap.create(train_settings(prefix_hidden=0, prefix_length=1), {"feature_dim": 64}).eval()
    lm, feats = m.causal, torch.from_numpy(l2_normalize(np.random.default_rng(1).standard_normal((3, 64)))).float()
    with torch.no_grad():
        mapped = m.prefix_mlp(feats)                                                    # [3, 1, W]
        sot = lm.embed(torch.full((3, 1), lm.bos_id))
        assert m.prefix(feats).shape == (3, 2, lm.width) and plain.prefix(feats).shape == (3, 1, lm.width)
        torch.testing.assert_close(m.prefix(feats), torch.cat([mapped, sot], dim=1))
        tokens, lengths = lm.encode(["a dog runs on the grass", "two children", "a man rides a red bike"], 16)
        x = torch.cat([mapped, sot, lm.embed(tokens)], dim=1)
        mask = (torch.arange(x.shape[1])[None] < (2 + lengths)[:, None]).long()
        logits = lm.model(inputs_embeds=x, attention_mask=mask).logits[:, 1:1 + tokens.shape[1]]   # after SOT
        target = tokens.masked_fill(torch.arange(tokens.shape[1])[None] >= lengths[:, None], -100)
        direct = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                   ignore_index=-100)
        torch.testing.assert_close(m.loss({"feature": feats, "tokens": tokens, "lengths": lengths}), direct)
        for b in range(3):                                  # greedy from [prefix, SOT], by hand
            seq, ids = torch.cat([mapped[b:b + 1], sot[b:b + 1]], dim=1), []
            for _ in range(m.cfg.max_len):
                nxt = int(lm.model(inputs_embeds=seq).logits[0, -1].argmax())
                if nxt == lm.eos_id:
                    break
                ids.append(nxt)
                seq = torch.cat([seq, lm.embed(torch.tensor([[nxt]]))], dim=1)
            assert m.generate(feats[b:b + 1]) == [lm.decode(ids)]


def test_variant_labels_and_settings_validation():
    assert variant(*[cfg.parse(k, v, "x") for k, v in zip((clipcap.Train, clipcap.Caption),
                                                           VARIANTS["unsupervised-clipcap"])]) == "matched+mean"
    assert variant(train_settings(**VARIANTS["capdec"][0]), caption_settings(**VARIANTS["capdec"][1])) == "noise 0.016"
    assert variant(train_settings(**VARIANTS["decap"][0]), caption_settings(**VARIANTS["decap"][1])) == "projection"
    assert variant(clipcap.Train(), clipcap.Caption()) == "text only"
    assert variant(train_settings(matched=True), None) == "matched"         # the trained model's own label
    with pytest.raises(cfg.ConfigError, match=r"unknown key `methods.clipcap.caption.corection` \(did you mean `correction`"):
        caption_settings(corection="mean")
    with pytest.raises(cfg.ConfigError, match="correction"):
        caption_settings(correction="rotation")
    with pytest.raises(cfg.ConfigError, match="noise_variance"):
        train_settings(noise_variance=-1)


def test_decode_features_does_not_depend_on_the_batch(model):
    feats = l2_normalize(np.random.default_rng(0).standard_normal((5, 64)))
    assert decode_features(model, feats, 2, batch_size=2) == decode_features(model, feats, 2, batch_size=64)
    assert len(decode_features(model, feats[:0], 1)) == 0


# ---------------------------------------------------------------------------------------------
# Every variant through the runner's train / caption, checkpoints
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_each_variant_trains_its_loss_goes_down_and_captions_the_eval_images(art, name):
    inst = instance(name)
    report = runner.train(name, inst, "cpu", progress=False)
    loss = report["epoch_loss"]
    assert len(loss) == TINY["epochs"] and all(np.isfinite(loss))
    assert loss[-1] < loss[0] - 1.0, loss
    assert report["variant"] == variant(inst.train, None) and report["training_rows"] == N_CAPTIONS
    assert report["clip_model"] == art["clip"] and report["steps"] == 12
    header = runner.checkpoint_header(paths.model(name) / runner.MODEL_FILE)
    assert header["train"]["language_model"]["name"] == "synthcap-tiny-gpt2"
    captions = runner.caption(name, inst, "tiny", "cpu", progress=False)
    assert set(captions) == set(art["references"]) == set(art["eval_ids"])
    assert all(isinstance(c, str) for c in captions.values())


def test_checkpoint_round_trip_same_weights_logits_captions_and_another_clip_is_refused(art, tmp_path):
    inst = instance("capdec", epochs=1)
    runner.train("capdec", inst, "cpu", progress=False)
    path = paths.model("capdec") / runner.MODEL_FILE
    header = runner.checkpoint_header(path)
    assert header["train"]["prefix_length"] == 2 and header["clip_model"] == art["clip"]
    assert header["train"]["language_model"]["name"] == "synthcap-tiny-gpt2" and header["method"] == "clipcap"
    model, parsed = runner.load_checkpoint(path)
    assert parsed["train"] == inst.train
    assert b"pickle" not in path.read_bytes()[:200] and path.read_bytes()[:8] != b"PK\x03\x04"
    runner.save_checkpoint(model, tmp_path / "again.safetensors", header)
    again, _ = runner.load_checkpoint(tmp_path / "again.safetensors")
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    feats = l2_normalize(read_all(paths.eval_features("tiny"), "global"))
    tokens, lengths = model.causal.encode(["a dog runs"] * len(feats), 8)
    with torch.no_grad():
        batch = {"feature": torch.from_numpy(feats), "tokens": tokens, "lengths": lengths}
        assert torch.equal(model.loss(batch), again.loss(batch))
    assert decode_features(model, feats, 2) == decode_features(again, feats, 2)
    first = runner.caption("capdec", inst, "tiny", "cpu", progress=False)
    assert runner.caption("capdec", inst, "tiny", "cpu", progress=False) == first          # deterministic
    with pytest.raises(ValueError, match=r"other.safetensors is not a synthcap.checkpoint.v2 checkpoint"):
        from safetensors.torch import save_file
        save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"), metadata={"format": "other"})
        runner.load_checkpoint(tmp_path / "other.safetensors")

    # eval features of another CLIP model than the training text features: refused, by name
    runner.save_checkpoint(model, path, {**header, "clip_model": {**header["clip_model"], "name": "another-clip"}})
    with pytest.raises(ModelMismatchError, match="another-clip"):
        runner.caption("capdec", inst, "tiny", "cpu", progress=False)
