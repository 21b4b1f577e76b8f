"""The one decoder returns an 8-bit RGB image with only its full size in ``info``, and an RGB source as
decoded (no full-size copy)."""
import io

import numpy as np
from PIL import Image

from pipeline.data.images import FULL_SIZE_KEY, decode_image


def test_an_rgb_source_is_returned_as_decoded_with_only_the_full_size_in_info(monkeypatch):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (40, 60, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, "PNG", dpi=(300, 300))
    copies = []
    original = Image.Image.convert
    monkeypatch.setattr(Image.Image, "convert", lambda self, *a, **k: copies.append(a) or original(self, *a, **k))
    image = decode_image(out.getvalue())
    assert not copies                                                  # no convert("RGB") copy of an RGB image
    assert image.mode == "RGB" and image.info == {FULL_SIZE_KEY: (60, 40)}
    np.testing.assert_array_equal(np.asarray(image), pixels)


def test_other_modes_are_still_converted_to_rgb():
    grey = Image.fromarray(np.arange(200, dtype=np.uint8).reshape(10, 20), "L")
    out = io.BytesIO()
    grey.save(out, "PNG")
    image = decode_image(out.getvalue())
    assert image.mode == "RGB" and image.info == {FULL_SIZE_KEY: (20, 10)}
    np.testing.assert_array_equal(np.asarray(image)[..., 0], np.asarray(grey))
