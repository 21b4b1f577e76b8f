"""The encode path's fast parts give what the plain code gives: the batched numpy pixel normalisation
equals CLIP's own per-image transform, the length-truncated text encoder equals ``model.encode_text`` on
the full 77 tokens, and the decode thread runs only where a core is free for it."""
import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from pipeline.data.images import decode_image
from pipeline.extract import encode
from pipeline.extract.encode import _decode, encode_image_table, overlap_pays
from pipeline.models.clip import load_clip
from pipeline.vectors import l2_normalize_torch

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clip():
    return load_clip("synthcap-tiny-vit", seed=0)


def blob(image: Image.Image, fmt: str) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


@pytest.fixture(scope="module")
def blobs(shared_data):
    rng = np.random.default_rng(0)
    photos = [p.read_bytes() for p in sorted((shared_data / "flickr8k" / "images").glob("*.jpg"))[:3]]
    rgba = Image.fromarray(rng.integers(0, 256, (50, 70, 4), dtype=np.uint8), "RGBA")
    grey = Image.fromarray(rng.integers(0, 256, (300, 40), dtype=np.uint8), "L")
    return photos + [blob(rgba, "PNG"), blob(grey, "PNG"), blob(rgba.convert("RGB"), "WEBP")]


def test_batched_pixels_equal_clips_per_image_transform(clip, blobs):
    assert encode._split_transform(clip.preprocess) is not None          # the fast path is the one tested
    ids = [f"i{k}" for k in range(len(blobs))]
    expected = torch.stack([clip.preprocess(decode_image(b)) for b in blobs])
    got = _decode(clip, blobs, ids)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(got, expected)                                    # the same float32 ops: bit for bit


def test_batched_pixels_equal_the_transform_of_vit_b_32_too(blobs):
    import open_clip
    preprocess = open_clip.image_transform(224, is_train=False)          # ViT-B-32's, without building the model
    fake = type("Clip", (), {"preprocess": preprocess})()
    expected = torch.stack([preprocess(decode_image(b)) for b in blobs])
    assert torch.equal(_decode(fake, blobs, [str(k) for k in range(len(blobs))]), expected)


def test_a_transform_without_to_tensor_normalize_falls_back_to_it(clip, blobs):
    fake = type("Clip", (), {})()
    fake.preprocess = lambda image: torch.full((3, 4, 4), float(image.width))      # not ToTensor + Normalize
    out = _decode(fake, blobs[:2], ["a", "b"])
    assert out.shape == (2, 3, 4, 4)
    assert out[0, 0, 0, 0] == decode_image(blobs[0]).width


def test_overlap_and_inline_decoding_give_the_same_features(clip, blobs):
    table = pa.table({"image_id": [str(k) for k in range(len(blobs))], "image": blobs})
    a = encode_image_table(table, clip, "image_id", 4, "float32", ("global",), overlap=True)
    b = encode_image_table(table, clip, "image_id", 4, "float32", ("global",), overlap=False)
    assert a.equals(b)


def test_decode_thread_only_where_a_core_is_free(clip, monkeypatch):
    monkeypatch.setattr(encode.os, "sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    torch.set_num_threads(2)
    assert not overlap_pays(clip)                                         # torch uses both cores
    torch.set_num_threads(1)
    assert overlap_pays(clip)                                             # a core is free for decoding
    monkeypatch.setattr(clip, "device", "cuda")
    torch.set_num_threads(2)
    assert overlap_pays(clip)                                             # CLIP on a GPU: always
    torch.set_num_threads(1)


TEXTS = ["a dog", "", "two people ride bikes along a river at sunset while a crowd watches from the bridge",
         "A cat.", "word " * 100, "a red double decker bus drives down a busy street", "ok"]


def test_truncated_text_encoder_equals_encode_text_on_77_tokens(clip):
    import open_clip
    model = clip.model
    assert isinstance(model, open_clip.model.CLIP) and model.attn_mask is not None   # the truncating path runs
    full = clip.tokenizer(TEXTS)
    assert full.shape[1] == 77
    with torch.no_grad():
        expected = l2_normalize_torch(model.encode_text(full)).numpy()
    for batch in (1, 3, 256):
        got = clip.encode_texts(TEXTS, batch_size=batch)
        np.testing.assert_allclose(got, expected, atol=1e-5)
    with torch.no_grad():                                                  # a short batch really is cut short
        short = clip.tokenizer(["a dog", "a cat"])
        calls = []
        original = model.transformer.forward
        model.transformer.forward = lambda x, *a, **k: calls.append(x.shape) or original(x, *a, **k)
        try:
            clip._encode_tokens(short)
        finally:
            del model.transformer.forward
    assert calls[0][1] < 10
    assert clip.encode_texts([]).shape == (0, clip.dim)


def test_truncated_text_encoder_equals_encode_text_for_vit_b_32_architecture():
    big = load_clip("ViT-B-32", seed=0)
    with torch.no_grad():
        expected = l2_normalize_torch(big.model.encode_text(big.tokenizer(TEXTS[:4]))).numpy()
    np.testing.assert_allclose(big.encode_texts(TEXTS[:4]), expected, atol=1e-5)


def test_a_resnet_clip_encodes_every_column_from_its_attention_pool():
    """A ResNet CLIP (RN50x4 in the CapDec profile) has no transformer tower: its columns come from the
    attention pool, checked against torch's own multi-head attention over the pool's tokens."""
    import torch.nn.functional as F
    from pipeline.extract.encode import patch_grid
    from pipeline.models.clip import IMAGE_COLUMNS, load_clip
    clip = load_clip("synthcap-tiny-rn", seed=0)
    pixels = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    out = clip.encode_pixels(pixels, IMAGE_COLUMNS)
    assert patch_grid(clip) == {"num_patches": 4, "dim": 64, "grid_dim": 16 * 32, "num_tokens": 5}
    visual, pool = clip.model.visual, clip.model.visual.attnpool
    with torch.no_grad():
        np.testing.assert_allclose(out["global"], F.normalize(visual(pixels), dim=-1).numpy(), atol=1e-6)
        captured = {}
        hook = pool.register_forward_pre_hook(lambda _m, args: captured.__setitem__("x", args[0]))
        visual(pixels)
        hook.remove()
        x = captured["x"].flatten(2).permute(2, 0, 1)                                   # (HW)NC, as the pool
        x = torch.cat([x.mean(0, keepdim=True), x]) + pool.positional_embedding[:, None, :]
        pooled, weights = F.multi_head_attention_forward(
            x, x, x, x.shape[-1], pool.num_heads, None,
            torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]), None, None, False, 0.0,
            pool.c_proj.weight, pool.c_proj.bias, training=False, need_weights=True, use_separate_proj_weight=True,
            q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
            average_attn_weights=True)
    np.testing.assert_allclose(out["attention"], weights.numpy(), atol=1e-5)
    np.testing.assert_allclose(out["cls_attention"], weights[:, 0, 1:].numpy(), atol=1e-5)
    values = pool.c_proj(pool.v_proj(x.permute(1, 0, 2))).detach()          # each cell's value, projected
    assert out["patches"].shape == (3, 4, 64)
    np.testing.assert_allclose(out["patches"], values[:, 1:].numpy(), atol=1e-6)
    np.testing.assert_allclose(F.normalize(pooled[0], dim=-1).numpy(), out["global"], atol=1e-5)
    with torch.no_grad():       # the raw grid: the last stage's output, the pool's input, a cell a row
        cells = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(pixels)))))
    assert out["grid"].shape == (3, 4, 16 * 32)
    np.testing.assert_allclose(out["grid"], cells.flatten(2).permute(0, 2, 1).numpy(), atol=1e-6)


def test_a_resnet_clip_asked_for_the_global_feature_only_builds_nothing_else():
    """CapDec's profile (RN50x4) reads the global feature only: the encoder answers exactly that, the same
    feature as encode_image, and the shape facts name no patch-derived column."""
    from pipeline.extract.encode import patch_grid
    from pipeline.models.clip import load_clip
    clip = load_clip("synthcap-tiny-rn", seed=0)
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    out = clip.encode_pixels(pixels, ("global",))
    assert list(out) == ["global"]
    with torch.no_grad():
        expected = l2_normalize_torch(clip.model.encode_image(pixels)).numpy()
    np.testing.assert_allclose(out["global"], expected, atol=1e-6)
    assert patch_grid(clip, ("global",)) == {"num_patches": 4, "dim": 64}


def test_a_vit_grid_is_the_last_layer_before_clips_head_and_the_patches_are_it_through_the_head():
    """``grid``: the last block's patch tokens (CLS dropped) before ln_post / proj, as open_clip's own
    intermediates give them; ``patches`` = ln_post(grid) @ proj (PCM-Net: its encoder reads the grid, Eq. 2
    the projected patches)."""
    from pipeline.extract.encode import patch_grid
    from pipeline.models.clip import load_clip
    clip = load_clip("synthcap-tiny-vit", seed=0)
    visual = clip.model.visual
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    out = clip.encode_pixels(pixels, ("global", "patches", "grid"))
    with torch.no_grad():
        last = visual.forward_intermediates(pixels, indices=1, output_fmt="NLC", intermediates_only=True)
        expected = last["image_intermediates"][-1]
        projected = visual.ln_post(expected) @ visual.proj
    assert out["grid"].shape == (2, 16, 64)               # (64 / 16)^2 patches, width 64
    np.testing.assert_allclose(out["grid"], expected.numpy(), atol=1e-5)
    np.testing.assert_allclose(out["patches"], projected.numpy(), atol=1e-5)
    assert patch_grid(clip, ("global", "grid")) == {"num_patches": 16, "dim": 64, "grid_dim": 64}
