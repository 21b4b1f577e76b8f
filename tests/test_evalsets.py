"""Tests for pipeline.data.evalsets (references, eval images) and pipeline.data.images (the one
image decoder every stage uses).

Real-file tests use the ``shared_data`` fixture; the exact counts below were checked
independently of this code (``wc``/``awk``/``comm`` on the files).
"""
import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipeline.data.evalsets import copy_package_files, load_eval_images, read_references, resolve_dir
from pipeline.data.images import (
    DEFAULT_MAX_PIXELS,
    FULL_SIZE_KEY,
    ImageTooLarge,
    UnreadableImage,
    decode_image,
    skip_reason,
)

TOKENS = "flickr8k/Flickr8k.token.txt"
TRAIN_SPLIT = "flickr8k/Flickr_8k.trainImages.txt"
# The first sorted Flickr8k photos in shared_data that are outside the train split, with sizes.
EVAL_PHOTOS = {
    "1022454332_6af2c1449a.jpg": (500, 375),
    "103106960_e8a41d64f8.jpg": (500, 375),
    "1032122270_ea6f0beedb.jpg": (500, 375),
    "1034276567_49bb87c51c.jpg": (500, 332),
}


def png_bytes(size=(7, 5)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def encoded(image: Image.Image, format: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of width×height black pixels, written row by row
    without ever holding the image: 20000×20000 compresses to about 50 kB."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    row = b"\x00" + bytes((width + 7) // 8)  # filter type 0, then the packed bits
    compressor = zlib.compressobj()
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


# --------------------------------------------------------------------------------------------
# References
# --------------------------------------------------------------------------------------------


def test_references_from_flickr8k_tokens(shared_data):
    references = read_references(shared_data / TOKENS, split_file=shared_data / TRAIN_SPLIT)
    assert len(references) == 6000
    assert all(len(texts) == 5 for texts in references.values())
    assert "1022454332_6af2c1449a.jpg" not in references  # not a train image
    assert references["1000268201_693b08cb0e.jpg"][1] == "A girl going into a wooden building ."


def test_references_from_karpathy_list(shared_data):
    references = read_references(shared_data / "flickr30k-karpathy/test.json", splits=["test"])
    assert len(references) == 1000 and sum(map(len, references.values())) == 5000


def test_references_from_coco_use_file_names(coco_file):
    assert read_references(coco_file) == {
        "COCO_val_42.jpg": ["A red bus.", "A bus on a street."], "COCO_val_7.jpg": ["A plate of food."],
    }


def test_references_from_karpathy_dataset(karpathy_dataset_file):
    assert read_references(karpathy_dataset_file, splits="test") == {"c.jpg": ["A bird.", "Birds."]}


def test_references_from_plain_text_is_an_error(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("A dog.\n")
    with pytest.raises(ValueError, match="plain text"):
        read_references(path)


def test_references_warn_about_undecodable_lines(tmp_path):
    path = tmp_path / "tokens.txt"
    path.write_bytes(b"a.jpg#0\tA cat.\na.jpg#1\t\xff\n")
    with pytest.warns(UserWarning, match=r"tokens\.txt:2"):
        references = read_references(path)
    assert references == {"a.jpg": ["A cat."]}


# --------------------------------------------------------------------------------------------
# Evaluation images
# --------------------------------------------------------------------------------------------


def test_load_eval_images_on_real_photos(shared_data):
    all_references = read_references(shared_data / TOKENS)
    references = {name: all_references[name] for name in EVAL_PHOTOS}
    references["9999999999_notthere.jpg"] = ["A missing photo."]
    image_dir = shared_data / "flickr8k/images"

    rows, report = load_eval_images(image_dir, references)

    assert [row["image_id"] for row in rows] == sorted(EVAL_PHOTOS)
    for row in rows:
        assert (row["width"], row["height"]) == EVAL_PHOTOS[row["image_id"]]
        assert row["image"] == (image_dir / row["image_id"]).read_bytes()
        assert len(row["references"]) == 5
    assert rows[0]["references"][0] == "A child and a woman are at waters edge in a big city ."
    assert report == {"requested": 5, "loaded": 4, "skipped": {"9999999999_notthere.jpg": "missing"},
                      "skipped_counts": {"missing": 1, "corrupt": 0, "too_large": 0}}


def test_load_eval_images_max_images_keeps_first_sorted(shared_data):
    references = {name: ["r"] for name in EVAL_PHOTOS}
    rows, report = load_eval_images(shared_data / "flickr8k/images", references, max_images=2)
    assert [row["image_id"] for row in rows] == sorted(EVAL_PHOTOS)[:2]
    assert report["requested"] == 2 and report["loaded"] == 2


def test_corrupt_and_missing_images_are_skipped(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"this is not a jpeg at all")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "good.png").write_bytes(png_bytes((7, 5)))
    truncated = png_bytes((64, 64))
    (tmp_path / "cut.png").write_bytes(truncated[: len(truncated) // 2])
    references = {"x.jpg": ["a"], "gone.jpg": ["b"], "sub/good.png": ["c"], "cut.png": ["d"]}

    rows, report = load_eval_images(str(tmp_path), references)

    assert [(r["image_id"], r["width"], r["height"], r["references"]) for r in rows] == [("sub/good.png", 7, 5, ["c"])]
    assert report == {
        "requested": 4, "loaded": 1,
        "skipped": {"cut.png": "corrupt: image file is truncated", "gone.jpg": "missing",
                    "x.jpg": "corrupt: cannot identify image file"},
        "skipped_counts": {"missing": 1, "corrupt": 2, "too_large": 0},
    }
    assert list(report["skipped"]) == ["cut.png", "gone.jpg", "x.jpg"]  # sorted name order
    json.dumps(report)


@pytest.mark.parametrize("name", ["../secret.jpg", "/etc/passwd", "sub/../../x.jpg", "..\\x.jpg", "C:\\x.jpg", ""])
def test_names_escaping_the_image_dir_are_rejected(tmp_path, name):
    (tmp_path / "ok.png").write_bytes(png_bytes())
    with pytest.raises(ValueError, match="escapes the image directory") as error:
        load_eval_images(tmp_path, {"ok.png": ["a"], name: ["b"]})
    assert repr(name) in str(error.value)


def test_package_files_are_copied_byte_for_byte(tmp_path):
    import skimage.data

    expected = Path(skimage.data.__file__).parent
    copied = copy_package_files("skimage.data", ["camera.png"], tmp_path / "photos")
    assert copied == [tmp_path / "photos" / "camera.png"]
    rows, report = load_eval_images(tmp_path / "photos", {"camera.png": ["a camera man"]})
    assert (rows[0]["width"], rows[0]["height"]) == (512, 512)
    assert rows[0]["image"] == (expected / "camera.png").read_bytes()
    with pytest.raises(ValueError, match="no_such_package_xyz"):
        copy_package_files("no_such_package_xyz", ["a.png"], tmp_path)
    with pytest.raises(ValueError, match="escapes the image directory"):
        copy_package_files("skimage.data", ["../__init__.py"], tmp_path)


def test_resolve_dir_errors(tmp_path):
    assert resolve_dir(tmp_path) == tmp_path
    with pytest.raises(NotADirectoryError):
        resolve_dir(tmp_path / "missing")


# --------------------------------------------------------------------------------------------
# References from the Flickr8k folder
# --------------------------------------------------------------------------------------------


def test_references_of_the_flickr8k_photos_outside_the_train_split(shared_data):
    folder = shared_data / "flickr8k"
    references = read_references(folder, splits=None, exclude_splits=["train"])
    # Checked with awk/comm: 8,092 captioned images, 6,000 in the train split file; of the 500
    # photos in images/, 247 are outside it (the shared data's README says the same).
    assert len(references) == 2092 and all(len(texts) == 5 for texts in references.values())
    assert "1000268201_693b08cb0e.jpg" not in references  # a train image
    assert references["1022454332_6af2c1449a.jpg"][0] == "A child and a woman are at waters edge in a big city ."
    photos = {path.name for path in (folder / "images").iterdir()}
    assert len(photos & set(references)) == 247
    assert len(read_references(folder, splits="train")) == 6000


# --------------------------------------------------------------------------------------------
# decode_image: one 8-bit RGB image from any stored bytes
# --------------------------------------------------------------------------------------------


def test_16_bit_greyscale_png_is_scaled_not_washed_out():
    values = (np.arange(256 * 64, dtype=np.uint32) * 4).reshape(64, 256).astype(np.uint16)  # 0..65532
    values[-1, -1] = 65535
    data = encoded(Image.fromarray(values))
    assert Image.open(io.BytesIO(data)).mode == "I;16"

    image = decode_image(data)
    assert image.mode == "RGB" and image.size == (256, 64)
    pixels = np.asarray(image).astype(int)
    expected = np.rint(values / 257).astype(int)
    for channel in range(3):
        assert np.abs(pixels[..., channel] - expected).max() <= 1
    assert (pixels == 255).mean() < 0.01  # convert("RGB") made 99 % of these pixels 255


@pytest.mark.parametrize("mode", ["I;16B", "I;16L"])
def test_16_bit_byte_orders(mode):
    values = np.array([[0, 257, 32896, 65535]], dtype=">u2" if mode == "I;16B" else "<u2")
    image = Image.frombytes(mode, (4, 1), values.tobytes())
    assert np.asarray(decode_image(encoded(image, "TIFF")))[0, :, 0].tolist() == [0, 1, 128, 255]


def test_32_bit_integer_image_without_declared_range_holding_16_bit_values():
    values = np.array([[0, 257, 32896, 65535]], dtype=np.int32)
    image = Image.fromarray(values, mode="I")
    assert np.asarray(decode_image(encoded(image, "TIFF")))[0, :, 0].tolist() == [0, 1, 128, 255]
    small = Image.fromarray(np.array([[0, 10, 255]], dtype=np.int32), mode="I")
    assert np.asarray(decode_image(encoded(small, "TIFF")))[0, :, 0].tolist() == [0, 10, 255]
    negative = Image.fromarray(np.array([[-5, 70000]], dtype=np.int32), mode="I")
    with pytest.raises(UnreadableImage, match="declares no range"):
        decode_image(encoded(negative, "TIFF"))


def test_float_images():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), mode="F")
    assert np.asarray(decode_image(encoded(unit, "TIFF")))[0, :, 0].tolist() == [0, 128, 255]
    eight_bit = Image.fromarray(np.array([[0.0, 100.4, 255.0]], dtype=np.float32), mode="F")
    assert np.asarray(decode_image(encoded(eight_bit, "TIFF")))[0, :, 0].tolist() == [0, 100, 255]
    for bad in ([[-1.0, 2.0]], [[0.0, np.nan]]):
        with pytest.raises(UnreadableImage):
            decode_image(encoded(Image.fromarray(np.array(bad, dtype=np.float32), mode="F"), "TIFF"))


def test_rgba_is_composited_on_white():
    image = Image.new("RGBA", (3, 1), (0, 0, 0, 0))
    image.putpixel((1, 0), (255, 0, 0, 128))
    image.putpixel((2, 0), (0, 0, 255, 255))
    pixels = np.asarray(decode_image(encoded(image))).astype(int)
    assert pixels[0, 0].tolist() == [255, 255, 255]  # transparent black: white, not black
    assert np.abs(pixels[0, 1] - [255, 127, 127]).max() <= 1
    assert pixels[0, 2].tolist() == [0, 0, 255]


def test_la_is_composited_on_white():
    image = Image.new("LA", (2, 1), (0, 128))
    image.putpixel((1, 0), (40, 255))
    pixels = np.asarray(decode_image(encoded(image))).astype(int)
    assert np.abs(pixels[0, 0] - 127).max() <= 1 and pixels[0, 1].tolist() == [40, 40, 40]


@pytest.mark.parametrize("format", ["PNG", "GIF"])
def test_palette_with_transparency_is_composited_on_white(format):
    image = Image.new("P", (2, 1), 0)
    image.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    image.putpixel((1, 0), 1)
    data = encoded(image, format, transparency=0)
    assert Image.open(io.BytesIO(data)).info.get("transparency") == 0
    assert np.asarray(decode_image(data)).tolist() == [[[255, 255, 255], [200, 0, 0]]]


def test_pa_and_colour_key_transparency():
    from pipeline.data.images import _to_rgb  # no common file format stores PA: the mode step alone

    pa = Image.new("PA", (2, 1))
    pa.putpalette([10, 20, 30] * 256)
    pa.putpixel((1, 0), (0, 255))
    assert np.asarray(_to_rgb(pa)).tolist() == [[[255, 255, 255], [10, 20, 30]]]
    rgb = Image.new("RGB", (2, 1), (0, 0, 0))
    rgb.putpixel((1, 0), (9, 9, 9))
    assert np.asarray(decode_image(encoded(rgb, transparency=(0, 0, 0)))).tolist() == [[[255] * 3, [9] * 3]]
    grey16 = Image.fromarray(np.array([[0, 65535]], dtype=np.uint16))
    assert np.asarray(decode_image(encoded(grey16, transparency=0))).tolist() == [[[255] * 3, [255] * 3]]
    grey16 = Image.fromarray(np.array([[0, 65535]], dtype=np.uint16))
    assert np.asarray(decode_image(encoded(grey16, transparency=65535))).tolist() == [[[0] * 3, [255] * 3]]


def test_cmyk_jpeg():
    rgb = Image.new("RGB", (16, 16), (200, 30, 30))
    data = encoded(rgb.convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    image = decode_image(data)
    assert image.mode == "RGB" and np.abs(np.asarray(image).astype(int) - [200, 30, 30]).max() <= 8


@pytest.mark.parametrize("mode", ["1", "L", "P", "YCbCr", "LAB", "HSV"])
def test_other_modes_become_rgb(mode):
    from pipeline.data.images import _to_rgb

    source = Image.new("RGB", (4, 4), (255, 255, 255) if mode == "1" else (30, 160, 90))
    converted = source.convert(mode)
    expected = np.asarray(converted.convert("RGB")).astype(int)
    # HSV has no file format: the mode step alone; the others through a TIFF file.
    image = _to_rgb(converted) if mode == "HSV" else decode_image(encoded(converted, "TIFF"))
    assert image.mode == "RGB" and np.abs(np.asarray(image).astype(int) - expected).max() <= 2


def test_animated_gif_gives_its_first_frame():
    frames = [Image.new("RGB", (8, 8), colour) for colour in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(buffer.getvalue())).n_frames == 3
    assert np.asarray(decode_image(buffer.getvalue()))[0, 0].tolist() == [255, 0, 0]


def test_animated_png_gives_its_first_frame():
    frames = [Image.new("RGBA", (8, 8), colour) for colour in [(0, 0, 255, 255), (0, 255, 0, 255)]]
    data = encoded(frames[0], save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert np.asarray(decode_image(data))[0, 0].tolist() == [0, 0, 255]


def test_exif_orientation_is_applied():
    stored = Image.new("RGB", (40, 20), (0, 0, 0))
    stored.paste((255, 255, 255), (20, 0, 40, 20))  # left half black, right half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    data = encoded(stored, "JPEG", exif=exif.tobytes(), quality=95)

    image = decode_image(data)
    assert image.size == (20, 40) and image.info[FULL_SIZE_KEY] == (20, 40)
    pixels = np.asarray(image).astype(int)
    assert pixels[5, 10].max() < 30 and pixels[35, 10].min() > 225  # the left half is now on top
    assert decode_image(encoded(stored, "JPEG")).size == (40, 20)  # no tag: as stored


def test_truncated_jpeg_is_unreadable_with_pils_reason(shared_data):
    data = (shared_data / "flickr8k/images/1022454332_6af2c1449a.jpg").read_bytes()
    with pytest.raises(UnreadableImage, match="truncated") as error:
        decode_image(data[: len(data) // 2])
    assert skip_reason(error.value).startswith("corrupt: ") and isinstance(error.value, ValueError)


def test_not_an_image_reason_has_no_memory_address():
    with pytest.raises(UnreadableImage) as error:
        decode_image(b"this is not an image")
    assert skip_reason(error.value) == "corrupt: cannot identify image file"


@pytest.fixture
def no_pixel_decoding(monkeypatch):
    """Fail the test if any image data is decoded."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


@pytest.fixture(scope="module")
def bomb():
    return bomb_png(20000, 20000)


def test_decompression_bomb_is_refused_from_its_header(bomb, no_pixel_decoding):
    assert len(bomb) < 100_000
    with pytest.raises(ImageTooLarge) as error:
        decode_image(bomb)
    assert str(error.value) == "too large (20000×20000 = 400000000 pixels > limit 89478485)"
    assert skip_reason(error.value) == str(error.value) and isinstance(error.value, ValueError)
    assert DEFAULT_MAX_PIXELS == 89_478_485 == Image.MAX_IMAGE_PIXELS
    # Within our limit but beyond PIL's own guard (twice its MAX_IMAGE_PIXELS): PIL's limit is named.
    with pytest.raises(ImageTooLarge, match=r"20000×20000 = 400000000 pixels > limit 178956970\)"):
        decode_image(bomb, max_pixels=10**9)


def test_max_pixels_is_checked_before_decoding(no_pixel_decoding):
    with pytest.raises(ImageTooLarge, match=r"^too large \(20×20 = 400 pixels > limit 399\)$"):
        decode_image(encoded(Image.new("RGB", (20, 20))), max_pixels=399)


def test_max_pixels_limit_is_inclusive():
    assert decode_image(encoded(Image.new("RGB", (20, 20))), max_pixels=400).size == (20, 20)
    with pytest.raises(ValueError, match="max_pixels"):
        decode_image(png_bytes(), max_pixels=0)


def test_draft_size_decodes_a_large_jpeg_at_reduced_scale():
    data = encoded(Image.new("RGB", (1600, 1200), (90, 120, 150)), "JPEG")
    image = decode_image(data, draft_size=(200, 150))
    assert image.size == (200, 150) and image.info[FULL_SIZE_KEY] == (1600, 1200)  # 1/8
    # The reduced image covers draft_size on both sides: 1/8 would give a height of 150 < 200.
    assert decode_image(data, draft_size=(200, 200)).size == (400, 300)
    assert decode_image(data).size == (1600, 1200)
    assert decode_image(png_bytes((64, 48)), draft_size=(8, 8)).size == (64, 48)  # not a JPEG: full size


# --------------------------------------------------------------------------------------------
# load_eval_images: every skip carries its reason
# --------------------------------------------------------------------------------------------


def test_load_eval_images_skips_a_bomb_and_a_truncated_jpeg_with_reasons(tmp_path, shared_data, bomb):
    photo = (shared_data / "flickr8k/images/1022454332_6af2c1449a.jpg").read_bytes()
    (tmp_path / "bomb.png").write_bytes(bomb)
    (tmp_path / "cut.jpg").write_bytes(photo[: len(photo) // 2])
    (tmp_path / "ok.jpg").write_bytes(photo)
    references = {"bomb.png": ["a"], "cut.jpg": ["b"], "ok.jpg": ["c"], "gone.jpg": ["d"]}

    rows, report = load_eval_images(tmp_path, references)

    assert [(r["image_id"], r["width"], r["height"]) for r in rows] == [("ok.jpg", 500, 375)]
    assert report["skipped"]["bomb.png"] == "too large (20000×20000 = 400000000 pixels > limit 89478485)"
    assert report["skipped"]["cut.jpg"].startswith("corrupt: ") and "truncated" in report["skipped"]["cut.jpg"]
    assert report["skipped"]["gone.jpg"] == "missing"
    assert report["skipped_counts"] == {"missing": 1, "corrupt": 1, "too_large": 1}
    assert report["requested"] == 4 and report["loaded"] == 1
    json.dumps(report)


def test_load_eval_images_max_pixels(tmp_path):
    (tmp_path / "small.png").write_bytes(png_bytes((10, 10)))
    (tmp_path / "big.png").write_bytes(png_bytes((30, 30)))
    rows, report = load_eval_images(tmp_path, {"small.png": ["a"], "big.png": ["b"]}, max_pixels=100)
    assert [r["image_id"] for r in rows] == ["small.png"]
    assert report["skipped"] == {"big.png": "too large (30×30 = 900 pixels > limit 100)"}


def test_load_eval_images_records_the_upright_size(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 8
    (tmp_path / "turned.jpg").write_bytes(encoded(Image.new("RGB", (40, 20)), "JPEG", exif=exif.tobytes()))
    rows, _ = load_eval_images(tmp_path, {"turned.jpg": ["a"]})
    assert (rows[0]["width"], rows[0]["height"]) == (20, 40)


# --------------------------------------------------------------------------------------------
# The encode and tag stages decode through decode_image and fail, naming the item, on bad bytes
# --------------------------------------------------------------------------------------------


class _StubClip:
    @staticmethod
    def preprocess(image):
        import torch

        return torch.from_numpy(np.asarray(image).copy())


def test_encode_decodes_through_decode_image_and_names_a_bad_item():
    from pipeline.extract.encode import _decode

    rgba = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    pixels = _decode(_StubClip(), [encoded(rgba)], ["a#0"])
    assert pixels.shape == (1, 2, 2, 3) and pixels.min().item() == 255  # on white
    with pytest.raises(ValueError, match=r"image 'b#0' cannot be decoded: corrupt: cannot identify image file"):
        _decode(_StubClip(), [encoded(rgba), b"junk"], ["a#0", "b#0"])


def test_tag_table_drafts_and_maps_boxes_to_full_size():
    import pyarrow as pa

    from pipeline.extract.tag import tag_table
    from pipeline.models.detector import Detection

    seen = []

    class StubDetector:
        def detect(self, images, threshold):
            seen.extend(image.size for image in images)
            return [Detection(["dog"], [0.9], [[0.0, 0.0, float(im.width), float(im.height) / 2]]) for im in images]

    jpeg = encoded(Image.new("RGB", (1600, 1200)), "JPEG")
    table = pa.table({"image_id": ["big.jpg", "small.png"], "image": [jpeg, png_bytes((64, 48))]})
    tags = tag_table(table, StubDetector(), "image_id", 0.5, 5, batch_size=2, draft_size=(200, 150))
    assert seen == [(200, 150), (64, 48)]
    assert tags.column("boxes").to_pylist() == [[[0.0, 0.0, 1600.0, 600.0]], [[0.0, 0.0, 64.0, 24.0]]]
    bad = pa.table({"image_id": ["x"], "image": [b"junk"]})
    with pytest.raises(ValueError, match="image 'x' cannot be decoded"):
        tag_table(bad, StubDetector(), "image_id", 0.5, 5, batch_size=2)
