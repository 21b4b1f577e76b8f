"""Tests for pipeline.data.captions: caption readers, the cleaning filter, references and eval images.

Real-file tests use the ``shared_data`` fixture; the exact counts below were checked
independently of this code (``wc``/``awk``/``json`` on the files).
"""
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from pipeline.data.captions import (
    Caption,
    CaptionFile,
    clean_captions,
    normalize_whitespace,
    read_captions,
    split_name_from_file,
)
from pipeline.data.evalsets import load_eval_images, read_references, resolve_dir

TOKENS = "flickr8k/Flickr8k.token.txt"
TRAIN_SPLIT = "flickr8k/Flickr_8k.trainImages.txt"
# The first sorted Flickr8k photos in shared_data that are outside the train split, with sizes.
EVAL_PHOTOS = {
    "1022454332_6af2c1449a.jpg": (500, 375),
    "103106960_e8a41d64f8.jpg": (500, 375),
    "1032122270_ea6f0beedb.jpg": (500, 375),
    "1034276567_49bb87c51c.jpg": (500, 332),
}


def caption(text, caption_id="g#0", split=""):
    return Caption(caption_id=caption_id, group_id=caption_id.split("#")[0], text=text, split=split, source="t")


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def png_bytes(size=(7, 5)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def karpathy_dataset_file(tmp_path):
    return write_json(tmp_path / "dataset_tiny.json", {"dataset": "tiny", "images": [
        {"filename": "a.jpg", "filepath": "val2014", "split": "train", "imgid": 0,
         "sentences": [{"raw": "A cat.", "tokens": ["a", "cat"]}, {"raw": "A cat sleeps."}]},
        {"filename": "b.jpg", "split": "restval", "sentences": [{"raw": "A dog."}]},
        {"filename": "c.jpg", "split": "test", "sentences": [{"raw": "A bird."}, {"raw": "Birds."}]},
    ]})


@pytest.fixture
def coco_file(tmp_path):
    return write_json(tmp_path / "captions_val.json", {
        "images": [{"id": 42, "file_name": "COCO_val_42.jpg"}, {"id": 7, "file_name": "COCO_val_7.jpg"}],
        "annotations": [
            {"image_id": 42, "id": 1, "caption": "A red bus."},
            {"image_id": 7, "id": 2, "caption": "A plate of food."},
            {"image_id": 42, "id": 3, "caption": "A bus on a street."},
        ],
    })


# --------------------------------------------------------------------------------------------
# Readers on real files
# --------------------------------------------------------------------------------------------


def test_karpathy_list_coco_test(shared_data):
    result = read_captions(shared_data / "coco-karpathy/test.json", format="karpathy_list", source="coco")
    records = result.records
    assert len(records) == 25010  # 4,990 images with 5 captions, 10 with 6
    assert len({r.group_id for r in records}) == 5000
    assert {r.split for r in records} == {"test"}
    assert {r.source for r in records} == {"coco"}
    assert records[0] == Caption("COCO_val2014_000000391895.jpg#0", "COCO_val2014_000000391895.jpg",
                                 "A man with a red helmet on a small moped on a dirt road.", "test", "coco")
    assert records[4].caption_id == "COCO_val2014_000000391895.jpg#4"
    assert len({r.caption_id for r in records}) == len(records)
    assert result.undecodable == []


def test_karpathy_list_flickr30k_val_and_split_filter(shared_data):
    path = shared_data / "flickr30k-karpathy/val.json"  # items have no file_path
    records = read_captions(path).records
    assert len(records) == 5070 and len({r.group_id for r in records}) == 1014
    assert records[0].caption_id == "1018148011.jpg#0"
    assert records[0].source == "val.json"  # default source: the file name
    assert len(read_captions(path, splits=["val"]).records) == 5070
    assert read_captions(path, splits="test").records == []


def test_flickr8k_tokens_all(shared_data):
    result = read_captions(shared_data / TOKENS)  # auto-detected from content
    records = result.records
    assert len(records) == 40460 and len({r.group_id for r in records}) == 8092
    assert {r.split for r in records} == {""}
    # Lines 1, 6 and 12 use a space instead of the tab; they must parse like the others.
    assert records[0].caption_id == "1000268201_693b08cb0e.jpg#0"
    assert records[0].text == "A child in a pink dress is climbing up a set of stairs in an entry way ."
    assert records[5].caption_id == "1001773457_577c3a7d70.jpg#0"
    assert records[5].text == "A black dog and a spotted dog are fighting"
    assert records[1].text == "A girl going into a wooden building ."
    assert result.undecodable == []


def test_flickr8k_tokens_train_split(shared_data):
    result = read_captions(shared_data / TOKENS, split_file=shared_data / TRAIN_SPLIT)
    train_images = set((shared_data / TRAIN_SPLIT).read_text().split())
    assert len(result.records) == 30000
    assert {r.group_id for r in result.records} == train_images
    assert {r.split for r in result.records} == {"train"}
    named = read_captions(shared_data / TOKENS, split_file=shared_data / TRAIN_SPLIT, split_name="mine",
                          splits=["mine"])
    assert len(named.records) == 30000 and named.records[0].split == "mine"


@pytest.mark.parametrize("name, expected", [
    ("Flickr_8k.trainImages.txt", "train"), ("Flickr_8k.devImages.txt", "dev"),
    ("Flickr_8k.testImages.txt", "test"), ("my_split.txt", "my_split"),
])
def test_split_name_from_file(name, expected):
    assert split_name_from_file(name) == expected


def test_split_file_listing_unknown_image_is_an_error(tmp_path):
    tokens = tmp_path / "t.txt"
    tokens.write_text("a.jpg#0\tA cat.\n")
    split = tmp_path / "s.txt"
    split.write_text("a.jpg\nnope.jpg\n")
    with pytest.raises(ValueError, match="nope.jpg"):
        read_captions(tokens, split_file=split)


# --------------------------------------------------------------------------------------------
# Readers on hand-made files
# --------------------------------------------------------------------------------------------


def test_karpathy_dataset(karpathy_dataset_file):
    records = read_captions(karpathy_dataset_file, format="karpathy_dataset", source="k").records
    assert [(r.caption_id, r.text, r.split) for r in records] == [
        ("a.jpg#0", "A cat.", "train"), ("a.jpg#1", "A cat sleeps.", "train"),
        ("b.jpg#0", "A dog.", "restval"), ("c.jpg#0", "A bird.", "test"), ("c.jpg#1", "Birds.", "test"),
    ]
    train = read_captions(karpathy_dataset_file, splits=["train", "restval"]).records
    assert [r.caption_id for r in train] == ["a.jpg#0", "a.jpg#1", "b.jpg#0"]


def test_coco_annotations(coco_file):
    records = read_captions(coco_file, format="coco_annotations").records
    assert [(r.caption_id, r.group_id, r.text, r.split) for r in records] == [
        ("42#0", "42", "A red bus.", ""), ("7#0", "7", "A plate of food.", ""),
        ("42#1", "42", "A bus on a street.", ""),
    ]


def test_plain_text_keeps_blank_lines_as_empty_captions(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_bytes(b"A dog runs.\r\n\nTwo cats.\n")
    records = read_captions(path, source="mine").records
    assert [(r.caption_id, r.group_id, r.text) for r in records] == [
        ("line1", "line1", "A dog runs."), ("line2", "line2", ""), ("line3", "line3", "Two cats."),
    ]
    assert records[0].source == "mine"


@pytest.mark.parametrize("filename, content, first_id", [
    ("list.json", [{"split": "val", "image_name": "x.jpg", "captions": ["A."]}], "x.jpg#0"),
    ("ds.json", {"images": [{"filename": "y.jpg", "split": "val", "sentences": [{"raw": "B."}]}]}, "y.jpg#0"),
    ("coco.json", {"annotations": [{"image_id": 3, "caption": "C."}]}, "3#0"),
    ("tokens.txt", "z.jpg#0\tD.\nz.jpg#1\tE.\n", "z.jpg#0"),
    ("plain.txt", "A man with #3 hats.\n", "line1"),
])
def test_auto_detection(tmp_path, filename, content, first_id):
    path = tmp_path / filename
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    assert read_captions(path).records[0].caption_id == first_id


# --------------------------------------------------------------------------------------------
# Reader errors
# --------------------------------------------------------------------------------------------


def test_missing_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        read_captions(tmp_path / "nowhere.json")


def test_bad_json_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"split": "val", ')
    with pytest.raises(ValueError, match="broken.json.*not valid JSON"):
        read_captions(path)


def test_non_utf8_json_names_the_file(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('[{"split": "val", "image_name": "é.jpg", "captions": []}]'.encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.json.*UTF-8"):
        read_captions(path)


def test_malformed_item_names_file_and_index(tmp_path):
    path = write_json(tmp_path / "k.json", [
        {"split": "val", "image_name": "a.jpg", "captions": ["ok"]},
        {"split": "val", "image_name": "b.jpg"},
    ])
    with pytest.raises(ValueError, match=r"k\.json: item 1: missing 'captions'"):
        read_captions(path)


def test_non_string_caption_is_malformed(tmp_path):
    path = write_json(tmp_path / "k.json", [{"split": "val", "image_name": "a.jpg", "captions": ["ok", 3]}])
    with pytest.raises(ValueError, match=r"item 0 captions\[1\]"):
        read_captions(path)


def test_malformed_token_line_names_file_and_line(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("a.jpg#0\tA cat.\nthis line has no id\n")
    with pytest.raises(ValueError, match=r"t\.txt:2"):
        read_captions(path, format="flickr8k_tokens")


def test_repeated_caption_id_is_rejected(tmp_path):
    path = write_json(tmp_path / "k.json", [{"split": "val", "image_name": "a.jpg", "captions": ["x"]}] * 2)
    with pytest.raises(ValueError, match="a.jpg#0"):
        read_captions(path)


@pytest.mark.parametrize("kwargs, message", [
    ({"format": "yaml"}, "unknown caption format"),
    ({"splits": ["train"]}, "carry no split"),
    ({"split_name": "train"}, "split_file"),
])
def test_arguments_that_do_not_apply(coco_file, kwargs, message):
    with pytest.raises(ValueError, match=message):
        read_captions(coco_file, **kwargs)


def test_split_file_only_for_flickr8k_tokens(coco_file, tmp_path):
    split = tmp_path / "s.txt"
    split.write_text("42\n")
    with pytest.raises(ValueError, match="split_file"):
        read_captions(coco_file, split_file=split)


# --------------------------------------------------------------------------------------------
# Undecodable lines
# --------------------------------------------------------------------------------------------


def test_non_utf8_token_line_is_skipped_counted_and_named(tmp_path):
    path = tmp_path / "tokens.txt"
    path.write_bytes(b"a.jpg#0\tA cat.\na.jpg#1\tA caf\xe9 cat.\nb.jpg#0\tA dog.\n")
    result = read_captions(path)
    assert [r.caption_id for r in result.records] == ["a.jpg#0", "b.jpg#0"]
    assert result.undecodable == [f"{path}:2"]
    kept, report = clean_captions(result)
    assert len(kept) == 2
    assert report["read"] == 3 and report["kept"] == 2
    assert report["dropped"]["undecodable"] == 1
    assert report["examples"]["undecodable"] == [f"{path}:2"]


def test_undecodable_lines_follow_the_split_file(tmp_path):
    path = tmp_path / "tokens.txt"
    path.write_bytes(b"a.jpg#0\tA cat.\na.jpg#1\t\xff\nb.jpg#0\tA d\xf6g.\nb.jpg#1\tA dog.\n")
    split = tmp_path / "Flickr_8k.devImages.txt"
    split.write_text("b.jpg\n")
    result = read_captions(path, split_file=split)
    assert [(r.caption_id, r.split) for r in result.records] == [("b.jpg#1", "dev")]
    assert result.undecodable == [f"{path}:3"]  # line 2 is a.jpg's, outside the split


def test_non_utf8_plain_text_line(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_bytes(b"One.\n\x80\x81 bad\nThree.\n")
    result = read_captions(path, format="plain_text")
    assert [r.caption_id for r in result.records] == ["line1", "line3"]
    assert result.undecodable == [f"{path}:2"]


# --------------------------------------------------------------------------------------------
# Cleaning
# --------------------------------------------------------------------------------------------


def test_normalize_whitespace():
    assert normalize_whitespace("  A\tdog \n\n runs   fast.  ") == "A dog runs fast."


def test_clean_counts_each_reason_and_normalises():
    fifteen = " ".join(["w"] * 15)
    records = [
        caption("  A  dog\truns. ", "a#0"),
        caption("   \n", "a#1"),
        caption(fifteen, "b#0"),
        caption(fifteen + " more", "b#1"),
        caption("A dog runs.", "c#0"),         # duplicate of a#0 once normalised
        caption("a dog runs.", "c#1"),         # differs in case: kept
        caption("", "d#0"),
    ]
    kept, report = clean_captions(records, max_words=15)
    assert [(r.caption_id, r.text) for r in kept] == [
        ("a#0", "A dog runs."), ("b#0", fifteen), ("c#1", "a dog runs."),
    ]
    assert report == {
        "read": 7, "kept": 3,
        "dropped": {"empty": 2, "too_long": 1, "duplicate": 1, "undecodable": 0},
        "examples": {"empty": ["a#1", "d#0"], "too_long": ["b#1"], "duplicate": ["c#0"], "undecodable": []},
    }
    json.dumps(report)  # JSON-able


def test_clean_max_words_and_example_cap():
    records = [caption(f"one two three {i}", f"g{i}#0") for i in range(8)]
    kept, report = clean_captions(records, max_words=3)
    assert kept == []
    assert report["dropped"]["too_long"] == 8
    assert report["examples"]["too_long"] == [f"g{i}#0" for i in range(5)]
    with pytest.raises(ValueError):
        clean_captions(records, max_words=0)


def test_clean_flickr8k_train_matches_the_reference_filter(shared_data):
    corpus = read_captions(shared_data / TOKENS, split_file=shared_data / TRAIN_SPLIT)
    kept, report = clean_captions(corpus)
    # Checked with an independent awk implementation of the same filter.
    assert report["read"] == 30000 and report["kept"] == len(kept) == 25174
    assert report["dropped"] == {"empty": 0, "too_long": 4663, "duplicate": 163, "undecodable": 0}


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
    assert report == {"requested": 5, "loaded": 4, "skipped": {"missing": ["9999999999_notthere.jpg"], "corrupt": []}}


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
    assert report == {"requested": 4, "loaded": 1, "skipped": {"missing": ["gone.jpg"], "corrupt": ["cut.png", "x.jpg"]}}
    json.dumps(report)


@pytest.mark.parametrize("name", ["../secret.jpg", "/etc/passwd", "sub/../../x.jpg", "..\\x.jpg", "C:\\x.jpg", ""])
def test_names_escaping_the_image_dir_are_rejected(tmp_path, name):
    (tmp_path / "ok.png").write_bytes(png_bytes())
    with pytest.raises(ValueError, match="escapes the image directory") as error:
        load_eval_images(tmp_path, {"ok.png": ["a"], name: ["b"]})
    assert repr(name) in str(error.value)


def test_resolve_dir_package_spec():
    import skimage.data

    expected = Path(skimage.data.__file__).parent
    assert resolve_dir("package:skimage.data") == expected
    rows, report = load_eval_images("package:skimage.data", {"camera.png": ["a camera man"]})
    assert (rows[0]["width"], rows[0]["height"]) == (512, 512)
    assert rows[0]["image"] == (expected / "camera.png").read_bytes()


def test_resolve_dir_errors(tmp_path):
    assert resolve_dir(tmp_path) == tmp_path
    with pytest.raises(ValueError, match="no_such_package_xyz"):
        resolve_dir("package:no_such_package_xyz")
    with pytest.raises(NotADirectoryError):
        resolve_dir(tmp_path / "missing")


def test_caption_file_combines_and_records_serialise():
    first = CaptionFile([caption("A.", "a#0")], ["f:1"])
    second = CaptionFile([caption("A.", "b#0")])
    combined = CaptionFile(first.records + second.records, first.undecodable + second.undecodable)
    kept, report = clean_captions(combined)
    assert [r.caption_id for r in kept] == ["a#0"]
    assert report["dropped"]["duplicate"] == 1 and report["dropped"]["undecodable"] == 1
    assert kept[0].to_dict() == {"caption_id": "a#0", "group_id": "a", "text": "A.", "split": "", "source": "t"}
