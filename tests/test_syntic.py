"""SynTIC: Eq. 2 (feature optimisation), Eq. 5 (auxiliary feature), the captioner, checkpoints."""
import json
from dataclasses import asdict
import math

import numpy as np
import pytest
import torch

from pipeline.methods.syntic import (AuxiliaryFusion, SynTICCaptioner, SynTICConfig,
                                     caption_batches, contrastive_loss, load_checkpoint,
                                     minibatches, optimize_features, optimize_minibatch,
                                     save_checkpoint, train_syntic)
from pipeline.nn.prefix_decoder import CaptionTokenizer, DecoderConfig


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


def mean_batch_loss(feats, text, batches, tau):
    return np.mean([contrastive_loss(torch.tensor(feats[i]), torch.tensor(text[i]), tau).item()
                    for i in batches if len(i) > 1])


def test_optimize_features_lowers_loss_keeps_norm_and_is_deterministic():
    s, t = pairs(n=40, d=16, seed=2, noise=2.0)
    s, t = s.astype(np.float32), t.astype(np.float32)
    kw = dict(tau=0.1, lr=1e-2, steps=20, batch_size=8, seed=3)
    out = optimize_features(s, t, **kw)
    assert out.dtype == np.float32 and out.shape == s.shape
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-6)
    batches = minibatches(40, 8, seed=3)
    before, after = mean_batch_loss(s, t, batches, 0.1), mean_batch_loss(out, t, batches, 0.1)
    assert after < before - 0.1
    assert optimize_features(s, t, **kw).tobytes() == out.tobytes()          # bitwise
    assert optimize_features(s, t, **{**kw, "seed": 4}).tobytes() != out.tobytes()


def test_optimize_features_is_per_minibatch_so_it_can_be_sharded():
    s, t = pairs(n=21, d=8, seed=5)
    s, t = s.astype(np.float32), t.astype(np.float32)
    out = optimize_features(s, t, tau=0.1, lr=1e-2, steps=5, batch_size=4, seed=0)
    batches = minibatches(21, 4, seed=0)
    assert sorted(np.concatenate(batches).tolist()) == list(range(21))
    assert [len(b) for b in batches] == [4, 4, 4, 4, 4, 1]
    for idx in reversed(batches):                                              # any order, any worker
        raw = optimize_minibatch(s[idx], t[idx], 0.1, 1e-2, 5)
        part = raw / np.linalg.norm(raw, axis=1, keepdims=True)
        np.testing.assert_array_equal(part.astype(np.float32), out[idx])
    # the batch of one: returned as its normalised input
    single = batches[-1]
    np.testing.assert_allclose(out[single], s[single] / np.linalg.norm(s[single]), atol=1e-7)


def test_optimize_features_zero_steps_returns_normalised_inputs():
    s, t = pairs(n=10, d=8, seed=6)
    out = optimize_features(s.astype(np.float32), t.astype(np.float32), steps=0, batch_size=4)
    np.testing.assert_allclose(out, s / np.linalg.norm(s, axis=1, keepdims=True), atol=1e-7)


def test_single_adam_step_moves_each_coordinate_by_lr():
    s, t = pairs(n=6, d=8, seed=7, noise=2.0)
    s, t = s.astype(np.float32), t.astype(np.float32)
    lr, tau = 1e-3, 0.5
    moved = optimize_minibatch(s, t, tau=tau, lr=lr, steps=1) - s
    S = torch.tensor(s, requires_grad=True)
    contrastive_loss(S, torch.tensor(t), tau).backward()
    g = S.grad.numpy()
    big = np.abs(g) > 1e-5                     # Adam step 1: lr * g / (|g| + eps) ~ lr * sign(g)
    assert big.mean() > 0.9
    np.testing.assert_allclose(np.abs(moved[big]), lr, rtol=2e-3)
    assert (np.sign(moved[big]) == -np.sign(g[big])).all()
    assert (np.abs(moved) <= lr * 1.002).all()


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


# ---- the captioner --------------------------------------------------------------------------
CAPTIONS = ["a cat sitting on a wooden bench", "two people flying a kite on the beach",
            "a bowl of fruit on a kitchen table", "a train stopped at a station platform"]


@pytest.fixture(scope="module")
def tok():
    return CaptionTokenizer()


def config(use_aux=True, dropout=0.0):
    return SynTICConfig(feature_dim=16, aux_heads=2, use_aux=use_aux,
                        decoder=DecoderConfig(width=32, layers=1, heads=2, max_len=12, dropout=dropout))


def make_batch(tok, captions, seed=0, M=3):
    g = torch.Generator().manual_seed(seed)
    B = len(captions)
    tokens, lengths = tok.encode(captions, max_len=12)
    return {"feature": torch.randn(B, 16, generator=g), "aux_query": torch.randn(B, 16, generator=g),
            "tag_feats": torch.randn(B, M, 16, generator=g),
            "tag_mask": torch.arange(M)[None] < torch.arange(B)[:, None] % (M + 1),
            "tokens": tokens, "lengths": lengths}


def test_config_sets_prefix_len_and_round_trips_json():
    assert config(True).decoder.prefix_len == 2 and config(False).decoder.prefix_len == 1
    c = config(False)
    back = SynTICConfig(**json.loads(json.dumps(asdict(c))))  # as a checkpoint header stores it
    assert back == c and isinstance(back.decoder, DecoderConfig)


@pytest.mark.parametrize("use_aux", [True, False])
def test_prefix_shapes_and_aux_matters(tok, use_aux):
    torch.manual_seed(0)
    model = SynTICCaptioner(config(use_aux)).eval()
    batch = make_batch(tok, CAPTIONS)
    assert model.prefix(batch).shape == (4, 2 if use_aux else 1, 32)
    other = dict(batch, tag_feats=batch["tag_feats"] + 1.0)
    changed = (model.loss(other) - model.loss(batch)).abs().item()
    assert (changed > 1e-6) == use_aux


def test_train_then_caption_reproduces_the_corpus(tok):
    torch.manual_seed(0)
    model = SynTICCaptioner(config())
    batch = make_batch(tok, CAPTIONS)
    hist = train_syntic(model, lambda epoch: [batch], epochs=100, lr=1e-2, weight_decay=0.0,
                        warmup_steps=5, seed=0, progress=False)
    assert len(hist) == 100 and hist[-1] < 0.05 < hist[0]
    assert not model.training
    infer = {k: v for k, v in batch.items() if k not in ("tokens", "lengths")}
    assert caption_batches(model, [infer], beam_size=1, tokenizer=tok) == CAPTIONS
    assert caption_batches(model, [infer], beam_size=3, max_len=12, tokenizer=tok) == CAPTIONS


def test_train_is_seeded_and_averages_over_captions(tok):
    batches = [make_batch(tok, CAPTIONS[:3], seed=1), make_batch(tok, CAPTIONS[3:], seed=2)]
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = SynTICCaptioner(config(dropout=0.1))
        runs.append(train_syntic(model, lambda e: batches, epochs=2, lr=1e-3, weight_decay=0.01,
                                 warmup_steps=2, seed=7, progress=False))
    assert runs[0] == runs[1]
    # epoch loss = caption-weighted mean of the batch losses (checked with lr = 0)
    torch.manual_seed(0)
    model = SynTICCaptioner(config())
    (loss,) = train_syntic(model, lambda e: batches, epochs=1, lr=0.0, progress=False)
    with torch.no_grad():
        expected = (3 * model.loss(batches[0]).item() + 1 * model.loss(batches[1]).item()) / 4
    assert loss == pytest.approx(expected, rel=1e-6)


def test_checkpoint_round_trip(tok, tmp_path):
    torch.manual_seed(0)
    cfg = config()
    model = SynTICCaptioner(cfg).eval()
    batch = make_batch(tok, CAPTIONS)
    path = tmp_path / "syntic.safetensors"
    save_checkpoint(model, cfg, path)
    back = load_checkpoint(path)
    assert back.cfg == cfg and not back.training
    torch.testing.assert_close(back.decoder(back.prefix(batch), batch["tokens"]),
                               model.decoder(model.prefix(batch), batch["tokens"]), rtol=0, atol=0)
    assert back.generate(batch, beam_size=2) == model.generate(batch, beam_size=2)
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["synthcap"])["config"]["decoder"]["width"] == 32


def test_load_rejects_foreign_safetensors(tmp_path):
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match=r"other.safetensors is not a synthcap.syntic.v1 checkpoint"):
        load_checkpoint(tmp_path / "other.safetensors")
