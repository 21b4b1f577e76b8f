"""MacCap (pipeline/methods/maccap.py): each equation against a direct computation on hand-sized tensors
(Eq. 3-4 region noise, Eq. 5-8 adaptor, Eq. 10-13 sub-region aggregation), the CLIP re-ranker, seeded
inference noise, the cached attention map (pipeline/models/clip.py, the runner's reshape), checkpoints
without the frozen LM (pipeline/runner.py), training and captioning through the runner on real Flickr8k
captions, the Table 5 switches and the paper profile against ../shared/docs/METHODS.md."""
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from conftest import methods_md_section
from pipeline import config as cfg
from pipeline import paths, runner
from pipeline.data.shards import ShardedArtifact, write_sharded
from pipeline.methods import maccap
from pipeline.methods.maccap import (Adaptor, add_noise, cls_features, image_generator, noisy_samples, region_noise,
                                     rerank, subregion_features, variant)
from pipeline.models import weights_sha256
from pipeline.profiles import resolve_profile

REPO = Path(__file__).resolve().parents[1]
N_CAPTIONS, N_IMAGES, TOKENS = 61, 4, 17          # 12 Flickr8k photos x 5 captions + 1; tiny ViT: 16 patches + CLS
TINY = {"language_model": {"name": "synthcap-tiny-gpt2", "pretrained": None, "seed": 0},
        "n_cr": 4, "queries": 3, "heads": 2, "ffn_dim": 32, "max_len": 12, "epochs": 3, "batch_size": 16,
        "optim": {"name": "adamw", "lr": 3e-3, "schedule": "constant", "grad_clip": 1.0}, "seed": 0}
TINY_CAPTION = {"samples": 3, "beam_size": 2, "max_new_tokens": 6, "batch_size": 3, "decode_batch_size": 4}

pytestmark = pytest.mark.usefixtures("one_thread")


def train_settings(**kw) -> maccap.Train:
    return cfg.parse(maccap.Train, {**TINY, **kw}, "methods.maccap.train")


def caption_settings(**kw) -> maccap.Caption:
    return cfg.parse(maccap.Caption, {**TINY_CAPTION, **kw}, "methods.maccap.caption")


def unit(x):
    return x / x.norm(dim=-1, keepdim=True)


# ---------------------------------------------------------------------------------------------
# Eq. 3-4: region noise injection
# ---------------------------------------------------------------------------------------------
def test_region_noise_has_variance_sigma2_unit_norm_and_independent_copies():
    t = unit(torch.randn(300, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    out = region_noise(t, 10, 0.016, torch.Generator().manual_seed(1))
    assert out.shape == (300, 10, 64)
    n = torch.randn(300, 10, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * math.sqrt(0.016)
    torch.testing.assert_close(out, unit(t[:, None, :] + n))                 # Eq. 4: L2Norm(T_c + n_i), same draw
    assert abs(n.mean().item()) < 2e-3 and n.var().item() == pytest.approx(0.016, rel=0.02)   # sigma^2, not sigma
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(300, 10, dtype=torch.float64))
    c = torch.corrcoef(torch.stack([n[:, 0].reshape(-1), n[:, 1].reshape(-1)]))[0, 1]
    assert abs(c.item()) < 0.02                                               # each copy its own noise
    assert (out[:, 0] - out[:, 1]).abs().max() > 0.1
    g = torch.Generator().manual_seed(5)
    state = g.get_state()
    clean = region_noise(t[:3], 4, 0.0, g)                                    # w/o noise: N_cr equal unit copies
    assert torch.equal(g.get_state(), state)
    torch.testing.assert_close(clean, t[:3, None, :].expand(3, 4, 64), rtol=0, atol=1e-15)
    with pytest.raises(ValueError):
        add_noise(t, -1.0)


# ---------------------------------------------------------------------------------------------
# Eq. 5-8: the adaptor decoder
# ---------------------------------------------------------------------------------------------
def test_adaptor_is_a_post_norm_decoder_layer_a_final_norm_and_a_three_layer_mlp():
    torch.manual_seed(0)
    D, lm_width = 16, 24
    adaptor = Adaptor(D, lm_width, queries=5, heads=4, layers=1, ffn_dim=32, dropout=0.1, mlp_layers=3).eval()
    memory = unit(torch.randn(3, 7, D))
    out = adaptor(memory)
    assert out.shape == (3, 5, lm_width)                                      # E in R^{N_q x D_l}
    assert [(m.in_features, m.out_features) for m in adaptor.mlp] == [(D, D), (D, D), (D, lm_width)]
    # reference: torch's own post-norm decoder layer with the same weights (no positional embeddings)
    ref = torch.nn.TransformerDecoderLayer(D, 4, 32, dropout=0.1, activation="relu", batch_first=True,
                                           norm_first=False).eval()
    layer = adaptor.layers[0]
    pairs = {"self_attn": layer.self_attn, "multihead_attn": layer.cross_attn, "linear1": layer.linear1,
             "linear2": layer.linear2, "norm1": layer.norm1, "norm2": layer.norm2, "norm3": layer.norm3}
    for name, module in pairs.items():
        getattr(ref, name).load_state_dict(module.state_dict())
    q = adaptor.queries.weight.unsqueeze(0).expand(3, -1, -1)
    x = adaptor.norm(ref(q, memory))                                          # Eq. 5-7 + the final LayerNorm
    x = adaptor.mlp[2](F.relu(adaptor.mlp[1](F.relu(adaptor.mlp[0](x)))))    # Eq. 8
    torch.testing.assert_close(out, x)
    assert Adaptor(D, lm_width, width=8, heads=2, ffn_dim=16)(memory).shape == (3, 32, lm_width)   # width != D


def test_a_training_step_moves_the_adaptor_only_the_frozen_lm_stays_bitwise_equal():
    s = train_settings()
    model = maccap.create(s, {"feature_dim": 64})
    assert model.frozen_pretrained["lm"]["weights_sha256"] == weights_sha256(model.lm)
    lm_before = {k: v.clone() for k, v in model.lm.state_dict().items()}
    adaptor_before = {k: v.clone() for k, v in model.adaptor.state_dict().items()}
    from pipeline.nn import schedules
    optimizer, scheduler = schedules.build(model, s.optim, total_steps=2)
    assert all(not p.requires_grad for p in model.lm.parameters())
    texts = ["a dog runs on the grass", "two children play in the snow"] * 4
    tokens, lengths = model.causal.encode(texts, s.max_len)
    batch = {"feature": unit(torch.randn(8, 64)), "tokens": tokens, "lengths": lengths}
    model.train()
    assert model.adaptor.training and not model.lm.training                  # a frozen LM keeps dropout off
    for _ in range(2):
        loss = model.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
    assert all(torch.equal(v, lm_before[k]) for k, v in model.lm.state_dict().items())
    changed = [k for k, v in model.adaptor.state_dict().items() if not torch.equal(v, adaptor_before[k])]
    assert len(changed) == len(adaptor_before), set(adaptor_before) - set(changed)
    trained = maccap.create(train_settings(freeze_lm=False), {"feature_dim": 64})
    assert trained.frozen_pretrained == {} and all(p.requires_grad for p in trained.lm.parameters())


def test_corpus_vocabulary_builds_the_small_lm_over_the_corpus_tokens_only():
    from pipeline.models.language_model import corpus_vocabulary, tokenizer_of
    s = train_settings(vocabulary="corpus", freeze_lm=False)
    texts = ["a dog runs", "a red car"]
    vocab = corpus_vocabulary(tokenizer_of("synthcap-tiny-gpt2", None), texts)
    model = maccap.create(s, {"feature_dim": 64, "vocabulary": vocab}).eval()
    assert model.causal.vocab_size == len(vocab) < 20                         # the output layer: corpus ids only
    tokens, lengths = model.causal.encode(texts, 6)
    assert model.loss({"feature": unit(torch.randn(2, 64)), "tokens": tokens, "lengths": lengths}).item() < math.log(20)
    for text in model.generate(unit(torch.randn(3, 4, 64)), 2, 5):
        assert set(text.split()) <= {"a", "dog", "runs", "red", "car"}
    with pytest.raises(ValueError, match="restricted vocabulary"):             # a pretrained LM keeps its own
        maccap.create(train_settings(language_model={"name": "gpt2", "pretrained": "/nonexistent"}),
                      {"feature_dim": 64, "vocabulary": vocab})


def test_the_start_token_follows_the_prefix_in_training_and_decoding():
    """start_token (the released [E, </s>, caption]): the loss and the greedy caption equal a direct
    computation on the LM with the start token's embedding after the adaptor's prefix; off, the prefix
    alone comes before the caption."""
    torch.manual_seed(0)
    m = maccap.create(train_settings(), {"feature_dim": 64}).eval()
    assert maccap.Train().start_token and m.cfg.start_token                  # the released behaviour, the default
    plain = maccap.create(train_settings(start_token=False), {"feature_dim": 64}).eval()
    lm, memory = m.causal, unit(torch.randn(3, 4, 64, generator=torch.Generator().manual_seed(1)))
    assert lm.bos_id == lm.tokenizer.bos_token_id != lm.eos_id               # CLIP BPE's <|startoftext|>
    with torch.no_grad():
        e = m.adaptor(memory)                                                 # Eq. 5-8: [3, N_q, W]
        bos = lm.embed(torch.full((3, 1), lm.bos_id))
        torch.testing.assert_close(m.prefix(memory), torch.cat([e, bos], dim=1))
        torch.testing.assert_close(plain.prefix(memory), plain.adaptor(memory))
        tokens, lengths = lm.encode(["a dog runs on the grass", "two children", "a man rides a red bike"], 12)
        P = e.shape[1] + 1
        x = torch.cat([e, bos, lm.embed(tokens)], dim=1)
        mask = (torch.arange(x.shape[1])[None] < (P + lengths)[:, None]).long()
        logits = lm.model(inputs_embeds=x, attention_mask=mask).logits[:, P - 1:P - 1 + tokens.shape[1]]   # from </s> on
        target = tokens.masked_fill(torch.arange(tokens.shape[1])[None] >= lengths[:, None], -100)
        direct = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)
        feature = memory[:, 0]                                                # T_c; no noise: N_cr equal copies
        no_noise = maccap.create(train_settings(noise_variance=0.0), {"feature_dim": 64}).eval()
        e0 = no_noise.adaptor(feature[:, None].expand(3, 4, 64))
        x0 = torch.cat([e0, bos, lm.embed(tokens)], dim=1)
        logits0 = lm.model(inputs_embeds=x0, attention_mask=mask).logits[:, P - 1:P - 1 + tokens.shape[1]]
        direct0 = F.cross_entropy(logits0.reshape(-1, logits0.shape[-1]), target.reshape(-1), ignore_index=-100)
        torch.testing.assert_close(no_noise.loss({"feature": feature, "tokens": tokens, "lengths": lengths}), direct0)
        assert not torch.allclose(direct0, direct)                             # the loss reads the memory
        for b in range(3):                                                    # greedy from [E, </s>], by hand
            seq, ids = torch.cat([e[b:b + 1], bos[b:b + 1]], dim=1), []
            for _ in range(6):
                nxt = int(lm.model(inputs_embeds=seq).logits[0, -1].argmax())
                if nxt == lm.eos_id:
                    break
                ids.append(nxt)
                seq = torch.cat([seq, lm.embed(torch.tensor([[nxt]]))], dim=1)
            assert m.generate(memory[b:b + 1], beam_size=1, max_new_tokens=6) == [lm.decode(ids)]


# ---------------------------------------------------------------------------------------------
# Eq. 10-13: sub-region feature aggregation
# ---------------------------------------------------------------------------------------------
def attention_maps(B, T, generator):
    """Row-stochastic maps with distinct entries; image 0's CLS attends most to itself (CLS eligible)."""
    logits = torch.randn(B, T, T, generator=generator) * 2
    logits[0, 0, 0] = 10.0
    return logits.softmax(-1)


@pytest.mark.parametrize("resoftmax", [True, False])
def test_subregion_aggregation_equals_an_explicit_loop_over_the_selected_tokens(resoftmax):
    g = torch.Generator().manual_seed(0)
    B, N_p, D, n_cr = 3, 8, 5, 4
    global_ = unit(torch.randn(B, D, generator=g))
    patches = torch.randn(B, N_p, D, generator=g) * 3                         # projected, not normalised
    attention = attention_maps(B, N_p + 1, g)
    out = subregion_features(global_, patches, attention, n_cr, resoftmax)
    assert out.shape == (B, n_cr, D)
    for b in range(B):
        tokens = [global_[b] / global_[b].norm()] + [p / p.norm() for p in patches[b]]      # Eq. 10-11
        cls_row = attention[b, 0].tolist()
        top = sorted(range(N_p + 1), key=lambda j: -cls_row[j])[:n_cr]
        if b == 0:
            assert top[0] == 0                                                # the CLS token itself
        for k, j in enumerate(top):
            a = attention[b, j]
            a = torch.exp(a) / torch.exp(a).sum() if resoftmax else a
            i_s = sum(a[m] * tokens[m] for m in range(N_p + 1))               # Eq. 12
            i_s = i_s / i_s.norm()
            i_cr = i_s + tokens[0]                                            # Eq. 13: the sum, unnormalised
            torch.testing.assert_close(out[b, k], i_cr)
            assert i_cr.norm() <= 2.0 + 1e-6                                 # two unit vectors
    cls_only = cls_features(global_ * 2, n_cr)                                # Table 5's "CLS token"
    assert cls_only.shape == (B, n_cr, D) and torch.allclose(cls_only, global_[:, None].expand(B, n_cr, D))
    with pytest.raises(ValueError, match="only 9 tokens"):
        subregion_features(global_, patches, attention, 10)


# ---------------------------------------------------------------------------------------------
# Multiple sampling and filtering
# ---------------------------------------------------------------------------------------------
def test_rerank_keeps_the_candidate_closest_to_the_image_in_one_encoder_call_of_80_characters():
    vectors = {"a dog": [1, 0, 0, 0], "a cat": [0, 1, 0, 0], "a car": [0, 0, 1, 0], "x" * 80: [0, 0, 0, 1],
               "a bus": [1, 1, 0, 0]}
    calls = []

    def encode(texts):
        calls.append(list(texts))
        return np.array([vectors[t] for t in texts], dtype=np.float32)

    images = np.array([[0.1, 0.9, 0, 0], [0, 0, 0, 5.0], [2, 2, 0, 0.1]], dtype=np.float32)
    candidates = [["a dog", "a cat", "a car"], ["a dog", "x" * 200], ["a dog", "a bus", "a cat"]]
    assert rerank(candidates, images, encode) == ["a cat", "x" * 200, "a bus"]
    assert len(calls) == 1 and len(calls[0]) == 8 and max(map(len, calls[0])) == 80      # one call, cut to 80
    assert rerank([["a dog", "a dog"]], images[:1], encode) == ["a dog"]      # a tie: the first
    with pytest.raises(ValueError):
        rerank([[]], images[:1], encode)


def test_inference_noise_is_added_to_the_unnormalised_sum_then_normalised():
    """The released MacCap.generate: normalize(I_c + I_s + n), n ~ N(0, 0.016 I), on the sum (norm 1.5-2 when
    the sub-regions lie near the CLS, as in CLIP), not on its unit direction: the samples stay closer to I_cr."""
    g = torch.Generator().manual_seed(0)
    B, N_p, D, n_cr = 2, 16, 512, 6
    global_, patches = unit(torch.randn(B, D, generator=g)), torch.randn(B, N_p, D, generator=g)
    patches = unit(patches + 3 * global_[:, None])                            # sub-regions near the CLS, as in CLIP
    i_cr = subregion_features(global_, patches, attention_maps(B, N_p + 1, g), n_cr)
    norms = i_cr.norm(dim=-1)
    assert (norms > 1.5).all() and (norms <= 2.0).all()
    out = noisy_samples(i_cr[0], 500, 0.016, torch.Generator().manual_seed(3))
    n = torch.randn(500, n_cr, D, generator=torch.Generator().manual_seed(3)) * math.sqrt(0.016)
    torch.testing.assert_close(out, unit(i_cr[0] + n))                       # one draw, on the sum, then unit
    assert n.var().item() == pytest.approx(0.016, rel=0.02)
    # the cosine of a noisy sample to the clean direction: |s| / sqrt(|s|^2 + D sigma^2) for a vector s of norm |s|
    direction, spread = unit(i_cr[0]), D * 0.016
    expected = lambda norm: (norm / (norm ** 2 + spread).sqrt()).mean().item()   # noqa: E731
    assert (out * direction).sum(-1).mean().item() == pytest.approx(expected(norms[0]), rel=0.02)
    on_unit = unit(direction + n)                                             # the noise after normalising instead
    assert (on_unit * direction).sum(-1).mean().item() == pytest.approx(expected(torch.ones(n_cr)), rel=0.02)
    assert expected(norms[0]) > 1.5 * expected(torch.ones(n_cr))              # the released noise is the weaker


def test_inference_noise_is_seeded_by_image_id_and_applied_for_one_sample_too():
    i_cr = unit(torch.randn(4, 8))
    a = noisy_samples(i_cr, 5, 0.016, image_generator(0, "img1.jpg"))
    assert a.shape == (5, 4, 8) and torch.equal(a, noisy_samples(i_cr, 5, 0.016, image_generator(0, "img1.jpg")))
    assert not torch.equal(a, noisy_samples(i_cr, 5, 0.016, image_generator(0, "img2.jpg")))
    assert not torch.equal(a, noisy_samples(i_cr, 5, 0.016, image_generator(1, "img1.jpg")))
    assert not torch.allclose(a[0], a[1])                                     # S different samples
    one = noisy_samples(i_cr, 1, 0.016, image_generator(0, "img1.jpg"))
    assert not torch.allclose(one[0], i_cr) and torch.allclose(one.norm(dim=-1), torch.ones(1, 4))


# ---------------------------------------------------------------------------------------------
# The cached attention map
# ---------------------------------------------------------------------------------------------
def test_clip_attention_map_matches_a_direct_computation_and_is_computed_only_when_asked(shared_data):
    from pipeline.models.clip import load_clip
    from PIL import Image
    clip = load_clip("synthcap-tiny-vit", seed=0)
    images = [Image.open(p).convert("RGB") for p in sorted((shared_data / "flickr8k" / "images").glob("*.jpg"))[:2]]
    pixels = torch.stack([clip.preprocess(im) for im in images])
    out = clip.encode_pixels(pixels)
    visual = clip.model.visual
    with torch.no_grad():
        x = visual._embeds(pixels)
        for block in visual.transformer.resblocks[:-1]:
            x = block(x)
        h = visual.transformer.resblocks[-1].ln_1(x)
        attn = visual.transformer.resblocks[-1].attn
        q, k, _ = F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        split = lambda t: t.reshape(t.shape[0], t.shape[1], attn.num_heads, -1).transpose(1, 2)   # noqa: E731
        weights = torch.softmax(split(q) @ split(k).transpose(-1, -2) / (q.shape[-1] // attn.num_heads) ** 0.5,
                                -1).mean(1)
    assert out["attention"].shape == (2, TOKENS, TOKENS)
    np.testing.assert_allclose(out["attention"], weights.numpy(), atol=1e-5)
    np.testing.assert_array_equal(out["attention"][:, 0, 1:], out["cls_attention"])
    np.testing.assert_allclose(out["attention"].sum(-1), 1, atol=1e-5)
    calls = []
    hook = visual.transformer.resblocks[-1].attn.register_forward_hook(lambda *a: calls.append(1))
    try:
        lean = clip.encode_pixels(pixels, ("global", "patches"))             # synthetic images: no attention pass
        assert set(lean) == {"global", "patches"} and len(calls) == 1         # the tower's own forward only
        np.testing.assert_array_equal(lean["global"], out["global"])
    finally:
        hook.remove()
    with pytest.raises(ValueError, match="unknown image feature"):
        clip.encode_pixels(pixels, ("global", "attn"))


# ---------------------------------------------------------------------------------------------
# Through the runner, on artifacts built from real data (tests/test_runner.py)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(tmp_path_factory, shared_data):
    from test_runner import build_real_artifacts
    return build_real_artifacts(tmp_path_factory.mktemp("maccap-artifacts"), shared_data, set(), n_eval=N_IMAGES)


@pytest.fixture
def art(built, artifacts_root):
    from test_runner import use_real_artifacts
    return use_real_artifacts(built, artifacts_root)


def test_needs_follow_the_switches():
    s = train_settings()
    assert maccap.needs(s).rows == {"feature": "text.text_feature", "text": "corpus.text"}
    assert maccap.needs(s).corpus == () and maccap.needs(train_settings(vocabulary="corpus")).corpus == ("text",)
    full = maccap.needs(s, caption_settings())
    assert full.rows == {"id": "image.image_id", "global": "image.global", "patches": "image.patches",
                         "attention": "image.attention"} and full.text_encoder
    cls_one = maccap.needs(s, caption_settings(aggregation="cls", samples=1))
    assert cls_one.rows == {"id": "image.image_id", "global": "image.global"} and not cls_one.text_encoder


def test_the_runner_hands_attention_maps_as_square_matrices_and_refuses_artifacts_without_them(art):
    inputs = runner.Inputs(maccap.needs(train_settings(), caption_settings()), "cpu", evalset="tiny")
    assert inputs.data.num_tokens == TOKENS and inputs.data.num_patches == TOKENS - 1
    assert inputs.data.text_encoder is not None
    _, rows = next(inputs.shards())
    assert rows["attention"].shape == (N_IMAGES, TOKENS, TOKENS) and rows["patches"].shape == (N_IMAGES, 16, 64)
    assert rows["id"] == rows["image_id"] == art["eval_ids"]
    np.testing.assert_allclose(rows["attention"].sum(-1), 1, atol=5e-3)      # float16 in the cache
    folder = paths.eval_features("tiny")
    source = ShardedArtifact(folder)
    meta = {k: v for k, v in source.meta.items() if k != "num_tokens"}
    write_sharded(paths.eval_features("old"), source.num_rows, 16, "no-attention-meta",
                  lambda t: source.read_shard(t.index), meta)
    with pytest.raises(ValueError, match="records no attention map"):
        runner.Inputs(maccap.needs(train_settings(), caption_settings()), "cpu", evalset="old")


@pytest.fixture
def trained(art):
    """Three epochs of the tiny MacCap (frozen LM) on the 61 real captions, saved as train@maccap saves it."""
    s = train_settings()
    inputs = runner.Inputs(maccap.needs(s), "cpu")
    model, facts, result = runner.train_model(maccap, s, inputs, progress=False)
    header = {"method": "maccap", "train": cfg.as_dict(s), "facts": facts, "clip_model": inputs.data.clip}
    runner.write_model_folder(paths.model("maccap"), model, header, {"epoch_loss": result["epoch_loss"]}, "fp")
    return {"model": model, "settings": s, "result": result, "header": header, "art": art}


def instance(s, **caption) -> cfg.MethodInstance:
    return cfg.MethodInstance(method="maccap", train=s, caption=caption_settings(**caption))


def test_training_on_real_captions_lowers_the_loss(art):
    """The offline profile's kind of instance (the small LM trained with the adaptor, corpus vocabulary):
    a frozen LM drawn from a seed cannot be steered far, so its loss barely moves (the paper's LM is
    pretrained)."""
    inst = instance(train_settings(freeze_lm=False, vocabulary="corpus"))
    report = runner.train("maccap-lm", inst, "cpu", progress=False)
    loss = report["epoch_loss"]
    assert report["steps"] == 12 and len(loss) == 3 and all(np.isfinite(loss))
    assert loss[-1] < loss[0] - 0.5, loss
    assert report["variant"] == "multiple token w/ noise, LM trained, corpus vocabulary" and "frozen" not in report
    assert report["training_rows"] == N_CAPTIONS and len(report["facts"]["vocabulary"]) > 50
    captions = runner.caption("maccap-lm", inst, "tiny", "cpu", progress=False)
    assert set(captions) == set(art["eval_ids"]) and all(isinstance(c, str) for c in captions.values())


def test_captions_are_reproducible_and_do_not_depend_on_the_batch(trained):
    inst = instance(trained["settings"])
    captions = runner.caption("maccap", inst, "tiny", "cpu", progress=False)
    assert set(captions) == set(trained["art"]["eval_ids"]) and all(isinstance(c, str) for c in captions.values())
    assert runner.caption("maccap", inst, "tiny", "cpu", progress=False) == captions            # seeded noise
    # an image's caption does not depend on its batch: caption image 2 alone
    model, header = runner.load_checkpoint(paths.model("maccap") / runner.MODEL_FILE)
    inputs = runner.Inputs(maccap.needs(trained["settings"], inst.caption), "cpu", evalset="tiny")
    _, rows = next(inputs.shards())
    alone = maccap.caption(model, rows, np.array([2]), header["train"], inst.caption, inputs.data)
    assert alone == [captions[rows["id"][2]]]
    assert trained["result"]["steps"] == 12 and trained["result"]["epoch_loss"][-1] < trained["result"]["epoch_loss"][0]


def test_sampling_and_filtering_keeps_the_candidate_the_clip_text_encoder_scores_best(trained, monkeypatch):
    s, c = trained["settings"], caption_settings(samples=4)
    inputs = runner.Inputs(maccap.needs(s, c), "cpu", evalset="tiny")
    _, rows = next(inputs.shards())
    idx = np.arange(N_IMAGES)
    seen = []
    monkeypatch.setattr(maccap, "rerank", lambda cands, image, enc, chars: seen.append(cands) or [x[0] for x in cands])
    maccap.caption(trained["model"], rows, idx, s, c, inputs.data)
    monkeypatch.undo()
    candidates = seen[0]
    assert len(candidates) == N_IMAGES and all(len(x) == 4 for x in candidates)
    chosen = maccap.caption(trained["model"], rows, idx, s, c, inputs.data)
    for b in range(N_IMAGES):
        feats = inputs.data.text_encoder([t[:80] for t in candidates[b]])
        scores = feats @ (rows["global"][b] / np.linalg.norm(rows["global"][b]))
        assert chosen[b] == candidates[b][int(np.argmax(scores))]


def test_checkpoint_leaves_the_frozen_lm_out_reloads_it_and_refuses_another_one(trained, tmp_path):
    path = paths.model("maccap") / runner.MODEL_FILE
    model, s = trained["model"], trained["settings"]
    header = runner.checkpoint_header(path)
    lm_identity = model.frozen_pretrained["lm"]
    assert header["frozen"] == {"lm": lm_identity} and lm_identity["name"] == "synthcap-tiny-gpt2"
    lm_bytes = sum(t.numel() * t.element_size() for t in model.lm.state_dict().values())
    assert path.stat().st_size < lm_bytes / 10                                # the adaptor only
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        assert all(k.startswith("adaptor.") for k in f.keys())
    loaded, parsed = runner.load_checkpoint(path)
    assert parsed["train"] == s
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    inputs = runner.Inputs(maccap.needs(s, caption_settings()), "cpu", evalset="tiny")
    _, rows = next(inputs.shards())
    idx = np.arange(N_IMAGES)
    c = caption_settings()
    assert maccap.caption(loaded, rows, idx, s, c, inputs.data) == maccap.caption(model, rows, idx, s, c, inputs.data)
    # the same checkpoint whose settings name another LM (seed 1): its weights differ from those recorded
    other = {**trained["header"], "train": {**trained["header"]["train"],
                                            "language_model": {**TINY["language_model"], "seed": 1}}}
    runner.save_checkpoint(model, tmp_path / "other.safetensors", other)
    with pytest.raises(ValueError, match=rf"{lm_identity['weights_sha256'][:12]} at training, but .*seed=1.* loads now "
                                         r"with weights [0-9a-f]{12}"):
        runner.load_checkpoint(tmp_path / "other.safetensors")
    # a frozen LM that training changed cannot be left out
    with torch.no_grad():
        next(model.lm.parameters()).add_(1.0)
    with pytest.raises(ValueError, match="training changed it"):
        runner.save_checkpoint(model, tmp_path / "changed.safetensors", trained["header"])


def test_a_trained_lm_is_saved_whole(art, tmp_path):
    s = train_settings(freeze_lm=False, epochs=1)
    model, facts, _ = runner.train_model(maccap, s, runner.Inputs(maccap.needs(s), "cpu"), progress=False, max_steps=1)
    header = {"method": "maccap", "train": cfg.as_dict(s), "facts": facts, "clip_model": art["clip"]}
    runner.save_checkpoint(model, tmp_path / "m.safetensors", header)
    assert "frozen" not in runner.checkpoint_header(tmp_path / "m.safetensors")
    loaded, _ = runner.load_checkpoint(tmp_path / "m.safetensors")
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    fresh = maccap.create(s, facts).lm.state_dict()
    assert not all(torch.equal(v, fresh[k]) for k, v in model.lm.state_dict().items())


# ---------------------------------------------------------------------------------------------
# Table 5, the paper's numbers and the paper profile
# ---------------------------------------------------------------------------------------------
def test_variant_names_table_5_rows_and_the_full_method_matches_the_paper_results():
    full = (maccap.Train(), maccap.Caption())
    assert variant(*full) == "MacCap"
    rows = yaml.safe_load((REPO / "pipeline" / "evaluation" / "paper_results.yaml").read_text())
    assert {r["variant"] for r in rows if r["method"] == "maccap"} == {"MacCap"}
    t = lambda **kw: cfg.parse(maccap.Train, kw, "t")                         # noqa: E731
    c = lambda **kw: cfg.parse(maccap.Caption, kw, "c")                       # noqa: E731
    assert variant(t(n_cr=1, noise_variance=0), c(samples=1)) == "single token w/o noise, subregion aggregation"
    assert variant(t(n_cr=1), c(samples=1)) == "single token w/ noise, subregion aggregation"
    assert variant(t(noise_variance=0), c(samples=1)) == "multiple token w/o noise, subregion aggregation"
    assert variant(t(), c(samples=1)) == "multiple token w/ noise, subregion aggregation"
    assert variant(t(), c(samples=1, aggregation="cls")) == "multiple token w/ noise, CLS token"
    assert variant(t(), None) == "multiple token w/ noise"
    assert variant(t(freeze_lm=False, vocabulary="corpus"), c()) == "MacCap, LM trained, corpus vocabulary"
    with pytest.raises(cfg.ConfigError, match=r"aggregation"):
        c(aggregation="mean")
    with pytest.raises(cfg.ConfigError, match=r"n_cr"):
        t(n_cr=0)


def test_paper_coco_maccap_carries_the_values_of_methods_md_and_table_5_rows():
    md = methods_md_section("## 3. MacCap", "## 4. Unsupervised-ClipCap")
    parsed = cfg.from_dict(resolve_profile("paper-coco")).methods
    m = parsed["maccap"]
    t, c = m.train, m.caption
    assert t.n_cr == int(re.search(r"N_cr = (\d+) times", md).group(1))
    assert t.noise_variance == float(re.search(r"\(σ² = ([\d.]+)\)", md).group(1))
    assert t.queries == int(re.search(r"N_q = (\d+)", md).group(1))
    decoder = re.search(r"(\d+) layer,\s+(\d+) heads,\s+width (\d+),\s+FFN\s+(\d+)", md)
    layers, heads, width, ffn = map(int, decoder.groups())
    assert (t.layers, t.heads, t.ffn_dim) == (layers, heads, ffn) and t.width in (None, width)
    assert re.search(r"ReLU,\s+dropout 0\.1", md) and t.dropout == 0.1
    mlp = re.search(r"MLP\s+of (\d+) linear layers (\d+) → (\d+) → (\d+) → LM width", md)
    assert t.mlp_layers == int(mlp.group(1)) and int(mlp.group(2)) == width
    batch, lr = re.search(r"Paper:\s+batch (\d+), lr (\S+);", md).groups()
    assert (t.batch_size, t.optim.lr) == (int(batch), float(lr))
    assert t.epochs == int(re.search(r"(\d+) epochs on COCO", md).group(1))
    assert "OPT-1.3b" in md and t.language_model.pretrained == "facebook/opt-1.3b" and t.freeze_lm
    assert t.vocabulary == "full"
    assert c.samples == int(re.search(r"S = (\d+) noisy copies", md).group(1))
    assert c.noise_variance == float(re.search(r"of I_cr \(variance ([\d.]+)", md).group(1))
    assert c.beam_size == int(re.search(r"\(beam (\d+)\)", md).group(1))
    assert c.rerank_chars == int(re.search(r"cut to (\d+)\s+characters", md).group(1))
    assert c.aggregation == "subregion" and c.attention_softmax            # "the code softmaxes them again"
    assert t.start_token                                                  # released: [E, </s>, caption]
    assert variant(t, c) == "MacCap"
    rows = {variant(i.train, i.caption) for n, i in parsed.items() if i.method == "maccap"}
    assert rows == {"MacCap", "single token w/o noise, subregion aggregation",
                    "single token w/ noise, subregion aggregation", "multiple token w/o noise, subregion aggregation",
                    "multiple token w/ noise, subregion aggregation", "multiple token w/ noise, CLS token"}, rows


def test_offline_profile_has_a_maccap_instance_that_says_how_it_departs():
    offline = cfg.from_dict(resolve_profile("offline")).methods["maccap"]
    assert offline.method == "maccap" and offline.train.language_model.name == "synthcap-tiny-gpt2"
    assert variant(offline.train, offline.caption).startswith("MacCap")
