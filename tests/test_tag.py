"""The tagger's bounded memory: images reach the detector reduced to about its input size (JPEGs decoded at
reduced DCT scale, any image then box-reduced by an integer factor), and the boxes come back in pixels of
the full-size, upright image."""
import io
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipeline.data.images import FULL_SIZE_KEY
from pipeline.extract.tag import _decode_for_detector, detector_input_size, tag_table
from pipeline.models.detector import Detection


def blob(image: Image.Image, fmt: str, **kw) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **kw)
    return out.getvalue()


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(1, height // 50), max(1, width // 50), 3), dtype=np.uint8)
    return Image.fromarray(small, "RGB").resize((width, height))


class FrameDetector:
    """A detector that reports one box: the whole image it was handed, and remembers the sizes it saw."""

    def __init__(self, size):
        self.processor = SimpleNamespace(size=size)
        self.seen = []

    def detect(self, images, threshold):
        self.seen += [im.size for im in images]
        return [Detection(["thing"], [0.9], [[0.0, 0.0, float(im.width), float(im.height)]]) for im in images]


def test_detector_input_size_reads_a_dict_or_a_size_dict():
    assert detector_input_size(FrameDetector({"shortest_edge": 64, "longest_edge": 96})) == (64, 64)
    assert detector_input_size(FrameDetector(SimpleNamespace(shortest_edge=800, longest_edge=1333))) == (800, 800)
    assert detector_input_size(FrameDetector({"height": 32, "width": 32})) is None
    assert detector_input_size(SimpleNamespace()) is None


def test_the_tiny_detr_has_an_input_size():
    from pipeline.models.detector import load_detector
    assert detector_input_size(load_detector("synthcap-tiny-detr", seed=0)) == (64, 64)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_large_image_reaches_the_detector_small_and_its_boxes_in_full_size_pixels(fmt):
    full = (2000, 1200)
    data = blob(photo(*full), fmt)
    image = _decode_for_detector(data, "big", (64, 64))
    assert image.info[FULL_SIZE_KEY] == full
    assert min(image.size) >= 64 and image.width < 2 * 64 * full[0] / full[1]     # reduced, still covering 64
    detector = FrameDetector({"shortest_edge": 64})
    table = pa.table({"image_id": ["big", "small"], "image": [data, blob(photo(80, 70), fmt)]})
    out = tag_table(table, detector, "image_id", 0.5, 5, batch_size=2)            # draft size from the detector
    assert all(min(size) < 128 for size in detector.seen)
    boxes = out.column("boxes").to_pylist()
    np.testing.assert_allclose(boxes[0][0], [0, 0, *full], atol=1e-3)
    np.testing.assert_allclose(boxes[1][0], [0, 0, 80, 70], atol=1e-3)


def test_an_exif_rotated_jpeg_gives_boxes_in_upright_full_size_pixels():
    exif = Image.Exif()
    exif[0x0112] = 6                                                               # rotated 90: width and height swap
    data = blob(photo(1600, 900), "JPEG", exif=exif)
    detector = FrameDetector({"shortest_edge": 64})
    out = tag_table(pa.table({"image_id": ["r"], "image": [data]}), detector, "image_id", 0.5, 5, batch_size=1)
    np.testing.assert_allclose(out.column("boxes").to_pylist()[0][0], [0, 0, 900, 1600], atol=1e-3)


def test_no_input_size_decodes_at_full_size():
    data = blob(photo(300, 200), "PNG")
    assert _decode_for_detector(data, "x", None).size == (300, 200)
    assert _decode_for_detector(data, "x", (200, 200)).size == (300, 200)        # factor 1: unchanged


def test_a_photos_tags_do_not_depend_on_its_batch():
    """tag.batch_size is speed-only (out of params and fingerprints): the same bytes must give the same tags
    alone and in a batch with photos of other sizes (DETR pads a batch to its largest image)."""
    from pipeline.models.detector import load_detector
    detector = load_detector("synthcap-tiny-detr", seed=0)
    sizes = [(64, 64), (120, 80), (70, 150), (96, 64), (64, 200)]
    table = pa.table({"image_id": [f"p{i}" for i in range(len(sizes))],
                      "image": [blob(photo(w, h, seed=i), "PNG") for i, (w, h) in enumerate(sizes)]})
    one = tag_table(table, detector, "image_id", 0.0, 5, batch_size=1)
    assert sum(len(labels) for labels in one.column("labels").to_pylist()) > 0     # something to compare
    assert tag_table(table, detector, "image_id", 0.0, 5, batch_size=32).equals(one)
    assert tag_table(table, detector, "image_id", 0.0, 5, batch_size=2).equals(one)
