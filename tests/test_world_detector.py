"""The world's shape detector (pipeline/world/detector.py, detector_training.py): a saved folder loads
through load_detector and detects as the model in memory; detections do not depend on the batch; the
decoding of the heads by hand; the label P/R/F1 and box IoU metrics by hand; a seed gives the weights; the
synthetic share of the training images."""
import io
import json

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file

from pipeline.extract.tag import distinct_tags, tag_table
from pipeline.models.detector import Detection, WorldShapeDetector, load_detector
from pipeline.world.detector import (CONFIG_FILE, WEIGHTS_FILE, WorldDetectorConfig, decode, load_world_detector,
                                     save_world_detector)
from pipeline.world.detector_training import (draw_scenes, fit_world_detector, label_prf, matched_ious,
                                              train_world_detector)
from pipeline.world.render import render
from pipeline.world.scenes import SHAPES

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = dict(images=48, epochs=1, batch_size=16, lr=3e-3, heldout=6, progress=False)


@pytest.fixture(scope="module")
def tiny():
    """A detector after one short epoch (its detections are poor, but they are many at threshold 0)."""
    model, report = fit_world_detector(seed=0, **TINY)
    return model, report


def photos(n: int, seed: int = 5) -> list:
    """Photo renderings, one of them enlarged to a non-square size (resized to 64 by the detector)."""
    images = [render(s, "photo", 64) for s in draw_scenes(seed, "test", n)]
    images[1] = images[1].resize((96, 80))
    return images


def test_a_saved_folder_loads_through_load_detector_and_detects_as_the_model_in_memory(tiny, tmp_path):
    model, report = tiny
    assert set(report["heldout_photo"]) >= {"precision", "recall", "f1", "box_mean_iou", "threshold"}
    save_world_detector(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_FILE).read_text())
    assert config["model_type"] == "synthcap-world-detector"
    assert config["labels"] == list(SHAPES) and config["input_size"] == 64
    assert (tmp_path / WEIGHTS_FILE).is_file()

    detector = load_detector("world-detector", str(tmp_path), seed=7)
    assert isinstance(detector, WorldShapeDetector)
    assert detector.identity == {"kind": "detector", "name": "world-detector", "pretrained": str(tmp_path),
                                 "seed": None, "weights_sha256": report["weights_sha256"]}
    assert detector.vocabulary == list(SHAPES) and detector.input_size == (64, 64)
    images = photos(4)
    loaded, in_memory = detector.detect(images, 0.0), model.detect(images, 0.0)
    assert loaded == in_memory
    assert all(d.labels and d.scores == sorted(d.scores, reverse=True) for d in loaded)
    width, height = images[1].size
    assert all(0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height for x0, y0, x1, y1 in loaded[1].boxes)


def test_detections_do_not_depend_on_the_batch(tiny):
    model, _ = tiny
    images = photos(8, seed=6)
    batched = model.detect(images, 0.0)
    assert [model.detect([im], 0.0)[0] for im in images] == batched
    assert model.detect(images[3:5], 0.0) == batched[3:5]


def test_decoding_hand_made_heads():
    config = WorldDetectorConfig()              # 64 px input, a 16 x 16 grid of stride 4
    label = {name: i for i, name in enumerate(config.labels)}
    heat, offset, size = torch.zeros(len(SHAPES), 16, 16), torch.zeros(2, 16, 16), torch.zeros(2, 16, 16)

    def put(shape, gy, gx, score, off=(0.0, 0.0), wh=(2.0, 2.0)):
        heat[label[shape], gy, gx] = score
        offset[:, gy, gx], size[:, gy, gx] = torch.tensor(off), torch.tensor(wh)

    put("star", 5, 2, 0.9, (0.5, 0.25), (4.0, 3.0))   # centre (10, 21) px, 16 x 12 px
    heat[label["star"], 5, 3] = 0.5                   # its neighbour: not a peak
    put("cross", 15, 15, 0.7, (0.5, 0.5), (4.0, 4.0))  # centre (62, 62): the box overhangs, clipped
    put("circle", 10, 12, 0.6)                        # centre (48, 40), 8 x 8 px
    heat[label["square"], 10, 12] = 0.4               # same place, another label: NMS drops it
    put("heart", 1, 1, 0.2)                           # under the threshold
    d = decode(heat, offset, size, 0.3, config, image_size=(128, 64))    # an image twice as wide
    assert d.labels == ["star", "cross", "circle"]
    assert d.scores == pytest.approx([0.9, 0.7, 0.6])
    torch.testing.assert_close(torch.tensor(d.boxes), torch.tensor([[4., 15, 36, 27], [108, 54, 128, 64],
                                                                    [88, 36, 104, 44]]))
    assert decode(heat, offset, size, 0.95, config, (64, 64)) == Detection([], [], [])
    assert decode(heat, offset, size, 0.1, config, (64, 64)).labels == ["star", "cross", "circle", "heart"]


def test_label_precision_recall_f1_and_box_iou_by_hand():
    predicted = [{"circle", "star"}, {"square"}, set()]
    truth = [{"circle"}, {"square", "heart"}, {"cross"}]
    out = label_prf(predicted, truth)    # tp 1 + 1, fp 1 (star), fn 1 (heart) + 1 (cross)
    assert (out["tp"], out["fp"], out["fn"]) == (2, 1, 2)
    assert out["precision"] == pytest.approx(2 / 3) and out["recall"] == pytest.approx(1 / 2)
    assert out["f1"] == pytest.approx(4 / 7)
    assert label_prf([set()], [set()])["f1"] == 0.0
    detection = Detection(["circle", "circle", "star"], [0.9, 0.8, 0.7],
                          [[5, 0, 15, 10], [0, 0, 10, 10], [0, 0, 4, 4]])
    # the first circle takes the one true circle (IoU 1/3), the second finds none left; no true star
    assert matched_ious(detection, ["circle", "square"], [[0, 0, 10, 10], [5, 0, 15, 10]]) == pytest.approx([1 / 3])


def test_a_seed_gives_the_same_weights(tmp_path):
    kw = dict(TINY, images=32, heldout=4)
    first = train_world_detector(tmp_path / "a", seed=3, **kw)
    second = train_world_detector(tmp_path / "b", seed=3, **kw)
    other = train_world_detector(tmp_path / "c", seed=4, **kw)
    a, b = load_file(tmp_path / "a" / WEIGHTS_FILE), load_file(tmp_path / "b" / WEIGHTS_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert first["weights_sha256"] == second["weights_sha256"] != other["weights_sha256"]
    assert load_world_detector(tmp_path / "a").config == load_world_detector(tmp_path / "c").config


def test_the_tagger_runs_the_loaded_detector(tiny, tmp_path):
    """tag_table (the tag stages) over PNG blobs: each image's distinct tags of its detections."""
    save_world_detector(tiny[0], tmp_path)
    detector = load_detector("world-detector", str(tmp_path))
    images = photos(3, seed=8)
    blobs = []
    for im in images:
        out = io.BytesIO()
        im.save(out, "PNG")
        blobs.append(out.getvalue())
    table = tag_table(pa.table({"image_id": ["a", "b", "c"], "image": blobs}), detector, "image_id", 0.0, 3,
                      batch_size=2, draft_size=detector.input_size)
    expected = [distinct_tags(d, 3) for d in detector.detect(images, 0.0)]
    assert table.column("labels").to_pylist() == [d.labels for d in expected]


def test_the_synthetic_share_renders_that_share_of_the_training_images_in_the_synthetic_style(monkeypatch):
    """``synthetic_share`` draws each training image's style from its own stream: 0 renders every image as a
    photo (the scenes and everything else as before), 1 every image synthetic; out of [0, 1] is refused."""
    import pipeline.world.detector_training as training
    seen = {}
    real = training.render_pixels

    def spy(scenes, style, size):
        seen.setdefault("styles", style if isinstance(style, list) else [style] * len(scenes))
        seen.setdefault("scenes", scenes)
        return real(scenes, style, size)

    monkeypatch.setattr(training, "render_pixels", spy)
    kw = dict(TINY, images=40, heldout=2)
    styles = {}
    for share in (0.0, 0.5, 1.0):
        seen.clear()
        _, report = fit_world_detector(seed=1, synthetic_share=share, **kw)
        styles[share] = seen["styles"]
        assert report["synthetic_images"] == seen["styles"].count("synthetic")
        assert seen["scenes"] == draw_scenes(1, "detector", 40)      # the scenes do not depend on the share
    assert set(styles[0.0]) == {"photo"} and set(styles[1.0]) == {"synthetic"}
    assert 8 <= styles[0.5].count("synthetic") <= 32
    pixels = real(draw_scenes(1, "detector", 3), ["photo", "synthetic", "photo"], 64)
    assert torch.equal(pixels[1], torch.from_numpy(
        np.array(render(draw_scenes(1, "detector", 3)[1], "synthetic", 64))).permute(2, 0, 1))
    with pytest.raises(ValueError, match="synthetic_share"):
        fit_world_detector(seed=1, synthetic_share=1.5, **kw)
    with pytest.raises(ValueError, match="2 styles for 3 scenes"):
        real(draw_scenes(1, "detector", 3), ["photo", "photo"], 64)
