"""PCM-Net: each equation against a direct computation, the Noam schedule, training on real captions,
checkpoints through the runner, and training and captioning through the runner on artifacts written like
the stages write them."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline import config as cfg
from pipeline import paths, runner
from pipeline.methods import Data, pcmnet
from pipeline.methods.pcmnet import (GLOBAL, TEXTUAL, VISUAL, PCMNet, PCMNetConfig, clip_weights, mix_up_inference,
                                     mix_up_train, no_mix, patch_affinity, pcm, related_patches, salient_concepts,
                                     textual_feature_map, variant, weighted_caption_loss)
from pipeline.nn import decoding, schedules
from pipeline.nn.schedules import Optim
from pipeline.nn.tokenizer import CaptionTokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return CaptionTokenizer()


def cos(a, b):
    return sum(x * y for x, y in zip(a, b)) / math.sqrt(sum(x * x for x in a)) / math.sqrt(sum(y * y for y in b))


# --- Eq. 1-3 and the mix-up -----------------------------------------------------------------------

def test_eq1_salient_concepts_are_the_top_k_by_cosine():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((3, 5)) * 3.0                  # unnormalised on purpose
    concepts = rng.standard_normal((8, 5))
    idx, feats = salient_concepts(torch.tensor(g), torch.tensor(concepts), k=3)
    for b in range(3):
        sims = [cos(g[b], concepts[j]) for j in range(8)]
        expected = sorted(range(8), key=lambda j: -sims[j])[:3]
        assert idx[b].tolist() == expected
        for slot, j in enumerate(expected):
            np.testing.assert_allclose(feats[b, slot].numpy(), concepts[j] / np.linalg.norm(concepts[j]), atol=1e-12)
    # fewer concepts than K: all of them
    assert salient_concepts(torch.tensor(g), torch.tensor(concepts[:2]), k=5)[0].shape == (3, 2)


def test_eq2_affinity_is_patch_concept_cosine():
    rng = np.random.default_rng(1)
    patches = rng.standard_normal((2, 6, 4)) * 7.0          # projected patches are not normalised
    salient = rng.standard_normal((2, 3, 4))
    a = patch_affinity(torch.tensor(patches), torch.tensor(salient)).numpy()
    assert a.shape == (2, 6, 3)
    for b in range(2):
        for j in range(6):
            for k in range(3):
                assert a[b, j, k] == pytest.approx(cos(patches[b, j], salient[b, k]), abs=1e-12)


@pytest.mark.parametrize("tau", [0.01, 0.5])
def test_eq3_textual_feature_map_is_a_softmax_weighted_sum(tau):
    rng = np.random.default_rng(2)
    affinity = rng.uniform(-1, 1, (2, 5, 3))
    salient = rng.standard_normal((2, 3, 4))
    salient /= np.linalg.norm(salient, axis=-1, keepdims=True)
    vt = textual_feature_map(torch.tensor(affinity, dtype=torch.float64),
                             torch.tensor(salient, dtype=torch.float64), tau).numpy()
    for b in range(2):
        for j in range(5):
            e = [math.exp(affinity[b, j, k] / tau) for k in range(3)]
            expected = sum(e[k] / sum(e) * salient[b, k] for k in range(3))
            np.testing.assert_allclose(vt[b, j], expected, rtol=1e-12, atol=1e-12)


def crafted():
    """One image whose salient concepts (Eq. 1) are e0 and e1 and whose patches 1 and 4 match them."""
    e = torch.eye(6, dtype=torch.float64)
    concepts = e.clone()                                            # Nc = 6 one-hot concepts
    g = (e[0] + 0.5 * e[1] + 0.1 * e[2])[None]                      # -> salient [e0, e1] with K = 2
    patches = torch.stack([3 * e[3], 2 * e[0], e[1] + e[4], e[5], e[0] + 2 * e[1]])[None]
    # max_k a_jk: 0, 1, 0.707, 0, 0.894  ->  top-2 = patches 1 and 4
    return g, patches, concepts


def test_mix_up_replaces_exactly_the_most_related_patches():
    g, patches, concepts = crafted()
    _, salient = salient_concepts(g, concepts, 2)
    affinity = patch_affinity(patches, salient)
    assert set(related_patches(affinity, 2)[0].tolist()) == {1, 4}
    textual = textual_feature_map(affinity, salient, 0.01)
    tokens, types, positions, padding = pcm(g, patches, concepts, k=2, m=2, tau=0.01, training=True)
    assert tokens.shape == patches.shape and not padding.any()
    for j in range(5):
        if j in (1, 4):
            assert torch.equal(tokens[0, j], textual[0, j]) and types[0, j] == TEXTUAL
        else:
            assert torch.equal(tokens[0, j], patches[0, j]) and types[0, j] == VISUAL
    assert positions[0].tolist() == [1, 2, 3, 4, 5]
    # patch 1 equals concept e0: its textual feature is (nearly) e0 at tau = 0.01
    np.testing.assert_allclose(tokens[0, 1].numpy(), [1, 0, 0, 0, 0, 0], atol=1e-3)


def test_related_patches_score_is_max_over_concepts():
    affinity = torch.tensor([[[0.1, 0.2], [0.9, -1.0], [0.3, 0.35], [0.0, 0.8], [0.5, 0.5]]])
    assert related_patches(affinity, 3)[0].tolist() == [1, 3, 4]      # scores .2 .9 .35 .8 .5


def test_mix_up_train_and_inference_shapes_on_a_batch():
    rng = torch.Generator().manual_seed(0)
    visual, textual = torch.randn(3, 7, 4, generator=rng), torch.randn(3, 7, 4, generator=rng)
    idx = torch.tensor([[0, 6], [3, 2], [5, 1]])
    tokens, types, positions, padding = mix_up_train(visual, textual, idx)
    for b in range(3):
        for j in range(7):
            src = textual if j in idx[b].tolist() else visual
            assert torch.equal(tokens[b, j], src[b, j])
        assert (types[b] == TEXTUAL).sum() == 2
    assert not padding.any()
    tokens, types, positions, padding = mix_up_inference(visual, textual, idx)
    assert tokens.shape == (3, 9, 4) and types.shape == (3, 9) and positions.shape == (3, 9)
    assert torch.equal(tokens[:, :7], visual)                          # the real patch map untouched
    for b in range(3):
        for slot, j in enumerate(sorted(idx[b].tolist())):
            assert torch.equal(tokens[b, 7 + slot], textual[b, j])     # the top-M v^t_j appended, in patch order
            assert positions[b, 7 + slot] == j + 1                     # at the position of patch j
    assert (types[:, :7] == VISUAL).all() and (types[:, 7:] == TEXTUAL).all() and not padding.any()


def test_inference_appends_each_selected_patch_once_and_pads_the_shorter_rows():
    """Pairs can name a patch twice: it is appended once, and a row with fewer distinct patches is
    padded (a zero token marked in ``padding``) to the batch's largest."""
    rng = torch.Generator().manual_seed(1)
    visual, textual = torch.randn(3, 5, 4, generator=rng), torch.randn(3, 5, 4, generator=rng)
    idx = torch.tensor([[4, 4, 1], [2, 2, 2], [3, 0, 1]])
    tokens, types, positions, padding = mix_up_inference(visual, textual, idx)
    appended = {0: [1, 4], 1: [2], 2: [0, 1, 3]}                       # the distinct patches, in patch order
    assert tokens.shape == (3, 5 + 3, 4)
    for b, patches in appended.items():
        assert torch.equal(tokens[b, :5], visual[b]) and not padding[b, :5].any()
        for slot in range(3):
            if slot < len(patches):
                j = patches[slot]
                assert torch.equal(tokens[b, 5 + slot], textual[b, j]) and positions[b, 5 + slot] == j + 1
                assert types[b, 5 + slot] == TEXTUAL and not padding[b, 5 + slot]
            else:
                assert padding[b, 5 + slot] and not tokens[b, 5 + slot].any()


def test_inference_pcm_concatenates_m_textual_patches():
    g, patches, concepts = crafted()
    tokens, types, positions, padding = pcm(g, patches, concepts, k=2, m=2, tau=0.01, training=False)
    assert tokens.shape == (1, 7, 6) and not padding.any()
    assert torch.equal(tokens[0, :5], patches[0])
    assert sorted(positions[0, 5:].tolist()) == [2, 5]


# --- the captioner, Eq. 6-7 -------------------------------------------------------------------------

def tiny_config(**kw):
    base = dict(feature_dim=8, num_patches=6, hidden=16, heads=2, ffn_dim=32, encoder_layers=3,
                decoder_layers=2, dropout=0.0, max_len=12, num_concepts=10, salient_k=3, mix_m=2, tau=0.05)
    return PCMNetConfig(**{**base, **kw})


def tiny_batch(tok, n=4, cfg=None, seed=0, captions=None):
    cfg = cfg or tiny_config()
    g = torch.Generator().manual_seed(seed)
    captions = captions or ["a dog runs on the grass", "a man rides a bike", "two children play", "a red car"][:n]
    tokens, lengths = tok.encode(captions, cfg.max_len)
    return {"global": torch.randn(n, cfg.feature_dim, generator=g),
            "patches": torch.randn(n, cfg.num_patches, cfg.feature_dim, generator=g),
            "text_feature": torch.randn(n, cfg.feature_dim, generator=g), "tokens": tokens, "lengths": lengths}


def tiny_model(cfg=None, seed=0, tok=None):
    cfg = cfg or tiny_config()
    torch.manual_seed(seed)
    return PCMNet(cfg, tok or CaptionTokenizer(), torch.randn(cfg.num_concepts, cfg.feature_dim)).eval()


@pytest.mark.parametrize("relu", [False, True])
def test_embedding_uses_one_fc_per_stream_with_position_and_type(tok, relu):
    """As released: FC + position + token type, then ReLU (embedding_relu), then LayerNorm."""
    model = tiny_model(tiny_config(embedding_relu=relu))
    enc = model.encoder
    g, tokens, types, positions, padding = model.encoder_inputs(tiny_batch(tok))
    x0 = enc.embed(g, tokens, types, positions)
    act = torch.relu if relu else (lambda x: x)
    for b in range(2):
        manual = [act(enc.global_fc(g[b]) + enc.pos_emb.weight[0] + enc.type_emb.weight[GLOBAL])]
        for j in range(tokens.shape[1]):
            fc = enc.textual_fc if types[b, j] == TEXTUAL else enc.visual_fc
            manual.append(act(fc(tokens[b, j]) + enc.pos_emb.weight[positions[b, j]] + enc.type_emb.weight[types[b, j]]))
        torch.testing.assert_close(x0[b], enc.emb_ln(torch.stack(manual)), atol=1e-5, rtol=1e-5)
    assert x0.shape[0] == 4 and x0.shape[1] <= 1 + 6 + 2   # eval: Np + at most M tokens after the global one


def test_eq6_eq7_inter_layer_global_feature(tok):
    model = tiny_model()
    enc = model.encoder
    *inputs, padding = model.encoder_inputs(tiny_batch(tok))
    assert not padding.any()                                           # top-M patches: M distinct ones
    out = enc(*inputs, padding)
    x = enc.embed(*inputs)
    globals_ = [x[:, 0]]
    for layer in enc.layers:
        x = layer(x)
        globals_.append(x[:, 0])
    W = enc.w_g.weight.double()                                        # [H, (N_e+1) H], no bias
    for b in range(x.shape[0]):
        manual = W @ torch.cat([gi[b] for gi in globals_]).double()
        torch.testing.assert_close(out[b, 0].double(), manual, atol=1e-5, rtol=1e-5)
    assert torch.equal(out[:, 1:], x[:, 1:])                           # Eq. 7: the last layer's patches
    assert enc.w_g.weight.shape == (16, 4 * 16) and enc.w_g.bias is None


def test_decoder_is_causal(tok):
    model = tiny_model()
    batch = tiny_batch(tok)
    logits = model(batch)
    changed = dict(batch, tokens=batch["tokens"].clone())
    changed["tokens"][:, 4:] = 7                                       # alter everything after position 3
    torch.testing.assert_close(model(changed)[:, :4], logits[:, :4])


def repeating_pair_images():
    """Two images over one-hot concepts e0..e7 whose salient concepts (K = 3) are e0, e1, e2. Image 0:
    patch 2 = e0 + e1 holds both top (patch, concept) pairs, so "pairs" with M = 2 names patch 2
    twice; image 1: patches 1 and 4 match e0 and e1, two distinct patches. The other patches are
    orthogonal to e0..e2 (affinity 0)."""
    e = torch.eye(8)
    g = torch.stack([e[0] + e[1] + e[2], e[0] + e[1] + e[2]])
    noise = torch.randn(2, 6, 8, generator=torch.Generator().manual_seed(4))
    patches = noise * torch.tensor([0, 0, 0, 1, 1, 1, 1, 1.0])                 # nothing on e0..e2
    patches[0, 2] = e[0] + e[1]
    patches[1, 1], patches[1, 4] = e[0], e[1]
    return g, patches, e


def pairs_model(tok, seed=0):
    config = tiny_config(num_concepts=8, salient_k=3, mix_m=2, mix_select="pairs", embedding_relu=True)
    torch.manual_seed(seed)
    return PCMNet(config, tok, repeating_pair_images()[2]).eval()


def test_an_image_whose_pairs_repeat_a_patch_gets_it_once(tok):
    """Against a direct computation: the encoder on [g; V_I; v^t_2] (patch 2's textual feature, Eq. 3
    by hand, once, at patch 2's position), not [g; V_I; v^t_2; v^t_2]."""
    g, patches, concepts = repeating_pair_images()
    model = pairs_model(tok)
    _, salient = salient_concepts(g, concepts, 3)
    assert related_patches(patch_affinity(patches, salient), 2, "pairs")[0].tolist() == [2, 2]
    a = [cos(patches[0, 2].tolist(), concepts[k].tolist()) for k in range(3)]         # Eq. 2, e0..e2
    weights = torch.softmax(torch.tensor(a) / model.cfg.tau, dim=0)                       # Eq. 3
    vt = sum(weights[k] * concepts[k] for k in range(3))

    def encoded(appended: int):
        tokens = torch.cat([patches[:1], vt.expand(1, appended, 8)], dim=1)
        types = torch.tensor([[VISUAL] * 6 + [TEXTUAL] * appended])
        positions = torch.tensor([[1, 2, 3, 4, 5, 6] + [3] * appended])
        return model.encoder(g[:1], tokens, types, positions, torch.zeros(1, 6 + appended, dtype=torch.bool))

    memory = model.encode({"global": g[:1], "patches": patches[:1]})
    assert memory.states.shape == (1, 1 + 6 + 1, 16) and not memory.padding.any()
    torch.testing.assert_close(memory.states, encoded(1), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(memory.states[:, 0], encoded(2)[:, 0], atol=1e-3)       # twice would weigh it double


def test_a_padded_batch_gives_each_image_the_logits_and_captions_it_gets_alone(tok):
    """Image 0 appends one patch, image 1 two: image 0's row is padded, and the padding is masked
    in the encoder's self-attention and the decoder's cross-attention, in greedy and beam search."""
    g, patches, _ = repeating_pair_images()
    model = pairs_model(tok, seed=3)
    batch = {"global": g, "patches": patches}
    memory = model.encode(batch)
    assert memory.padding.tolist() == [[False] * 8 + [True], [False] * 9]
    tokens, _ = tok.encode(["a dog runs on the grass", "a man rides a bike"], model.cfg.max_len)
    together = model.decoder(memory, tokens)
    for b in range(2):
        alone = {"global": g[b:b + 1], "patches": patches[b:b + 1]}
        mem = model.encode(alone)
        torch.testing.assert_close(memory.states[b:b + 1, :mem.states.shape[1]], mem.states, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(together[b:b + 1], model.decoder(mem, tokens[b:b + 1]), atol=1e-5, rtol=1e-5)
        for beam_size in (1, 3):
            assert model.generate(batch, beam_size)[b] == model.generate(alone, beam_size)[0]
    # the mask matters: attending to the padded slot changes image 0's logits
    unmasked = model.decoder(decoding.Memory(memory.states, torch.zeros_like(memory.padding)), tokens)
    assert not torch.allclose(unmasked[0], together[0], atol=1e-4)


def test_beam_search_carries_the_memory_padding_with_each_beam():
    """decoding.beam expands a Memory per beam, rows and padding together: a decoder that returns
    logits from the unpadded mean of its memory sees image b's own rows and mask."""
    class MeanOfMemory(torch.nn.Module):
        def forward(self, memory, tokens):
            keep = (~memory.padding).float()[..., None]
            mean = (memory.states * keep).sum(1) / keep.sum(1)                     # [B, V]
            return mean[:, None, :].expand(-1, tokens.shape[1], -1)

    states = torch.tensor([[[0.0, 5.0, 1.0], [9.0, 0.0, 0.0]], [[0.0, 1.0, 4.0], [0.0, 1.0, 4.0]]])
    padding = torch.tensor([[False, True], [False, False]])
    memory = decoding.Memory(states, padding)
    # eot = 0 is never best: each row repeats its own argmax (1, then 2), the padded 9 never counts
    assert decoding.beam(MeanOfMemory(), memory, sot=0, eot=0, max_len=3, beam_size=2) == [[1, 1], [2, 2]]
    assert decoding.greedy(MeanOfMemory(), memory, sot=0, eot=0, max_len=3) == [[1, 1], [2, 2]]


def test_decoder_words_enter_with_sinusoidal_positions_layernorm_and_leave_through_an_untied_linear(tok):
    """As released (xmodaler TokenBaseEmbedding + BasePredictor): h_0 = LN(E[w_t] + PE[t]) with
    PE[t, 2i] = sin(t / 10000^(2i/H)), PE[t, 2i+1] = cos(t / 10000^(2i/H)); logits = W h + b."""
    model = tiny_model()
    dec = model.decoder
    H = model.cfg.hidden
    pe = torch.tensor([[math.sin(t / 10000 ** (i / H)) if i % 2 == 0 else math.cos(t / 10000 ** ((i - 1) / H))
                        for i in range(H)] for t in range(model.cfg.max_len)])
    torch.testing.assert_close(dec.word_positions, pe, atol=1e-6, rtol=1e-6)
    batch = tiny_batch(tok)
    memory = model.encode(batch)
    tokens = batch["tokens"]
    T = tokens.shape[1]
    h = dec.emb_ln(dec.tok_emb.weight[tokens] + pe[:T])
    causal = torch.nn.Transformer.generate_square_subsequent_mask(T)
    for layer in dec.layers:
        h = layer(h, memory.states, tgt_mask=causal, memory_key_padding_mask=memory.padding)
    torch.testing.assert_close(model(batch), h @ dec.output.weight.T + dec.output.bias, atol=1e-5, rtol=1e-5)
    assert dec.output.bias is not None and dec.output.weight.data_ptr() != dec.tok_emb.weight.data_ptr()


def test_base_variant_feeds_the_patch_map_as_it_is(tok):
    config = tiny_config(mixup=False, num_concepts=0)
    model = PCMNet(config, tok).eval()
    batch = tiny_batch(tok, cfg=config)
    g, tokens, types, positions, padding = model.encoder_inputs(batch)
    assert torch.equal(tokens, batch["patches"]) and (types == VISUAL).all() and not padding.any()
    assert model.encode(batch).states.shape == (4, 1 + 6, 16)
    assert no_mix(batch["patches"])[2][0].tolist() == [1, 2, 3, 4, 5, 6]
    assert [variant(pcmnet.Train(mixup=bool(m), cxe=bool(c)), None) for m, c in ((0, 0), (1, 0), (0, 1), (1, 1))] == \
        ["Base", "Base+Mix-up", "Base+CXE", "Base+Mix-up+CXE"]
    with pytest.raises(ValueError, match="mix-up needs a non-empty concept vocabulary"):
        PCMNet(tiny_config(num_concepts=0), tok)


def test_noise_goes_on_the_unit_global_input_at_training_and_is_renormalised(tok):
    """The released noise_injection: normalise, add N(0, 0.016 I), normalise again (training only)."""
    cfg = tiny_config(feature_dim=8, noise_variance=0.016)
    model = tiny_model(cfg)
    batch = tiny_batch(tok, cfg=cfg)
    batch["global"] = 3 * torch.randn(4, 8)
    g, *_ = model.encoder_inputs(batch)
    assert torch.equal(g, batch["global"])                             # eval: clean
    model.train()
    big = dict(batch, **{"global": 3 * torch.randn(4096, 8), "patches": torch.randn(4096, 6, 8)})
    torch.manual_seed(7)
    g, tokens, types, positions, padding = model.encoder_inputs(big)
    torch.manual_seed(7)
    noise = torch.randn_like(big["global"]) * 0.016 ** 0.5
    torch.testing.assert_close(g, F.normalize(F.normalize(big["global"], dim=-1) + noise, dim=-1))
    torch.testing.assert_close(g.norm(dim=-1), torch.ones(4096))
    assert noise.var().item() == pytest.approx(0.016, rel=0.05)
    clean = pcm(big["global"], big["patches"], model.concepts, 3, 2, cfg.tau, training=True)
    assert torch.equal(tokens, clean[0])                               # PCM sees the clean features


# --- Eq. 11 and the schedule -----------------------------------------------------------------------

def test_eq11_clip_weights():
    gi = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.5, 0.0], [3.0, 0.0]])
    angles = [math.acos(0.1), math.acos(0.3), math.acos(-0.2), math.acos(0.25)]
    gs = torch.tensor([[math.cos(a) * 5, math.sin(a) * 5] for a in angles])
    c = clip_weights(gi, gs, w=4.0)
    torch.testing.assert_close(c, torch.tensor([0.4, 1.0, 0.0, 1.0]))  # clipped at 1, negatives at 0
    for b in range(4):
        assert c[b].item() == pytest.approx(min(1.0, 4.0 * max(cos(gi[b].tolist(), gs[b].tolist()), 0.0)), abs=1e-6)


def test_eq11_weighted_loss_matches_a_per_sample_computation(tok):
    tokens, lengths = tok.encode(["a dog", "a man rides a red bike", "snow"], 9)
    V = 49408
    logits = torch.randn(3, 9, V, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    weights = torch.tensor([0.4, 1.0, 0.7], dtype=torch.float64)
    total, count = 0.0, 0
    for b in range(3):
        nll = 0.0
        for t in range(1, int(lengths[b])):                            # targets after sot, eot included
            row = logits[b, t - 1]
            nll -= row[tokens[b, t]].item() - math.log(torch.exp(row - row.max()).sum().item()) - row.max().item()
            count += 1
        total += weights[b].item() * nll
    assert weighted_caption_loss(logits, tokens, lengths, weights).item() == pytest.approx(total / count, rel=1e-9)
    plain = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, V), tokens[:, 1:].masked_fill(
            torch.arange(1, 9)[None] >= lengths[:, None], -100).reshape(-1), ignore_index=-100)
    assert weighted_caption_loss(logits, tokens, lengths).item() == pytest.approx(plain.item(), rel=1e-9)
    ones = torch.ones(3, dtype=torch.float64)
    assert weighted_caption_loss(logits, tokens, lengths, ones).item() == pytest.approx(plain.item(), rel=1e-9)


def test_model_loss_uses_clip_weights_of_image_and_caption(tok):
    model = tiny_model(tiny_config(clip_w=4.0))
    batch = tiny_batch(tok)
    batch["text_feature"] = batch["global"] * 2.0                      # cos 1 -> weight 1
    batch["text_feature"][1] = -batch["global"][1]                     # cos -1 -> weight 0
    loss, logged = model.loss(batch)
    weights = clip_weights(batch["global"], batch["text_feature"], 4.0)
    torch.testing.assert_close(weights, torch.tensor([1.0, 0.0, 1.0, 1.0]))
    expected = weighted_caption_loss(model(batch), batch["tokens"], batch["lengths"], weights)
    torch.testing.assert_close(loss, expected)
    assert logged == {"clip_weight": pytest.approx(0.75)}               # the mean weight, for the train report
    plain = tiny_model(tiny_config(clip_w=None)).loss(batch)            # Table 3 without CXE: same weights
    assert isinstance(plain, torch.Tensor) and plain > loss
    torch.testing.assert_close(plain, weighted_caption_loss(model(batch), batch["tokens"], batch["lengths"]))


@pytest.mark.parametrize("hidden, warmup, factor", [(512, 10000, 1.0), (64, 20, 0.5)])
def test_noam_schedule(hidden, warmup, factor):
    for step in (1, 2, warmup // 2, warmup, 2 * warmup, 10 * warmup):
        expected = factor * hidden ** -0.5 * min(step ** -0.5, step * warmup ** -1.5)
        assert schedules.noam(step, hidden, warmup, factor) == pytest.approx(expected, rel=1e-12)
    assert schedules.noam(warmup, hidden, warmup, factor) == pytest.approx(factor / math.sqrt(hidden * warmup))
    model = torch.nn.Linear(2, 2)
    model.width = hidden
    opt, sched = schedules.build(model, Optim(name="adam", lr=factor, betas=(0.9, 0.98), eps=1e-9, schedule="noam",
                                              warmup_steps=warmup), width=hidden)
    for i in range(5):
        assert opt.param_groups[0]["lr"] == pytest.approx(schedules.noam(i + 1, hidden, warmup, factor), rel=1e-12)
        opt.step()
        sched.step()
    assert opt.param_groups[0]["betas"] == (0.9, 0.98) and opt.param_groups[0]["eps"] == 1e-9


# --- training on real captions ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def built(tmp_path_factory, shared_data):
    """61 Flickr8k train captions with the tiny seeded CLIP's features of their real photos (stand-ins for
    their synthetic images: every pair is a true image-caption pair), 4 photos outside the train split as
    eval set "tiny", and a 40-concept vocabulary of the corpus nouns (tests/test_runner.py)."""
    from test_runner import build_real_artifacts
    return build_real_artifacts(tmp_path_factory.mktemp("pcmnet-artifacts"), shared_data, {"concepts"})


@pytest.fixture
def art(built, artifacts_root):
    from test_runner import use_real_artifacts
    return use_real_artifacts(built, artifacts_root)


# the paper's model without the released recipe's extras (each switched off explicitly)
PAPER_ONLY = {"vocabulary": "full", "label_smoothing": 0.0, "focal_gamma": 0.0, "mix_select": "patches",
              "attention_dropout": 0.0, "embedding_dropout": 0.0, "predictor_dropout": 0.0, "embedding_relu": False,
              "w_g_layernorm": False}
SMALL = {"hidden": 32, "heads": 4, "ffn_dim": 64, "max_len": 24, "dropout": 0.0, "clip_w": 4.0, "epochs": 4,
         "batch_size": 16, "optim": {"name": "adam", "lr": 1.0, "betas": [0.9, 0.98], "eps": 1e-9,
                                     "schedule": "noam", "warmup_steps": 8}, **PAPER_ONLY}


def test_training_on_real_captions_lowers_the_loss(art, tok):
    s = cfg.parse(pcmnet.Train, SMALL, "methods.pcmnet.train")
    inputs = runner.Inputs(pcmnet.needs(s), "cpu")
    data = inputs.data
    assert data.num_patches == 16 and data.feature_dim == 64 and len(data.concepts[0]) == 40
    shards = [shard for _, shard in inputs.shards()]                              # the 61 pairs, as batch() takes them
    every = {k: (np.concatenate([sh[k] for sh in shards]) if isinstance(shards[0][k], np.ndarray)
                 else [x for sh in shards for x in sh[k]]) for k in ("text", "text_feature", "global", "patches", "grid")}
    assert every["patches"].shape == every["grid"].shape == (61, 16, 64) and len(every["text"]) == 61
    facts = pcmnet.facts(s, data)
    torch.manual_seed(s.seed)                                                     # the model train_model starts from
    initial = pcmnet.create(s, facts, data)

    @torch.no_grad()
    def plain_ce(model):                                                          # over the 61 pairs, 16 at a time
        model.eval()
        losses = []
        for start in range(0, 61, 16):
            idx = np.arange(start, min(start + 16, 61))
            batch = pcmnet.batch(model, every, idx, s, data, None)
            losses.append(weighted_caption_loss(model(batch), batch["tokens"], batch["lengths"]).item())
        return np.mean(losses)

    before = plain_ce(initial)
    model, _, result = runner.train_model(pcmnet, s, inputs, progress=False)
    after = plain_ce(model)
    assert result["steps"] == 16 and len(result["epoch_loss"]) == 4
    assert before > 10.0 and after < before - 3.0                                 # plain CE over the 61 pairs
    assert result["epoch_loss"][-1] < result["epoch_loss"][0]
    assert all(0.0 <= log["clip_weight"] <= 1.0 for log in result["logs"])         # Eq. 11's c_I, logged
    texts = model.generate({k: torch.from_numpy(every[k][:2]) for k in ("global", "patches", "grid")},
                           beam_size=3, max_len=12)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)             # may be empty this early


# --- checkpoints ------------------------------------------------------------------------------------

TINY_TRAIN = {"hidden": 16, "heads": 2, "ffn_dim": 32, "encoder_layers": 3, "decoder_layers": 2, "dropout": 0.0,
              "max_len": 12, "salient_k": 3, "mix_m": 2, "tau": 0.05, **PAPER_ONLY}


def test_checkpoint_round_trip(tok, tmp_path):
    train = cfg.parse(pcmnet.Train, TINY_TRAIN, "t")
    words = [f"w{i}" for i in range(10)]
    data = Data(clip={"name": "x"}, feature_dim=8, num_patches=6, grid_dim=5,
                concepts=(words, np.random.default_rng(0).standard_normal((10, 8)).astype(np.float32)))
    facts = pcmnet.facts(train, data)
    assert facts == {"feature_dim": 8, "num_patches": 6, "concepts": words, "vocabulary": None, "grid_dim": 5}
    torch.manual_seed(0)
    model = pcmnet.create(train, facts, data).eval()
    assert model.cfg == tiny_config(clip_w=2.5, noise_variance=0.016, attention_dropout=0.0, embedding_dropout=0.0,
                                    grid_dim=5)
    path = tmp_path / "model.safetensors"
    identity = {"kind": "clip", "name": "x", "embed_dim": 8}
    runner.save_checkpoint(model, path, {"method": "pcmnet", "train": cfg.as_dict(train), "facts": facts,
                                         "clip_model": identity})
    header = runner.checkpoint_header(path)
    assert header["facts"]["concepts"][3] == "w3" and header["clip_model"] == identity
    loaded, parsed = runner.load_checkpoint(path)
    assert not loaded.training and parsed["train"] == train and loaded.cfg == model.cfg
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)                            # the concept buffer too: it captions alone
    torch.testing.assert_close(loaded.concepts, torch.from_numpy(data.concepts[1]), rtol=0, atol=0)
    batch = {**tiny_batch(tok), "grid": torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(1))}
    assert loaded.generate(batch, 3, 8) == model.generate(batch, 3, 8)
    assert loaded.generate(batch, 1, 8) == model.generate(batch, 1, 8)
    with pytest.raises(ValueError, match=r"max_len must be in \[2, 12\]"):
        loaded.generate(batch, 1, 13)


def test_load_rejects_foreign_safetensors(tmp_path):
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "x.safetensors"), metadata={"format": "other"})
    with pytest.raises(ValueError, match=r"x.safetensors is not a synthcap.checkpoint.v2 checkpoint"):
        runner.load_checkpoint(tmp_path / "x.safetensors")


# --- training and captioning through the runner, on stage-written artifacts ---------------------------

PIPELINE_TRAIN = {"mixup": True, "cxe": True, "salient_k": 5, "mix_m": 5, "tau": 0.01, "clip_w": 4.0,
                  "noise_variance": 0.016, "hidden": 32, "heads": 4, "ffn_dim": 64, "encoder_layers": 2,
                  "decoder_layers": 2, "dropout": 0.0, "max_len": 16, "epochs": 3, "batch_size": 16,
                  "optim": {"name": "adam", "lr": 1.0, "betas": [0.9, 0.98], "eps": 1e-9, "schedule": "noam",
                            "warmup_steps": 4}, "seed": 0}


def test_pipeline_train_and_caption(art):
    from pipeline.data.shards import ModelMismatchError
    from pipeline.data.vocabularies import read_concepts
    instance = cfg.MethodInstance(method="pcmnet", train=cfg.parse(pcmnet.Train, PIPELINE_TRAIN, "t"),
                                  caption=cfg.parse(pcmnet.Caption, {"beam_size": 3}, "c"))
    report = runner.train("pcmnet", instance, "cpu", progress=False)
    assert report["variant"] == "Base+Mix-up+CXE" and "summary" in report
    assert report["steps"] == 12 and report["training_rows"] == 61 and len(report["facts"]["concepts"]) == 40
    assert report["facts"]["num_patches"] == 16 and report["clip_model"] == art["clip"]
    assert report["epoch_loss"][-1] < report["epoch_loss"][0]
    path = paths.model("pcmnet") / runner.MODEL_FILE
    header = runner.checkpoint_header(path)
    assert header["facts"]["concepts"] == read_concepts(paths.CONCEPTS, art["clip"])[0]
    assert header["facts"]["num_patches"] == 16

    captions = runner.caption("pcmnet", instance, "tiny", "cpu", progress=False)
    assert set(captions) == set(art["eval_ids"])
    assert all(isinstance(c, str) for c in captions.values())

    model, _ = runner.load_checkpoint(path)                                 # trained on another CLIP: refused
    paths.model("other").mkdir(parents=True)
    runner.save_checkpoint(model, paths.model("other") / runner.MODEL_FILE,
                           {**header, "clip_model": {**art["clip"], "seed": 7}})
    with pytest.raises(ModelMismatchError, match="the model other cannot caption"):
        runner.caption("other", instance, "tiny", "cpu", progress=False)


# --- the released recipe ---------------------------------------------------------------------------

def test_released_loss_is_label_smoothed_kl_times_the_batch_mean_focal_factor():
    """xmodaler WeightedLabelSmoothing (gamma_type "batch") against a direct loop over tokens:
    mean_t(c_b * KL(q_t || p_t)) * mean_t((1 - p_target)^gamma) over the batch's target tokens."""
    g = torch.Generator().manual_seed(3)
    B, T, V, ls, gamma = 3, 6, 7, 0.1, 2.0
    logits = torch.randn(B, T, V, generator=g)
    tokens = torch.randint(0, V, (B, T), generator=g)
    lengths = torch.tensor([6, 4, 2])
    weights = torch.tensor([1.0, 0.5, 0.25])
    kl, focal = [], []
    for b in range(B):
        for i in range(lengths[b] - 1):                       # logits[:, i] predicts tokens[:, i + 1]
            p = torch.softmax(logits[b, i].double(), -1)
            y = int(tokens[b, i + 1])
            q = torch.full((V,), ls / (V - 1), dtype=torch.double)
            q[y] = 1 - ls
            kl.append(weights[b].item() * float((q * (q.log() - p.log())).sum()))
            focal.append(float((1 - p[y]) ** gamma))
    expected = np.mean(kl) * np.mean(focal)
    got = weighted_caption_loss(logits, tokens, lengths, weights, label_smoothing=ls, focal_gamma=gamma)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # both factors off: the plain CLIP-weighted cross-entropy of Eq. 11
    plain = weighted_caption_loss(logits, tokens, lengths, weights)
    nll = [-torch.log_softmax(logits[b, i], -1)[tokens[b, i + 1]].item() * weights[b].item()
           for b in range(B) for i in range(lengths[b] - 1)]
    assert plain.item() == pytest.approx(np.mean(nll), rel=1e-5)


def test_pairs_selection_takes_the_patches_of_the_top_m_patch_concept_entries():
    affinity = torch.tensor([[[0.9, 0.8], [0.1, 0.2], [0.85, 0.0], [0.3, 0.95]]])   # [1, Np=4, K=2]
    assert sorted(related_patches(affinity, 2, "patches")[0].tolist()) == [0, 3]
    # the top-3 entries are (3, 1) 0.95, (0, 0) 0.9, (2, 0) 0.85: patches 3, 0, 2
    assert related_patches(affinity, 3, "pairs")[0].tolist() == [3, 0, 2]
    # patch 0 holds two of the top-3 entries of this matrix: it is mixed once
    affinity = torch.tensor([[[0.9, 0.88], [0.1, 0.2], [0.85, 0.0]]])
    assert related_patches(affinity, 3, "pairs")[0].tolist() == [0, 0, 2]


def test_released_recipe_switches_reach_the_model():
    train = cfg.parse(pcmnet.Train, {"hidden": 16, "heads": 2, "ffn_dim": 32, "max_len": 12, "vocabulary": "words",
                                     "vocabulary_size": 5}, "t")
    data = Data(clip={"name": "x"}, feature_dim=8, num_patches=6, grid_dim=7,
                concepts=(["dog"], np.ones((1, 8), np.float32)), corpus={"text": ["a dog runs", "a dog sits", "a cat"]})
    facts = pcmnet.facts(train, data)
    assert facts["vocabulary"] == ["a", "dog", "cat", "runs", "sits"]
    model = pcmnet.create(train, facts, data)
    assert model.tokenizer.decode(model.tokenizer.encode("A dog swims!", 12)[0][0]) == "a dog <unk>"
    assert (model.cfg.label_smoothing, model.cfg.focal_gamma, model.cfg.mix_select) == (0.1, 2.0, "pairs")
    attn = [m.self_attn.dropout for m in model.encoder.layers] + [m.multihead_attn.dropout for m in model.decoder.layers]
    assert attn == [0.3] * len(attn) and model.encoder.drop.p == 0.5 and model.decoder.predictor_drop.p == 0.5
    assert model.decoder.drop.p == 0.1                                # word embeddings (released TOKEN_EMBED)
    assert isinstance(model.encoder.w_g, torch.nn.Sequential) and model.encoder.w_g[0].bias is not None
    assert model.encoder.emb_relu and train.optim.grad_clip_value == 0.1 and train.optim.betas == (0.9, 0.999)
    assert model.encoder.visual_fc.in_features == 7                    # the raw grid through its own Linear
    assert pcmnet.Caption().length_normalize is False                 # beams ranked by summed log-prob


def test_the_encoders_visual_stream_reads_the_raw_grid_through_its_own_linear(tok):
    """As released: a visual patch enters the encoder as its raw grid cell (W wide) through Linear(W, H); the
    affinity of Eq. 2, and so which patches are mixed or appended, comes from the projected patches; a
    textual patch is its v^t through textual_fc."""
    conf = tiny_config(grid_dim=5)
    model = tiny_model(conf, tok=tok)
    enc = model.encoder
    batch = tiny_batch(tok, cfg=conf)
    batch["grid"] = torch.randn(4, conf.num_patches, 5, generator=torch.Generator().manual_seed(3))
    assert enc.visual_fc.in_features == 5 and enc.textual_fc.in_features == conf.feature_dim
    g, tokens, types, positions, padding = model.encoder_inputs(batch)   # eval: N_p patches, then the textual ones
    x0 = enc.embed(g, tokens, types, positions, model.visual_grid(batch, positions))
    for b in range(4):
        manual = [enc.global_fc(g[b]) + enc.pos_emb.weight[0] + enc.type_emb.weight[GLOBAL]]
        for j in range(tokens.shape[1]):
            p = int(positions[b, j])
            v = enc.textual_fc(tokens[b, j]) if types[b, j] == TEXTUAL else enc.visual_fc(batch["grid"][b, p - 1])
            manual.append(v + enc.pos_emb.weight[p] + enc.type_emb.weight[types[b, j]])
        summed = torch.stack(manual)
        torch.testing.assert_close(x0[b], enc.emb_ln(F.relu(summed) if enc.emb_relu else summed), atol=1e-5, rtol=1e-5)
    assert (types == TEXTUAL).any()
    zero_grid = dict(batch, grid=torch.zeros_like(batch["grid"]))        # the grid moves nothing of Eq. 1-3
    for a, b in zip(model.encoder_inputs(zero_grid), (g, tokens, types, positions, padding)):
        assert torch.equal(a, b)
    with torch.no_grad():
        torch.testing.assert_close(model.encode(batch).states, enc(g, tokens, types, positions, padding,
                                                                   model.visual_grid(batch, positions)))
        assert not torch.allclose(model.encode(batch).states, model.encode(zero_grid).states)
    # the grid is read (and so cached) only by an instance whose encoder takes it
    grid, patches = (cfg.parse(pcmnet.Train, {"encoder_input": e}, "t") for e in ("grid", "patches"))
    caption = cfg.parse(pcmnet.Caption, {}, "c")
    assert pcmnet.needs(grid).rows["grid"] == "synthetic.grid" and pcmnet.needs(grid, caption).rows["grid"] == "image.grid"
    assert "grid" not in pcmnet.needs(patches).rows and "grid" not in pcmnet.needs(patches, caption).rows
