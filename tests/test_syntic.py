"""SynTIC: Eq. 2 (feature optimisation), Eq. 4-5 (auxiliary feature), the captioner, the method contract
(needs / prepare / batch: FO, FP with the support set's own tau and top-k, AF), checkpoints through the
runner, and training and captioning (with "-TT") through the runner on real captions."""
import json
from dataclasses import asdict, replace
import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline import config as cfg
from pipeline import paths, runner
from pipeline.data.shards import feature_array
from pipeline.data.vocabularies import TagVocabulary
from pipeline.methods import Data, Step, syntic
from pipeline.methods.syntic import (AuxiliaryFusion, SynTICCaptioner, SynTICConfig, contrastive_loss,
                                     epoch_minibatches, optimize_features)
from pipeline.nn import schedules
from pipeline.nn.prefix_decoder import DecoderConfig
from pipeline.nn.schedules import Optim
from pipeline.nn.tokenizer import CaptionTokenizer
from pipeline.support import SupportSet


pytestmark = pytest.mark.usefixtures("one_thread")


def pairs(n=12, d=8, seed=0, noise=1.0):
    rng = np.random.default_rng(seed)
    t = rng.standard_normal((n, d))
    s = t + noise * rng.standard_normal((n, d))          # image features near their caption
    return s * 2.5, t                                    # unnormalised on purpose


# ---- Eq. 2 ----------------------------------------------------------------------------------
def reference_loss(s, t, tau):
    """-(1/b) sum_i log( exp(f(s_i,t_i)/tau) / sum_j exp(f(s_i,t_j)/tau) ), f = cosine (Eq. 1)."""
    b = len(s)
    f = lambda a, c: float(np.dot(a, c) / (np.linalg.norm(a) * np.linalg.norm(c)))
    total = 0.0
    for i in range(b):
        denom = sum(math.exp(f(s[i], t[j]) / tau) for j in range(b))
        total += math.log(math.exp(f(s[i], t[i]) / tau) / denom)
    return -total / b


def analytic_grad(s, t, tau):
    """x_i = s_i/|s_i|: dL/dx_i = (1/(b tau)) (sum_j p_ij t^_j - t^_i); ds_i = (I - x_i x_i^T) dx_i / |s_i|."""
    b = len(s)
    ns = np.linalg.norm(s, axis=1, keepdims=True)
    x, th = s / ns, t / np.linalg.norm(t, axis=1, keepdims=True)
    z = x @ th.T / tau
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    dx = (p @ th - th) / (b * tau)
    g = np.empty_like(s)
    for i in range(b):
        g[i] = (np.eye(s.shape[1]) - np.outer(x[i], x[i])) @ dx[i] / ns[i, 0]
    return g


@pytest.mark.parametrize("tau", [0.01, 0.1, 1.0])
def test_contrastive_loss_matches_double_loop(tau):
    s, t = pairs(noise=3.0)
    got = contrastive_loss(torch.tensor(s), torch.tensor(t), tau).item()
    assert got == pytest.approx(reference_loss(s, t, tau), rel=1e-10, abs=1e-10)


@pytest.mark.parametrize("tau", [0.05, 1.0])
def test_contrastive_gradient_matches_analytic(tau):
    s, t = pairs(noise=2.0, seed=1)
    S = torch.tensor(s, requires_grad=True)
    contrastive_loss(S, torch.tensor(t), tau).backward()
    np.testing.assert_allclose(S.grad.numpy(), analytic_grad(s, t, tau), rtol=1e-9, atol=1e-12)


def mean_loss(feats, text, batches, tau):
    return np.mean([contrastive_loss(torch.tensor(feats[i]), torch.tensor(text[i]), tau).item()
                    for i in batches if len(i) > 1])


def test_optimize_features_lowers_loss_keeps_norm_reports_the_move_and_is_deterministic():
    s, t = pairs(n=40, d=16, seed=2, noise=2.0)
    s, t = s.astype(np.float32), t.astype(np.float32)
    kw = dict(tau=0.1, lr=1e-2, epochs=20, batch_size=8, seed=3)
    out, report = optimize_features(s, t, **kw)
    assert out.dtype == np.float32 and out.shape == s.shape
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    batches = [b for e in range(3) for b in epoch_minibatches(40, 8, 99, e)]      # batches it never saw
    assert mean_loss(out, t, batches, 0.1) < mean_loss(s, t, batches, 0.1) - 0.1
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)                # noqa: E731
    assert report["steps"] == 20 * 5 and report["rows"] == 40
    assert report["mean_move"] == pytest.approx(np.linalg.norm(out - unit(s), axis=1).mean(), rel=1e-5)
    assert report["mean_cosine_to_own_caption_before"] == pytest.approx((unit(s) * unit(t)).sum(1).mean(), rel=1e-5)
    assert report["mean_cosine_to_own_caption_after"] > report["mean_cosine_to_own_caption_before"]
    again, _ = optimize_features(s, t, **kw)
    assert again.tobytes() == out.tobytes()                                       # bitwise
    assert optimize_features(s, t, **{**kw, "seed": 4})[0].tobytes() != out.tobytes()


def test_each_feature_is_a_parameter_under_adam_updated_once_per_epoch():
    """Against a direct computation: a per-row Adam (its own moments and step count) stepping the
    rows of each of the epoch's mini-batches in turn."""
    s, t = pairs(n=10, d=6, seed=5)
    s, t = s.astype(np.float32), t.astype(np.float32)
    lr, tau, b = 1e-2, 0.2, 4
    out, _ = optimize_features(s, t, tau=tau, lr=lr, epochs=3, batch_size=b, seed=1)
    x, m, v, k = s.astype(np.float64), np.zeros_like(s, np.float64), np.zeros_like(s, np.float64), np.zeros(10)
    for epoch in range(3):
        for idx in epoch_minibatches(10, b, 1, epoch):
            if len(idx) < 2:
                continue                                                          # a batch of one: loss 0
            X = torch.tensor(x[idx], requires_grad=True)
            contrastive_loss(X, torch.tensor(t[idx], dtype=torch.float64), tau).backward()
            g = X.grad.numpy()
            m[idx] = 0.9 * m[idx] + 0.1 * g
            v[idx] = 0.999 * v[idx] + 0.001 * g * g
            k[idx] += 1
            m_hat = m[idx] / (1 - 0.9 ** k[idx])[:, None]
            v_hat = v[idx] / (1 - 0.999 ** k[idx])[:, None]
            x[idx] -= lr * m_hat / (np.sqrt(v_hat) + 1e-8)
    np.testing.assert_allclose(out, x / np.linalg.norm(x, axis=1, keepdims=True), atol=2e-5)
    assert (k == 3).sum() >= 7                                                    # almost every row, once per epoch


def test_corpus_wide_batches_hold_captions_of_one_image_no_more_often_than_chance():
    """Five captions per image sit in consecutive corpus rows; cutting fixed batches from consecutive
    rows made them each other's negatives every time. Reshuffled corpus-wide, a pair of paraphrases
    shares a batch with probability (b - 1) / (n - 1), as for any two captions."""
    n, b, per_image = 1000, 50, 5
    group = np.arange(n) // per_image
    pairs_total = n // per_image * per_image * (per_image - 1) // 2
    chance = pairs_total * (b - 1) / (n - 1)
    counts = []
    for epoch in range(20):
        same = 0
        for idx in epoch_minibatches(n, b, 0, epoch):
            _, sizes = np.unique(group[idx], return_counts=True)
            same += int((sizes * (sizes - 1) // 2).sum())
        counts.append(same)
    assert np.mean(counts) == pytest.approx(chance, rel=0.2)
    consecutive = sum(int((np.unique(group[i:i + b], return_counts=True)[1] ** 2 - 5).sum() // 2)
                      for i in range(0, n, b))
    assert consecutive == pairs_total > 10 * chance                           # the old fixed batches
    assert epoch_minibatches(n, b, 0, 0)[0].tolist() != epoch_minibatches(n, b, 0, 1)[0].tolist()


def test_optimize_features_zero_epochs_returns_normalised_inputs():
    s, t = pairs(n=10, d=8, seed=6)
    out, report = optimize_features(s.astype(np.float32), t.astype(np.float32), epochs=0, batch_size=4)
    np.testing.assert_allclose(out, s / np.linalg.norm(s, axis=1, keepdims=True), atol=1e-7)
    assert report["mean_move"] == pytest.approx(0.0, abs=1e-6)


# ---- Eq. 5 ----------------------------------------------------------------------------------
def manual_mha(fusion, query, tags):
    """softmax(Q K^T / sqrt(d_h)) V per head from the module's own projections, one row."""
    attn = fusion.attn
    D, H = query.shape[-1], attn.num_heads
    dh = D // H
    Wq, Wk, Wv = attn.in_proj_weight.chunk(3)
    bq, bk, bv = attn.in_proj_bias.chunk(3)
    q, k, v = query @ Wq.T + bq, tags @ Wk.T + bk, tags @ Wv.T + bv    # [D], [m, D], [m, D]
    heads = []
    for h in range(H):
        sl = slice(h * dh, (h + 1) * dh)
        w = torch.softmax(k[:, sl] @ q[sl] / math.sqrt(dh), dim=0)
        heads.append(w @ v[:, sl])
    return torch.cat(heads) @ attn.out_proj.weight.T + attn.out_proj.bias


@pytest.fixture
def fusion():
    torch.manual_seed(0)
    f = AuxiliaryFusion(dim=8, heads=2).double().eval()
    with torch.no_grad():
        f.attn.in_proj_bias.normal_()
        f.attn.out_proj.bias.normal_()
    return f


def tag_batch(B=4, M=5, D=8, counts=(3, 0, 5, 1)):
    torch.manual_seed(1)
    query = torch.randn(B, D, dtype=torch.float64)
    tags = torch.randn(B, M, D, dtype=torch.float64)
    mask = torch.arange(M)[None, :] < torch.tensor(counts)[:, None]
    return query, tags, mask


def test_fusion_is_multihead_attention_over_valid_tags(fusion):
    query, tags, mask = tag_batch()
    u = fusion(query, tags, mask)
    assert u.shape == (4, 8)
    for b in range(4):
        m = int(mask[b].sum())
        ref = manual_mha(fusion, query[b], tags[b, :m] if m else fusion.no_object[None])
        torch.testing.assert_close(u[b], ref, rtol=1e-10, atol=1e-10)


def test_fusion_zero_tags_uses_the_no_object_embedding(fusion):
    query, tags, _ = tag_batch()
    none = fusion(query, tags[:, :0], torch.zeros(4, 0, dtype=torch.bool))   # M = 0 for all rows
    ref = torch.stack([manual_mha(fusion, q, fusion.no_object[None]) for q in query])
    torch.testing.assert_close(none, ref, rtol=1e-10, atol=1e-10)
    # the same as M > 0 with every tag masked
    torch.testing.assert_close(fusion(query, tags, torch.zeros(4, 5, dtype=torch.bool)), none)


def test_fusion_ignores_padding_and_no_object_when_tags_exist(fusion):
    query, tags, mask = tag_batch()
    u = fusion(query, tags, mask)
    garbage = torch.where(mask[..., None], tags, 1e3 * torch.randn_like(tags))
    torch.testing.assert_close(fusion(query, garbage, mask), u, rtol=0, atol=0)
    garbage[~mask] = float("nan")
    torch.testing.assert_close(fusion(query, garbage, mask), u, rtol=0, atol=0)
    with torch.no_grad():
        fusion.no_object.add_(1.0)
    u2 = fusion(query, tags, mask)
    has = mask.any(1)
    torch.testing.assert_close(u2[has], u[has], rtol=0, atol=0)
    assert (u2[~has] - u[~has]).abs().max() > 1e-3


# ---- Eq. 4: tag features from the tag vocabulary ---------------------------------------------
def tag_vocabulary(labels=("dog", "cat", "person", "kite"), dim=16, seed=0):
    feats = np.random.default_rng(seed).standard_normal((len(labels), dim)).astype(np.float32)
    return TagVocabulary(pa.table({"label": list(labels), "text_feature": feature_array(feats, "float32")})), feats


def test_tag_vocabulary_pads_and_masks_and_refuses_unknown_tags():
    vocab, feats = tag_vocabulary()
    tag_feats, mask = vocab.batch([["cat", "kite"], [], ["person"]])                    # O^t = {CLIP_t(o_i)}
    assert tag_feats.shape == (3, 2, 16) and mask.tolist() == [[True, True], [False, False], [True, False]]
    np.testing.assert_array_equal(tag_feats[0], feats[[1, 3]])
    np.testing.assert_array_equal(tag_feats[2, 0], feats[2])
    assert not tag_feats[1].any() and not tag_feats[2, 1].any()                         # padding is zero
    empty_feats, empty_mask = vocab.batch([[], []])
    assert empty_feats.shape == (2, 0, 16) and empty_mask.shape == (2, 0)
    with pytest.raises(KeyError, match="'zebra'"):
        vocab.batch([["zebra"]])


# ---- the captioner --------------------------------------------------------------------------
CAPTIONS = ["a cat sitting on a wooden bench", "two people flying a kite on the beach",
            "a bowl of fruit on a kitchen table", "a train stopped at a station platform"]


@pytest.fixture(scope="module")
def tok():
    return CaptionTokenizer()


@pytest.fixture(scope="module")
def small():
    """The decoder vocabulary of the captions (vocabulary: corpus): fast to train, same code."""
    return CaptionTokenizer.for_corpus("corpus", CAPTIONS)


def config(use_aux=True, dropout=0.0, vocab_size=49408):
    return SynTICConfig(feature_dim=16, aux_heads=2, use_aux=use_aux,
                        decoder=DecoderConfig(vocab_size=vocab_size, width=32, layers=1, heads=2, max_len=12,
                                              dropout=dropout))


def make_batch(tok, captions, seed=0, M=3):
    g = torch.Generator().manual_seed(seed)
    B = len(captions)
    tokens, lengths = tok.encode(captions, max_len=12)
    return {"feature": torch.randn(B, 16, generator=g), "aux_query": torch.randn(B, 16, generator=g),
            "tag_feats": torch.randn(B, M, 16, generator=g),
            "tag_mask": torch.arange(M)[None] < torch.arange(B)[:, None] % (M + 1),
            "tokens": tokens, "lengths": lengths}


def captioner(tok, **kw):
    torch.manual_seed(0)
    return SynTICCaptioner(config(vocab_size=tok.vocab_size, **kw), tok)


def infer(batch):
    return {k: v for k, v in batch.items() if k not in ("tokens", "lengths")}


def test_config_sets_prefix_len_and_round_trips_json():
    assert config(True).decoder.prefix_len == 2 and config(False).decoder.prefix_len == 1
    c = config(False)
    back = SynTICConfig(**json.loads(json.dumps(asdict(c))))  # a config as plain JSON
    assert back == c and isinstance(back.decoder, DecoderConfig)
    with pytest.raises(ValueError, match="vocab_size 49408 != tokenizer's"):
        SynTICCaptioner(config(), CaptionTokenizer.for_corpus("corpus", CAPTIONS))


@pytest.mark.parametrize("use_aux", [True, False])
def test_prefix_shapes_and_aux_matters(tok, use_aux):
    model = captioner(tok, use_aux=use_aux).eval()
    batch = make_batch(tok, CAPTIONS)
    assert model.prefix(batch).shape == (4, 2 if use_aux else 1, 32)
    other = dict(batch, tag_feats=batch["tag_feats"] + 1.0)
    changed = (model.loss(other) - model.loss(batch)).abs().item()
    assert (changed > 1e-6) == use_aux


def syntic_optimizer(model, lr=1e-2, weight_decay=0.0, warmup_steps=5):
    """SynTIC's training setup: AdamW, linear warm-up then constant, gradient norm clipped at 1."""
    return schedules.build(model, Optim(name="adamw", lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps))


def test_train_then_caption_reproduces_the_corpus(small):
    model = captioner(small)
    batch = make_batch(small, CAPTIONS)
    result = runner.fit(model, lambda epoch: [batch], 100, *syntic_optimizer(model), grad_clip=1.0, progress=False)
    hist = result["epoch_loss"]
    assert len(hist) == 100 and hist[-1] < 0.05 < hist[0]
    assert not model.training
    assert model.generate(infer(batch), beam_size=1) == CAPTIONS
    assert model.generate(infer(batch), beam_size=3, max_len=12) == CAPTIONS


def test_epoch_loss_averages_over_captions_and_generate_checks_max_len(small):
    batches = [make_batch(small, CAPTIONS[:3], seed=1), make_batch(small, CAPTIONS[3:], seed=2)]
    model = captioner(small)
    with torch.no_grad():
        expected = (3 * model.loss(batches[0]).item() + 1 * model.loss(batches[1]).item()) / 4
    (loss,) = runner.fit(model, lambda e: batches, 1, *syntic_optimizer(model, lr=0.0, warmup_steps=0),
                         progress=False)["epoch_loss"]                      # lr 0: the weights stay put
    assert loss == pytest.approx(expected, rel=1e-6)                        # caption-weighted mean of batch losses
    for bad in (1, 13):
        with pytest.raises(ValueError, match=r"max_len must be in \[2, 12\]"):
            model.generate(infer(batches[0]), max_len=bad)


# ---- the method contract: needs, prepare, batch ------------------------------------------------
TRAIN = {"aux_heads": 2, "vocabulary": "corpus",
         "decoder": {"width": 32, "layers": 1, "heads": 2, "max_len": 12, "dropout": 0.0}}


def train_settings(**kw):
    return cfg.parse(syntic.Train, {**TRAIN, **kw}, "methods.syntic.train")


def test_needs_and_variant_follow_the_table_4_switches():
    full = syntic.needs(train_settings())
    assert full.rows == {"text": "corpus.text", "image": "synthetic.global", "optimized": "optimized.global",
                         "tags": "synthetic_tags.labels"}
    assert full.support == "corpus" and full.tag_vocabulary and full.corpus == ("text",)
    base = syntic.needs(train_settings(fo=False, fp=False, af=False, vocabulary="full"))
    assert base.rows == {"text": "corpus.text", "image": "synthetic.global"}
    assert base.support is None and not base.tag_vocabulary and base.corpus == ()
    tt = syntic.Caption(support="coco")
    assert syntic.needs(train_settings(), tt).rows == {"image": "image.global", "tags": "image_tags.labels"}
    assert syntic.needs(train_settings(), tt).support == "coco"                    # "-TT": the target support set
    assert syntic.needs(train_settings(fp=False), tt).support is None
    assert syntic.variant(train_settings(), None) == "FO+FP+AF"
    assert syntic.variant(train_settings(fo=False, af=False), None) == "FP"
    assert syntic.variant(train_settings(fo=False, fp=False, af=False), None) == "Baseline"
    assert syntic.variant(train_settings(), tt) == "FO+FP+AF-TT"
    assert syntic.variant(train_settings(), syntic.Caption()) == "FO+FP+AF"
    assert syntic.variant(train_settings(fp=False), tt) == "FO+AF"                 # no projection, no -TT


@pytest.fixture(scope="module")
def contract_data():
    rng = np.random.default_rng(3)
    support = SupportSet.build(rng.standard_normal((50, 16)).astype(np.float32), tau=0.05, top_k=4)
    vocab, _ = tag_vocabulary()
    rows = {"caption_id": [f"c{i}" for i in range(4)], "text": CAPTIONS,
            "image": rng.standard_normal((4, 16)).astype(np.float32),
            "optimized": rng.standard_normal((4, 16)).astype(np.float32),
            "tags": [["cat"], [], ["person", "kite"], ["dog", "cat", "kite"]]}
    return Data(clip={"name": "x"}, feature_dim=16, corpus={"text": CAPTIONS}, support=support,
                tag_vocabulary=vocab), rows


def test_prepare_picks_fo_features_and_projects_with_the_support_sets_own_tau_and_top_k(contract_data):
    data, rows = contract_data
    step = Step(epoch=0, shard=0, offset=0, seed=0)
    out = syntic.prepare(rows, train_settings(), data, step)
    np.testing.assert_array_equal(out["v"], data.support.project(rows["optimized"], 0.05, top_k=4))   # FO + Eq. 3
    np.testing.assert_array_equal(out["query"], rows["optimized"])                # Eq. 5 query: s^v
    projected = syntic.prepare(rows, train_settings(aux_query="projected"), data, step)
    np.testing.assert_array_equal(projected["query"], out["v"])
    no_fo = {k: v for k, v in rows.items() if k != "optimized"}                   # needs() reads none without FO
    np.testing.assert_array_equal(syntic.prepare(no_fo, train_settings(fo=False), data, step)["v"],
                                  data.support.project(rows["image"], 0.05, top_k=4))
    np.testing.assert_array_equal(syntic.prepare(rows, train_settings(fp=False), data, step)["v"], rows["optimized"])
    at_caption = syntic.prepare({"image": rows["image"], "tags": rows["tags"]}, train_settings(), data, None)
    np.testing.assert_array_equal(at_caption["v"], data.support.project(rows["image"]))   # real image -> Eq. 3


def test_batch_holds_projected_features_tag_features_and_tokens(contract_data):
    data, rows = contract_data
    train = train_settings()
    facts = syntic.facts(train, data)
    assert facts == {"feature_dim": 16, "vocabulary": CaptionTokenizer.for_corpus("corpus", CAPTIONS).vocabulary}
    model = syntic.create(train, facts)
    prepared = syntic.prepare(rows, train, data, Step(0, 0, 0, 0))
    idx = np.array([3, 1, 2])
    batch = syntic.batch(model, prepared, idx, train, data, Step(0, 0, 0, 0))
    np.testing.assert_array_equal(batch["feature"].numpy(), prepared["v"][idx])
    np.testing.assert_array_equal(batch["aux_query"].numpy(), rows["optimized"][idx])
    tag_feats, tag_mask = data.tag_vocabulary.batch([rows["tags"][i] for i in idx])          # Eq. 4
    np.testing.assert_array_equal(batch["tag_feats"].numpy(), tag_feats)
    assert batch["tag_mask"].tolist() == tag_mask.tolist()
    tokens, lengths = model.tokenizer.encode([CAPTIONS[i] for i in idx], 12)
    longest = int(lengths.max())                  # cut after the longest caption (nn.tokenizer.to_longest)
    assert longest < 12 and (tokens[:, longest:] == model.tokenizer.pad_id).all()
    assert torch.equal(batch["tokens"], tokens[:, :longest]) and torch.equal(batch["lengths"], lengths)
    assert model.loss(batch).isfinite()
    assert "tag_feats" not in syntic.batch(syntic.create(train_settings(af=False), facts), prepared, idx,
                                           train_settings(af=False), data, Step(0, 0, 0, 0))


# ---- checkpoints (the runner's) -------------------------------------------------------------
def test_checkpoint_round_trip(tmp_path, contract_data):
    data, _ = contract_data
    train = train_settings(fo=False)
    facts = syntic.facts(train, data)
    torch.manual_seed(0)
    model = syntic.create(train, facts).eval()
    batch = make_batch(model.tokenizer, CAPTIONS)
    path = tmp_path / "model.safetensors"
    runner.save_checkpoint(model, path, {"method": "syntic", "train": cfg.as_dict(train), "facts": facts,
                                         "clip_model": {"name": "x"}})
    back, header = runner.load_checkpoint(path)
    assert header["train"] == train and back.cfg == model.cfg and not back.training
    assert back.tokenizer.vocabulary == model.tokenizer.vocabulary
    torch.testing.assert_close(back.decoder(back.prefix(batch), batch["tokens"]),
                               model.decoder(model.prefix(batch), batch["tokens"]), rtol=0, atol=0)
    assert back.generate(batch, beam_size=2) == model.generate(batch, beam_size=2)
    assert runner.checkpoint_header(path)["train"]["decoder"]["width"] == 32


def test_load_rejects_foreign_safetensors(tmp_path):
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match=r"other.safetensors is not a synthcap.checkpoint.v2 checkpoint"):
        runner.load_checkpoint(tmp_path / "other.safetensors")


# ---- training and captioning through the runner, on real captions -----------------------------
PIPELINE_TRAIN = {"aux_heads": 2, "vocabulary": "corpus",
                  "decoder": {"width": 32, "layers": 2, "heads": 2, "max_len": 24, "dropout": 0.1},
                  "epochs": 4, "batch_size": 16,
                  "optim": {"name": "adamw", "lr": 1e-2, "weight_decay": 0.01, "warmup_steps": 4, "grad_clip": 1.0},
                  "seed": 0}


def pipeline_instance(support="corpus", **train):
    return cfg.MethodInstance(method="syntic", train=cfg.parse(syntic.Train, {**PIPELINE_TRAIN, **train}, "t"),
                              caption=cfg.parse(syntic.Caption, {"beam_size": 2, "support": support}, "c"))


@pytest.fixture(scope="module")
def built(tmp_path_factory, shared_data):
    from test_runner import build_real_artifacts
    return build_real_artifacts(tmp_path_factory.mktemp("syntic-artifacts"), shared_data,
                                {"optimized", "tags", "support", "target"})


def test_pipeline_train_and_caption_on_real_captions(built, artifacts_root):
    from test_runner import use_real_artifacts
    art = use_real_artifacts(built, artifacts_root)
    inst = pipeline_instance()
    report = runner.train("syntic", inst, "cpu", progress=False)
    loss = report["epoch_loss"]
    assert report["variant"] == "FO+FP+AF" and report["training_rows"] == 61 and report["steps"] == 16
    assert report["clip_model"] == art["clip"] and report["facts"]["feature_dim"] == 64
    assert all(np.isfinite(loss)) and loss[-1] < loss[0] - 1.0, loss               # loss goes down on real captions
    # seeded: training again from the same inputs gives the saved weights
    model, _ = runner.load_checkpoint(paths.model("syntic") / runner.MODEL_FILE)
    again, _, _ = runner.train_model(syntic, inst.train, runner.Inputs(syntic.needs(inst.train), "cpu"),
                                     progress=False)
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b)

    captions = runner.caption("syntic", inst, "tiny", "cpu", progress=False)
    assert sorted(captions) == art["eval_ids"] and all(isinstance(c, str) for c in captions.values())
    tt = pipeline_instance(support="coco")                                         # "-TT": a target support set
    assert syntic.variant(tt.train, tt.caption) == "FO+FP+AF-TT"
    target = runner.caption("syntic", tt, "tiny", "cpu", progress=False)
    assert sorted(target) == art["eval_ids"]
    # what the eval images are projected onto at inference: each support set with its own tau and top-k
    inputs = runner.Inputs(syntic.needs(tt.train, tt.caption), "cpu", evalset="tiny")
    assert (inputs.data.support.tau, inputs.data.support.top_k, inputs.data.support.n) == (0.0125, 8, 200)


def test_projection_cache_serves_the_same_projection_and_keys_on_the_features(contract_data):
    data, rows = contract_data
    cache = syntic.ProjectionCache()
    first = cache.project(rows["optimized"], data.support)
    np.testing.assert_array_equal(first, data.support.project(rows["optimized"]))
    again = cache.project(rows["optimized"].copy(), data.support)                  # the same features: a hit
    assert cache.hits == 1
    np.testing.assert_array_equal(again, first)
    assert again.dtype == first.dtype and again.shape == first.shape
    other = rows["optimized"].copy()
    other[0, 0] += 1e-3                                                            # one value changed: a miss
    changed = cache.project(other, data.support)
    assert cache.hits == 1
    np.testing.assert_array_equal(changed, data.support.project(other))
    assert not np.array_equal(changed, first)


def test_prepare_caches_eq3_per_shard_at_training_only(contract_data):
    rows = contract_data[1]
    data = replace(contract_data[0], memo={})
    step = Step(epoch=0, shard=0, offset=0, seed=0)
    first = syntic.prepare(rows, train_settings(), data, step)["v"]
    second = syntic.prepare(rows, train_settings(), data, replace(step, epoch=1))["v"]
    assert data.memo["projection"].hits == 1
    np.testing.assert_array_equal(first, second)
    syntic.prepare(rows, train_settings(), data, None)                             # captioning: no cache
    assert data.memo["projection"].hits == 1
