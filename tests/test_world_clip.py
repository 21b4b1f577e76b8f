"""The world's CLIP (pipeline/world/clip_training.py): a tiny training run whose saved file the pipeline's
loader reads back with the same features, the loss going down, the retrieval metric against brute force,
reproducibility from the seed."""

import os
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from safetensors.torch import load_file

from pipeline.models.clip import load_clip
from pipeline.world.render import render
from pipeline.world.clip_training import (contrastive_loss, encode, encode_text_trimmed,
                                          heldout_pairs, optimizer_for, preprocess_all, render_scenes,
                                          retrieval_recall, train_world_clip)

pytestmark = pytest.mark.usefixtures("one_thread")

NAME = "synthcap-world-vit"
TINY = dict(seed=0, pairs=48, epochs=1, batch_size=16, lr=1e-3, heldout=24, image_size=64, threads=1,
            check_pairs=24, progress=False)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("world-clip")
    return out, train_world_clip(NAME, out, **TINY)


def test_the_config_is_a_standard_open_clip_vit_at_the_world_render_size():
    model, _, preprocess = open_clip.create_model_and_transforms(NAME, pretrained=None)
    assert isinstance(model.visual, open_clip.transformer.VisionTransformer)
    assert model.visual.image_size == (64, 64)
    grid = model.visual.grid_size
    assert grid in ((4, 4), (8, 8))
    tokenizer = open_clip.get_tokenizer(NAME)
    _, captions = heldout_pairs(0, 200)
    tokens = tokenizer(captions)
    assert int(tokens.argmax(dim=-1).max()) + 1 < tokenizer.context_length   # no caption is cut
    assert model.token_embedding.num_embeddings == 49408


def test_a_tiny_run_saves_a_file_load_clip_reads_with_the_same_features(tiny_run):
    out, report = tiny_run
    path = out / "model.safetensors"
    assert report["file"] == path.name and path.is_file()      # the name only: the report is machine-independent
    assert report["pairs"] == 48 and report["epochs"] == 1 and report["steps"] == 3 and report["model"] == NAME
    assert max(report["check"].values()) <= 1e-5          # load_clip vs the model in memory, inside the run
    for key in ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"):
        assert 0.0 <= report[key] <= 1.0
    assert len(report["history"]) == 1
    probe = report["zero_shot_single_object"]
    assert probe["chance"] == 1 / 7 and all(0.0 <= probe[k] <= 1.0 for k in ("shape_accuracy", "colour_accuracy"))

    # and again from outside: the file in a fresh open_clip model vs the pipeline's loader
    model, _, preprocess = open_clip.create_model_and_transforms(NAME, pretrained=None)
    model.load_state_dict(load_file(str(path)))
    model.eval()
    clip = load_clip(NAME, pretrained=str(path))
    scenes, captions = heldout_pairs(0, 8)
    pixels = preprocess_all(render_scenes(scenes, 64), clip.preprocess)
    assert torch.equal(pixels, preprocess_all(render_scenes(scenes, 64), preprocess))
    images, texts = encode(model, pixels, open_clip.get_tokenizer(NAME)(captions))
    np.testing.assert_allclose(clip.encode_pixels(pixels, ["global"])["global"], images.numpy(), atol=1e-5)
    np.testing.assert_allclose(clip.encode_texts(captions), texts.numpy(), atol=1e-5)
    # the columns other stages read: patch tokens and the last block's attention over the 8x8 grid
    columns = clip.encode_pixels(pixels)
    n_patches = int(np.prod(clip.model.visual.grid_size))
    assert columns["patches"].shape == (8, n_patches, clip.dim)
    assert columns["attention"].shape == (8, n_patches + 1, n_patches + 1)
    np.testing.assert_allclose(columns["attention"].sum(-1), 1.0, atol=1e-5)


def test_the_same_seed_gives_the_same_weights_and_another_seed_others(tiny_run, tmp_path):
    out, _ = tiny_run
    first = load_file(str(out / "model.safetensors"))
    again = load_file(str(tmp_path / "again" / train_world_clip(NAME, tmp_path / "again", **TINY)["file"]))
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    other = load_file(str(tmp_path / "other" / train_world_clip(NAME, tmp_path / "other", **{**TINY, "seed": 1})["file"]))
    assert not torch.equal(first["visual.conv1.weight"], other["visual.conv1.weight"])


def test_the_loss_goes_down_on_a_fixed_batch():
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(NAME, pretrained=None)
    scenes, captions = heldout_pairs(3, 16)
    pixels = preprocess_all(render_scenes(scenes, 64), preprocess)
    tokens = open_clip.get_tokenizer(NAME)(captions)
    optimizer = optimizer_for(model, lr=1e-3, weight_decay=0.1)
    model.train()
    losses = []
    for _ in range(30):
        loss = contrastive_loss(model.encode_image(pixels, normalize=True), encode_text_trimmed(model, tokens),
                                model.logit_scale.exp())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]          # 16 pairs being memorised: 2.9 -> 1.6 at seed 0


def test_trimmed_text_encoding_is_encode_text():
    torch.manual_seed(0)
    model, _, _ = open_clip.create_model_and_transforms(NAME, pretrained=None)
    _, captions = heldout_pairs(0, 32)
    tokens = open_clip.get_tokenizer(NAME)(captions)
    with torch.no_grad():
        torch.testing.assert_close(encode_text_trimmed(model, tokens), model.encode_text(tokens, normalize=True),
                                   atol=1e-5, rtol=0)


def brute_force_recall(s: np.ndarray, k: int) -> tuple[float, float]:
    """R@k by the definition: a hit when fewer than k OTHER candidates score at least the true one."""
    n = len(s)
    i2t = sum(sum(s[i, j] >= s[i, i] for j in range(n) if j != i) < k for i in range(n)) / n
    t2i = sum(sum(s[j, i] >= s[i, i] for j in range(n) if j != i) < k for i in range(n)) / n
    return i2t, t2i


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retrieval_recall_is_the_brute_force_count_with_ties_counted_against(seed):
    rng = np.random.default_rng(seed)
    s = rng.integers(0, 6, size=(23, 23)).astype(np.float32)     # few values: many ties
    got = retrieval_recall(s, ks=(1, 3, 5, 10))
    for k in (1, 3, 5, 10):
        assert (got[f"i2t_r{k}"], got[f"t2i_r{k}"]) == pytest.approx(brute_force_recall(s, k))
    assert retrieval_recall(np.eye(5))["i2t_r1"] == 1.0
    assert retrieval_recall(np.ones((5, 5)))["i2t_r1"] == 0.0        # all tied: no hit
    assert retrieval_recall(np.ones((5, 5)))["t2i_r5"] == 1.0        # 4 others tie: rank 4 < 5
    assert retrieval_recall(torch.eye(4).flip(0))["t2i_r1"] == 0.0
    with pytest.raises(ValueError):
        retrieval_recall(np.zeros((3, 4)))


def test_a_synthetic_share_renders_that_share_of_the_web_pairs_in_the_synthetic_style(tmp_path, monkeypatch):
    from pipeline.world import clip_training
    seen = {}
    real = clip_training.render_scenes

    def spy(scenes, size, workers=1, styles=None):
        seen["styles"] = list(styles)
        return real(scenes, size, workers, styles)

    monkeypatch.setattr(clip_training, "render_scenes", spy)
    report = train_world_clip(NAME, tmp_path, **{**TINY, "pairs": 96, "synthetic_share": 0.5})
    train, heldout = seen["styles"][:96], seen["styles"][96:]
    assert report["synthetic_pairs"] == train.count("synthetic") and 30 <= train.count("synthetic") <= 66
    assert set(train) == {"photo", "synthetic"} and set(heldout) == {"photo"}     # retrieval is on photos
    for key in ("zero_shot_single_object", "zero_shot_single_object_synthetic"):
        assert 0.0 <= report[key]["colour_accuracy"] <= 1.0
    assert 0.0 <= report["zero_shot_binding"]["binding_accuracy"] <= 1.0
    scenes, _ = heldout_pairs(0, 3)
    for image, scene, style in zip(real(scenes, 64, styles=["synthetic", "photo", "synthetic"]), scenes,
                                   ["synthetic", "photo", "synthetic"]):
        assert np.array_equal(np.asarray(image), np.asarray(render(scene, style, 64)))
    train_world_clip(NAME, tmp_path / "twins", **{**TINY, "pairs": 96, "synthetic_share": 0.5, "shape_twins": True})
    twins = seen["styles"][:96]
    assert twins[0::2] == twins[1::2] and set(twins) == {"photo", "synthetic"}   # a twin differs in shape alone
    with pytest.raises(ValueError, match="synthetic_share"):
        train_world_clip(NAME, tmp_path / "bad", **{**TINY, "synthetic_share": 1.5})


def test_rendering_in_spawned_processes_gives_the_bytes_of_rendering_in_this_one():
    scenes, _ = heldout_pairs(3, 70)                              # 64 or more: the pool renders them
    styles = ["synthetic" if i % 3 == 0 else "photo" for i in range(70)]
    pooled = render_scenes(scenes, 32, workers=2, styles=styles)
    assert [np.asarray(im).tobytes() for im in pooled] == \
           [np.asarray(render(s, style, 32)).tobytes() for s, style in zip(scenes, styles)]


def test_a_script_without_a_main_guard_still_renders_every_scene(tmp_path):
    """Spawned render processes import the caller's main module; in a script with no `__main__` guard they
    die at once. The pool must then fail over to this process (same bytes), never wait forever."""
    import subprocess
    import sys
    script = tmp_path / "unguarded.py"
    script.write_text(
        "import numpy as np\n"
        "from pipeline.world.clip_training import heldout_pairs, render_scenes\n"
        "scenes, _ = heldout_pairs(3, 70)\n"
        "images = render_scenes(scenes, 32, workers=2)\n"
        f"np.save({str(tmp_path / 'out.npy')!r}, np.stack([np.asarray(im) for im in images]))\n")
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "guard the calling script" in out.stderr
    scenes, _ = heldout_pairs(3, 70)
    assert np.array_equal(np.load(tmp_path / "out.npy"), np.stack([np.asarray(render(s, "photo", 32)) for s in scenes]))
