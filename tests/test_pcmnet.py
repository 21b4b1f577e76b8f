"""PCM-Net: each equation against a direct computation, training on real captions, checkpoints, and
the pipeline entry points on artifacts written like the stages write them."""
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from pipeline import paths
from pipeline.methods import method_module
from pipeline.methods.pcmnet import (GLOBAL, TEXTUAL, VISUAL, PCMNet, PCMNetConfig, caption_batches,
                                     checkpoint_meta, clip_weights, load_checkpoint, mix_up_inference,
                                     mix_up_train, no_mix, noam_lr, noam_scheduler, patch_affinity, pcm,
                                     related_patches, salient_concepts, save_checkpoint, textual_feature_map,
                                     train_pcmnet, variant, weighted_caption_loss)
from pipeline.nn.prefix_decoder import CaptionTokenizer


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
    tokens, types, positions = pcm(g, patches, concepts, k=2, m=2, tau=0.01, training=True)
    assert tokens.shape == patches.shape
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
    tokens, types, positions = mix_up_train(visual, textual, idx)
    for b in range(3):
        for j in range(7):
            src = textual if j in idx[b].tolist() else visual
            assert torch.equal(tokens[b, j], src[b, j])
        assert (types[b] == TEXTUAL).sum() == 2
    tokens, types, positions = mix_up_inference(visual, textual, idx)
    assert tokens.shape == (3, 9, 4) and types.shape == (3, 9) and positions.shape == (3, 9)
    assert torch.equal(tokens[:, :7], visual)                          # the real patch map untouched
    for b in range(3):
        for slot, j in enumerate(idx[b].tolist()):
            assert torch.equal(tokens[b, 7 + slot], textual[b, j])     # the top-M v^t_j appended
            assert positions[b, 7 + slot] == j + 1                     # at the position of patch j
    assert (types[:, :7] == VISUAL).all() and (types[:, 7:] == TEXTUAL).all()


def test_inference_pcm_concatenates_m_textual_patches():
    g, patches, concepts = crafted()
    tokens, types, positions = pcm(g, patches, concepts, k=2, m=2, tau=0.01, training=False)
    assert tokens.shape == (1, 7, 6)
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


def tiny_model(cfg=None, seed=0):
    cfg = cfg or tiny_config()
    torch.manual_seed(seed)
    return PCMNet(cfg, torch.randn(cfg.num_concepts, cfg.feature_dim)).eval()


def test_embedding_uses_one_fc_per_stream_with_position_and_type(tok):
    model = tiny_model()
    enc = model.encoder
    g, tokens, types, positions = model.encoder_inputs(tiny_batch(tok))
    x0 = enc.embed(g, tokens, types, positions)
    for b in range(2):
        manual = [enc.global_fc(g[b]) + enc.pos_emb.weight[0] + enc.type_emb.weight[GLOBAL]]
        for j in range(tokens.shape[1]):
            fc = enc.textual_fc if types[b, j] == TEXTUAL else enc.visual_fc
            manual.append(fc(tokens[b, j]) + enc.pos_emb.weight[positions[b, j]] + enc.type_emb.weight[types[b, j]])
        torch.testing.assert_close(x0[b], enc.emb_ln(torch.stack(manual)), atol=1e-5, rtol=1e-5)
    assert x0.shape == (4, 1 + 6 + 2, 16)                 # eval: Np + M tokens after the global one


def test_eq6_eq7_inter_layer_global_feature(tok):
    model = tiny_model()
    enc = model.encoder
    inputs = model.encoder_inputs(tiny_batch(tok))
    out = enc(*inputs)
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


def test_base_variant_feeds_the_patch_map_as_it_is(tok):
    cfg = tiny_config(mixup=False, num_concepts=0)
    model = PCMNet(cfg).eval()
    batch = tiny_batch(tok, cfg=cfg)
    g, tokens, types, positions = model.encoder_inputs(batch)
    assert torch.equal(tokens, batch["patches"]) and (types == VISUAL).all()
    assert model.encode(batch).shape == (4, 1 + 6, 16)
    assert no_mix(batch["patches"])[2][0].tolist() == [1, 2, 3, 4, 5, 6]
    assert [variant({"mixup": m, "cxe": c}) for m, c in ((0, 0), (1, 0), (0, 1), (1, 1))] == \
        ["Base", "Base+Mix-up", "Base+CXE", "Base+Mix-up+CXE"]


def test_noise_only_on_the_global_input_at_training(tok):
    cfg = tiny_config(feature_dim=8, noise_variance=0.016)
    model = tiny_model(cfg)
    batch = tiny_batch(tok, cfg=cfg)
    batch["global"] = torch.zeros(4, 8)
    g, *_ = model.encoder_inputs(batch)
    assert torch.equal(g, batch["global"])                             # eval: clean
    model.train()
    big = dict(batch, **{"global": torch.zeros(64, 8), "patches": torch.randn(64, 6, 8)})
    g, tokens, types, positions = model.encoder_inputs(big)
    assert g.var().item() == pytest.approx(0.016, rel=0.15)
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
    model = tiny_model()
    batch = tiny_batch(tok)
    batch["text_feature"] = batch["global"] * 2.0                      # cos 1 -> weight 1
    batch["text_feature"][1] = -batch["global"][1]                     # cos -1 -> weight 0
    loss, weights = model.loss(batch, clip_w=4.0)
    torch.testing.assert_close(weights, torch.tensor([1.0, 0.0, 1.0, 1.0]))
    expected = weighted_caption_loss(model(batch), batch["tokens"], batch["lengths"], weights)
    torch.testing.assert_close(loss, expected)
    plain, none = model.loss(batch, clip_w=None)
    assert none is None and plain > loss


@pytest.mark.parametrize("hidden, warmup, factor", [(512, 10000, 1.0), (64, 20, 0.5)])
def test_noam_schedule(hidden, warmup, factor):
    for step in (1, 2, warmup // 2, warmup, 2 * warmup, 10 * warmup):
        expected = factor * hidden ** -0.5 * min(step ** -0.5, step * warmup ** -1.5)
        assert noam_lr(step, hidden, warmup, factor) == pytest.approx(expected, rel=1e-12)
    assert noam_lr(warmup, hidden, warmup, factor) == pytest.approx(factor / math.sqrt(hidden * warmup))
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=123.0)
    sched = noam_scheduler(opt, hidden, warmup, factor)
    for i in range(5):
        assert opt.param_groups[0]["lr"] == pytest.approx(noam_lr(i + 1, hidden, warmup, factor), rel=1e-12)
        opt.step()
        sched.step()


# --- training on real captions ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_slice(shared_data):
    """64 Flickr8k train captions whose photos are in shared_data, encoded with the tiny seeded CLIP.
    The image side is the CLIP features of the captions' real photos: stand-ins for their
    synthetic images (no diffusion model runs in tests), so every pair is a true image-caption pair.
    Plus 4 photos outside the train split as an eval set, and a 40-concept vocabulary from all captions."""
    from pipeline.extract.concepts import concept_prompt, concept_vocabulary
    from pipeline.data.captions import read_captions
    from pipeline.runtime import clip_model

    folder = shared_data / "flickr8k"
    records = read_captions(folder / "Flickr8k.token.txt").records
    train_split = set((folder / "Flickr_8k.trainImages.txt").read_text().split())
    photos = {p.name for p in (folder / "images").iterdir()}
    captions = [r for r in records if r.group_id in photos and r.group_id in train_split][:64]
    eval_images = sorted(photos - train_split)[:4]
    clip = clip_model({"models": {"clip": {"name": "synthcap-tiny-vit", "pretrained": None, "seed": 0}}})
    words = concept_vocabulary([r.text for r in records], 40)
    return {"folder": folder, "captions": captions, "eval_images": eval_images, "clip": clip, "words": words,
            "concepts": clip.encode_texts([concept_prompt(w) for w in words])}


def image_blobs(folder: Path, names):
    return [(folder / "images" / n).read_bytes() for n in names]


def test_training_on_real_captions_lowers_the_loss(real_slice, tok):
    from PIL import Image
    clip, captions = real_slice["clip"], real_slice["captions"]
    names = sorted({r.group_id for r in captions})
    enc = clip.encode_images([Image.open(real_slice["folder"] / "images" / n) for n in names])
    row = [names.index(r.group_id) for r in captions]
    tokens, lengths = tok.encode([r.text for r in captions], 24)
    data = {"global": torch.from_numpy(enc["global"][row]), "patches": torch.from_numpy(enc["patches"][row]),
            "text_feature": torch.from_numpy(clip.encode_texts([r.text for r in captions])),
            "tokens": tokens, "lengths": lengths}
    cfg = PCMNetConfig(feature_dim=clip.dim, num_patches=data["patches"].shape[1], hidden=32, heads=4,
                       ffn_dim=64, max_len=24, num_concepts=len(real_slice["words"]), dropout=0.0)
    torch.manual_seed(0)
    model = PCMNet(cfg, torch.from_numpy(real_slice["concepts"]))

    def batches(epoch):
        order = np.random.default_rng(epoch).permutation(64)
        for s in range(0, 64, 16):
            yield {k: v[order[s:s + 16]] for k, v in data.items()}

    @torch.no_grad()
    def plain_ce():                                                    # over the 64 pairs, 16 at a time
        model.eval()
        return np.mean([model.loss({k: v[s:s + 16] for k, v in data.items()}, None)[0].item()
                        for s in range(0, 64, 16)])

    before = plain_ce()
    result = train_pcmnet(model, batches, epochs=4, warmup_steps=8, clip_w=4.0, progress=False)
    after = plain_ce()
    assert result["steps"] == 16 and len(result["epoch_loss"]) == 4
    assert before > 10.0 and after < before - 3.0                      # plain CE over the 64 pairs
    assert result["epoch_loss"][-1] < result["epoch_loss"][0]
    assert 0.0 <= result["mean_clip_weight"] <= 1.0
    texts = caption_batches(model, [{k: data[k][:2] for k in ("global", "patches")}], beam_size=3, max_len=12)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)   # may be empty this early


# --- checkpoints ------------------------------------------------------------------------------------

def test_checkpoint_round_trip(tok, tmp_path):
    model = tiny_model()
    path = tmp_path / "model.safetensors"
    identity = {"kind": "clip", "name": "x", "embed_dim": 8}
    save_checkpoint(model, path, identity, [f"w{i}" for i in range(10)])
    meta = checkpoint_meta(path)
    assert meta["config"] == model.cfg and meta["clip_model"] == identity and meta["concepts"][3] == "w3"
    loaded = load_checkpoint(path)
    assert not loaded.training
    for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    batch = tiny_batch(tok)
    assert loaded.generate(batch, 3, 8) == model.generate(batch, 3, 8)
    assert loaded.generate(batch, 1, 8) == model.generate(batch, 1, 8)


def test_load_rejects_foreign_safetensors(tmp_path):
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "x.safetensors"), metadata={"format": "other"})
    with pytest.raises(ValueError, match=r"x.safetensors is not a synthcap.pcmnet.v1 checkpoint"):
        load_checkpoint(tmp_path / "x.safetensors")


# --- the pipeline entry points on stage-written artifacts --------------------------------------------

def write_artifacts(root: Path, s: dict, monkeypatch) -> dict:
    """corpus, features/{text,synthetic,eval/tiny} and concepts as the stages write them (16 rows a shard)."""
    from pipeline.extract.encode import encode_image_table, encode_text_table, patch_grid
    from pipeline.data.shards import feature_array, write_sharded, write_table_atomic
    from stages.corpus import CORPUS_SCHEMA

    for name, rel in (("CORPUS", "corpus"), ("TEXT_FEATURES", "features/text"),
                      ("SYNTHETIC_FEATURES", "features/synthetic"), ("EVAL_FEATURES", "features/eval"),
                      ("CONCEPTS", "concepts")):
        monkeypatch.setattr(paths, name, root / rel)
    clip, folder = s["clip"], s["folder"]
    rows = [r.to_dict() for r in s["captions"]]
    meta = {"model": clip.identity, "dtype": "float16"}
    corpus = lambda t: pa.Table.from_pylist(rows[t.start:t.stop], schema=CORPUS_SCHEMA)
    write_sharded(paths.CORPUS, len(rows), 16, "corpus", corpus, {"model": None})
    write_sharded(paths.TEXT_FEATURES, len(rows), 16, "text",
                  lambda t: encode_text_table(corpus(t), clip, 16, "float16"), meta)

    def synthetic(t):                                  # the captions' real photos stand in for synthetic images
        part = rows[t.start:t.stop]
        images = pa.table({"caption_id": [r["caption_id"] for r in part],
                           "image": image_blobs(folder, [r["group_id"] for r in part])})
        return encode_image_table(images, clip, "caption_id", 16, "float16")

    write_sharded(paths.SYNTHETIC_FEATURES, len(rows), 16, "synthetic", synthetic, {**meta, **patch_grid(clip)})
    eval_table = pa.table({"image_id": s["eval_images"], "image": image_blobs(folder, s["eval_images"])})
    write_sharded(paths.EVAL_FEATURES / "tiny", len(s["eval_images"]), 16, "eval",
                  lambda t: encode_image_table(eval_table.slice(t.start, t.stop - t.start), clip, "image_id", 16,
                                               "float16"), {**meta, **patch_grid(clip)})
    table = pa.table({"concept": s["words"], "count": pa.array(range(len(s["words"]), 0, -1), pa.int64()),
                      "text_feature": feature_array(s["concepts"], "float16")})
    write_table_atomic(paths.CONCEPTS / "concepts.parquet", table, {"model": clip.identity})
    return {"evalsets": {"tiny": {"images": "unused"}}, "feature_dtype": "float16"}


PIPELINE_CFG = {"method": "pcmnet", "mixup": True, "cxe": True, "salient_k": 5, "mix_m": 5, "tau": 0.01,
                "clip_w": 4.0, "noise_variance": 0.016, "hidden": 32, "heads": 4, "ffn_dim": 64,
                "encoder_layers": 2, "decoder_layers": 2, "dropout": 0.0, "max_len": 16, "epochs": 3,
                "batch_size": 16, "warmup_steps": 4, "lr_factor": 1.0, "seed": 0, "beam_size": 3}


def test_pipeline_train_and_caption(real_slice, tmp_path, monkeypatch):
    from pipeline.data.shards import ModelMismatchError
    p = write_artifacts(tmp_path / "artifacts", real_slice, monkeypatch)
    module = method_module("pcmnet")
    report = module.train("pcmnet", PIPELINE_CFG, p, tmp_path / "model")
    assert report["variant"] == "Base+Mix-up+CXE" and "summary" in report
    assert report["steps"] == 12 and report["training_pairs"] == 64 and report["num_concepts"] == 40
    assert report["num_patches"] == 16 and report["clip_model"] == real_slice["clip"].identity
    assert report["epoch_loss"][-1] < report["epoch_loss"][0]
    meta = checkpoint_meta(tmp_path / "model" / "model.safetensors")
    assert meta["concepts"] == real_slice["words"] and meta["config"].num_patches == 16

    captions = module.caption("pcmnet", PIPELINE_CFG, p, tmp_path / "model")
    assert set(captions) == {"tiny"} and set(captions["tiny"]) == set(real_slice["eval_images"])
    assert all(isinstance(c, str) for c in captions["tiny"].values())

    model = load_checkpoint(tmp_path / "model" / "model.safetensors")      # trained on another CLIP: refused
    (tmp_path / "other").mkdir()
    save_checkpoint(model, tmp_path / "other" / "model.safetensors", {**real_slice["clip"].identity, "seed": 7},
                    meta["concepts"])
    with pytest.raises(ModelMismatchError):
        module.caption("pcmnet", PIPELINE_CFG, p, tmp_path / "other")
