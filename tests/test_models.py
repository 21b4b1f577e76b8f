"""Model loaders: seeded small models, the real loading paths through local checkpoints, CLIP's extra
outputs, the offline CLIP BPE tokenizer (pipeline/models/bpe.py)."""

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.models.bpe import clip_bpe_tokenizer, clip_tokenizer_from_open_clip
from pipeline.models.clip import clip_for, clip_from_identity, load_clip
from pipeline.models.detector import load_detector
from pipeline.models.diffusion import load_text_to_image

CLIP_NAME, SD_NAME, DETR_NAME = "synthcap-tiny-vit", "synthcap-tiny-sd", "synthcap-tiny-detr"


def photos(shared_data, n=3):
    return [Image.open(p).convert("RGB") for p in sorted((shared_data / "flickr8k" / "images").glob("*.jpg"))[:n]]


def encode_images(clip, images):
    """What the encode stages do with decoded images: CLIP's own preprocessing, then encode_pixels."""
    return clip.encode_pixels(torch.stack([clip.preprocess(im.convert("RGB")) for im in images]))


@pytest.fixture(scope="module")
def clip():
    return load_clip(CLIP_NAME, seed=0)


def test_seeded_clip_is_reproducible_and_seed_changes_identity(clip):
    assert load_clip(CLIP_NAME, seed=0).identity == clip.identity
    assert load_clip(CLIP_NAME, seed=1).identity["weights_sha256"] != clip.identity["weights_sha256"]


def test_clip_from_a_local_checkpoint_file_gives_the_same_features(clip, tmp_path, shared_data):
    path = tmp_path / "tiny-clip.pt"
    torch.save(clip.model.state_dict(), path)
    loaded = load_clip(CLIP_NAME, pretrained=str(path))
    assert loaded.identity["weights_sha256"] == clip.identity["weights_sha256"]
    assert loaded.identity["pretrained"] == str(path)
    images = photos(shared_data)
    np.testing.assert_array_equal(encode_images(loaded, images)["global"], encode_images(clip, images)["global"])


def test_clip_outputs_match_a_direct_computation(clip, shared_data):
    images = photos(shared_data, 2)
    out = encode_images(clip, images)
    visual = clip.model.visual
    pixels = torch.stack([clip.preprocess(im) for im in images])
    with torch.no_grad():  # run the tower by hand: embeddings, blocks, and the last block's attention
        x = visual._embeds(pixels)
        for block in visual.transformer.resblocks[:-1]:
            x = block(x)
        h = visual.transformer.resblocks[-1].ln_1(x)
        attn = visual.transformer.resblocks[-1].attn
        q, k, _ = torch.nn.functional.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
        heads = attn.num_heads
        split = lambda t: t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)
        weights = torch.softmax(split(q) @ split(k).transpose(-1, -2) / (q.shape[-1] // heads) ** 0.5, -1).mean(1)
        x = visual.transformer.resblocks[-1](x)
        tokens = visual.ln_post(x)
        expected_patches = tokens[:, 1:] @ visual.proj
        expected_global = tokens[:, 0] @ visual.proj
    np.testing.assert_allclose(out["cls_attention"], weights[:, 0, 1:].numpy(), atol=1e-5)
    np.testing.assert_allclose(out["patches"], expected_patches.numpy(), atol=1e-4)
    expected_global = expected_global / expected_global.norm(dim=-1, keepdim=True)
    np.testing.assert_allclose(out["global"], expected_global.numpy(), atol=1e-5)
    grid = visual.grid_size[0] * visual.grid_size[1]
    assert out["patches"].shape == (2, grid, clip.dim) and out["cls_attention"].shape == (2, grid)
    texts = clip.encode_texts(["a dog runs on the grass", "two people ride bikes"])
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1, atol=1e-5)


def test_clip_for_loads_once_and_clip_from_identity_refuses_other_weights(clip):
    cached = clip_for(CLIP_NAME, None, 0, "fp32", "cpu")
    assert cached is clip_for(CLIP_NAME, None, 0, "fp32", "cpu")            # once per process and configuration
    assert cached.identity == clip.identity
    assert clip_from_identity(clip.identity) is cached                     # the producer of an artifact, again
    with pytest.raises(ValueError, match=r"not the 000000000000 the artifacts were made with"):
        clip_from_identity({**clip.identity, "weights_sha256": "0" * 64})


def test_unknown_clip_model_error_names_it_and_the_fix(tmp_path):
    with pytest.raises(RuntimeError, match=r"(?s)clip model 'ViT-B-32' \(pretrained='.*missing.pt'\).*local path"):
        load_clip("ViT-B-32", pretrained=str(tmp_path / "missing.pt"))


@pytest.mark.slow     # 15-35 s on 2 cores: two pipelines, a save and a load
def test_diffusion_from_a_saved_folder_gives_the_same_images(tmp_path):
    small = load_text_to_image(SD_NAME, seed=0)
    small.pipe.save_pretrained(tmp_path / "tiny-sd")
    loaded = load_text_to_image(SD_NAME, pretrained=str(tmp_path / "tiny-sd"))
    assert loaded.identity["weights_sha256"] == small.identity["weights_sha256"]
    assert loaded.resolution == small.resolution == 64
    prompts, seeds = ["a dog on a beach", "a red bus"], [11, 12]
    a = small.generate(prompts, seeds, steps=2, guidance_scale=7.5)
    b = loaded.generate(prompts, seeds, steps=2, guidance_scale=7.5)
    # same weights, same images; a differently aligned weight buffer may round one pixel level apart
    for x, y in zip(a, b):
        diff = np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16))
        assert diff.max() <= 1 and diff.mean() < 0.01
    # alone or in a batch, the same image up to one level: a batched UNet's float sums can differ in the
    # last bit on some CPUs (so generate.batch_size is a parameter, not a speed-only setting)
    alone = np.asarray(small.generate(prompts[1:], seeds[1:], steps=2, guidance_scale=7.5)[0], np.int16)
    diff = np.abs(alone - np.asarray(a[1], np.int16))
    assert diff.max() <= 1 and diff.mean() < 0.01, "an image must not depend on its batch beyond the last bit"


def test_diffusion_tokenizer_built_offline_matches_clip_bpe(clip):
    pipe = load_text_to_image(SD_NAME, seed=0).pipe
    text = "A man rides a horse on the beach."
    hf_ids = pipe.tokenizer(text).input_ids
    clip_ids = clip.tokenizer([text])[0]
    assert hf_ids == clip_ids[:len(hf_ids)].tolist()


def test_offline_clip_bpe_tokenizer_has_clip_ids(clip, tmp_path):
    texts = ["A man rides a horse on the beach.", "two dogs, 3 cats & a bird's nest", "snow-covered  mountains"]
    built = clip_tokenizer_from_open_clip(tmp_path / "bpe")
    assert (tmp_path / "bpe" / "vocab.json").is_file() and (tmp_path / "bpe" / "merges.txt").is_file()
    shared = clip_bpe_tokenizer()
    assert shared is clip_bpe_tokenizer()                                   # built once per process
    assert len(shared) == len(built) == 49408
    assert (shared.bos_token_id, shared.eos_token_id, shared.pad_token_id) == (49406, 49407, 49407)
    for text in texts:
        ids = clip.tokenizer([text])[0]
        n = int((ids != 0).sum())
        assert shared(text).input_ids == built(text).input_ids == ids[:n].tolist()


def test_missing_diffusion_model_error_names_it(tmp_path):
    with pytest.raises(RuntimeError, match="could not load the diffusion model 'sd'"):
        load_text_to_image("sd", pretrained=str(tmp_path / "nowhere"))


def test_detector_from_a_saved_folder_gives_the_same_detections(tmp_path, shared_data):
    small = load_detector(DETR_NAME, seed=0)
    small.model.save_pretrained(tmp_path / "tiny-detr")
    small.processor.save_pretrained(tmp_path / "tiny-detr")
    loaded = load_detector(DETR_NAME, pretrained=str(tmp_path / "tiny-detr"))
    images = photos(shared_data)
    a, b = small.detect(images, 0.3), loaded.detect(images, 0.3)
    assert [(d.labels, d.scores) for d in a] == [(d.labels, d.scores) for d in b]
    assert any(d.labels for d in a), "the small detector should emit tags at this threshold"
    for d, im in zip(a, images):
        assert all(s >= 0.3 for s in d.scores) and "N/A" not in d.labels
        assert all(0 <= x0 <= x1 <= im.width + 1 and 0 <= y0 <= y1 <= im.height + 1 for x0, y0, x1, y1 in d.boxes)
    assert "person" in small.vocabulary and "N/A" not in small.vocabulary and len(small.vocabulary) == 80
