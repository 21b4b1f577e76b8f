"""Tests for pipeline.data.captions: caption readers (files and the Flickr8k folder) and cleaning.

Real-file tests use the ``shared_data`` fixture; the exact counts below were checked
independently of this code (``wc``/``awk``/``comm``/``json`` on the files).
"""
import json

import pytest

from conftest import write_json
from pipeline.data.captions import (
    Caption,
    CaptionFile,
    clean_captions,
    normalize_whitespace,
    read_captions,
    split_name_from_file,
)

FLICKR8K = "flickr8k"
TOKENS = "flickr8k/Flickr8k.token.txt"
TRAIN_SPLIT = "flickr8k/Flickr_8k.trainImages.txt"


def caption(text, caption_id="g#0", split=""):
    return Caption(caption_id=caption_id, group_id=caption_id.split("#")[0], text=text, split=split, source="t")


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
        "dropped": {"empty": 2, "no_letter_or_digit": 0, "too_long": 1, "duplicate": 1, "undecodable": 0},
        "examples": {"empty": ["a#1", "d#0"], "no_letter_or_digit": [], "too_long": ["b#1"], "duplicate": ["c#0"],
                     "undecodable": []},
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
    assert report["dropped"] == {"empty": 0, "no_letter_or_digit": 0, "too_long": 4663, "duplicate": 163,
                                 "undecodable": 0}


def test_caption_file_combines_and_records_serialise():
    first = CaptionFile([caption("A.", "a#0")], ["f:1"])
    second = CaptionFile([caption("A.", "b#0")])
    combined = CaptionFile(first.records + second.records, first.undecodable + second.undecodable)
    kept, report = clean_captions(combined)
    assert [r.caption_id for r in kept] == ["a#0"]
    assert report["dropped"]["duplicate"] == 1 and report["dropped"]["undecodable"] == 1
    assert kept[0].to_dict() == {"caption_id": "a#0", "group_id": "a", "text": "A.", "split": "", "source": "t"}


# --------------------------------------------------------------------------------------------
# Cleaning: captions with no letter or digit; no length cap; no de-duplication
# --------------------------------------------------------------------------------------------


def test_captions_without_letter_or_digit_are_dropped_and_counted():
    records = [
        caption("...", "a#0"),
        caption("!!! ???", "a#1"),
        caption("\u200b", "a#2"),                 # zero-width space: not whitespace to str.split
        caption(" \u2060\u200d\ufeff ", "a#3"),   # word joiner, zero-width joiner, BOM
        caption("¿¡ — «»", "a#4"),
        caption("A dog.", "b#0"),
        caption("42", "b#1"),                     # a digit is enough
        caption("写真", "b#2"),                    # letters of any script
        caption("\u200bA cat\u200b", "b#3"),      # invisible characters around letters: kept
    ]
    kept, report = clean_captions(records)
    assert [r.caption_id for r in kept] == ["b#0", "b#1", "b#2", "b#3"]
    assert report["dropped"]["no_letter_or_digit"] == 5
    assert report["examples"]["no_letter_or_digit"] == ["a#0", "a#1", "a#2", "a#3", "a#4"]
    assert report["read"] == report["kept"] + sum(report["dropped"].values())


def test_clean_without_length_cap_or_deduplication():
    long = " ".join(["word"] * 40)
    records = [caption(long, "a#0"), caption("A dog.", "b#0"), caption("A  dog.", "b#1"), caption("", "c#0")]

    kept, report = clean_captions(records, max_words=None, deduplicate=False)
    assert [(r.caption_id, r.text) for r in kept] == [("a#0", long), ("b#0", "A dog."), ("b#1", "A dog.")]
    assert report["dropped"] == {"empty": 1, "no_letter_or_digit": 0, "too_long": 0, "duplicate": 0,
                                 "undecodable": 0}
    assert report["examples"]["too_long"] == [] and report["examples"]["duplicate"] == []

    kept, report = clean_captions(records, max_words=None)  # de-duplicated, no cap
    assert [r.caption_id for r in kept] == ["a#0", "b#0"] and report["dropped"]["duplicate"] == 1
    kept, report = clean_captions(records, deduplicate=False)  # default cap of 15, repeats kept
    assert [r.caption_id for r in kept] == ["b#0", "b#1"] and report["dropped"]["too_long"] == 1


@pytest.mark.parametrize("kwargs", [{"max_words": 0}, {"max_words": True}, {"max_words": 2.5},
                                    {"deduplicate": "no"}, {"deduplicate": None}])
def test_clean_rejects_bad_options(kwargs):
    with pytest.raises(ValueError):
        clean_captions([caption("A dog.")], **kwargs)


def test_clean_flickr8k_train_without_cap_and_without_dedup(shared_data):
    corpus = read_captions(shared_data / FLICKR8K, splits=["train"])
    # Checked with awk: no train caption is empty; 163 whitespace-normalised texts repeat an
    # earlier one (all of them 15 words or fewer, hence the same 163 as with the cap).
    kept, report = clean_captions(corpus, max_words=None)
    assert report["kept"] == len(kept) == 29837
    assert report["dropped"] == {"empty": 0, "no_letter_or_digit": 0, "too_long": 0, "duplicate": 163,
                                 "undecodable": 0}
    kept, report = clean_captions(corpus, max_words=None, deduplicate=False)
    assert report["read"] == report["kept"] == len(kept) == 30000


# --------------------------------------------------------------------------------------------
# JSON given as plain text
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("filename, content", [
    ("captions.txt", [{"split": "val", "image_name": "x.jpg", "captions": ["A.", "B."]}]),
    ("captions.json", {"annotations": [{"image_id": 3, "caption": "C."}]}),
    ("captions.txt", "\ufeff  \n" + json.dumps({"images": [{"filename": "y.jpg", "split": "val",
                                                            "sentences": [{"raw": "B."}]}]}, indent=2)),
])
def test_json_read_as_plain_text_is_refused(tmp_path, filename, content):
    path = tmp_path / filename
    path.write_text(content if isinstance(content, str) else json.dumps(content, indent=1), encoding="utf-8")
    with pytest.raises(ValueError, match="looks like JSON") as error:
        read_captions(path, "plain_text")
    message = str(error.value)
    assert str(path) in message
    assert "karpathy_list" in message and "coco_annotations" in message and "corpus.format" in message


def test_auto_reads_json_content_of_a_text_file_as_json(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text(json.dumps([{"split": "val", "image_name": "x.jpg", "captions": ["A.", "B."]}]))
    assert [r.caption_id for r in read_captions(path).records] == ["x.jpg#0", "x.jpg#1"]


@pytest.mark.parametrize("content", ["[A photo] of a dog.\nTwo cats.\n", "{braces} in a caption\n",
                                     '"A quoted caption."\n', "42\n"])
def test_plain_text_that_is_not_a_json_list_or_object_stays_plain_text(tmp_path, content):
    path = tmp_path / "captions.txt"
    path.write_text(content)
    records = read_captions(path, "plain_text").records
    assert [r.text for r in records] == content.splitlines()
    assert read_captions(path).records == records  # auto agrees


# --------------------------------------------------------------------------------------------
# The Flickr8k text folder
# --------------------------------------------------------------------------------------------


def test_flickr8k_folder_on_real_data(shared_data):
    folder = shared_data / FLICKR8K  # token file, the train split file only, and images/
    result = read_captions(folder)   # auto: a directory holding Flickr8k.token.txt
    records = result.records
    # Checked with wc/awk/comm: 40,460 captions of 8,092 images; the train split file lists
    # 6,000 of them (30,000 captions); the other 2,092 images (10,460 captions) are in no
    # split file of this folder.
    assert len(records) == 40460 and len({r.group_id for r in records}) == 8092
    by_split = {}
    for record in records:
        by_split.setdefault(record.split, set()).add(record.group_id)
    assert {split: len(images) for split, images in by_split.items()} == {"train": 6000, "": 2092}
    assert sum(r.split == "train" for r in records) == 30000
    assert by_split["train"] == set((folder / "Flickr_8k.trainImages.txt").read_text().split())
    assert {r.source for r in records} == {"flickr8k"} and result.undecodable == []
    assert records[0] == Caption("1000268201_693b08cb0e.jpg#0", "1000268201_693b08cb0e.jpg",
                                 "A child in a pink dress is climbing up a set of stairs in an entry way .",
                                 "train", "flickr8k")
    assert read_captions(folder, format="flickr8k").records == records


def test_flickr8k_folder_splits_match_the_split_file_reader(shared_data):
    folder = shared_data / FLICKR8K
    train = read_captions(folder, splits=["train"]).records
    via_split_file = read_captions(shared_data / TOKENS, split_file=shared_data / TRAIN_SPLIT).records
    assert [(r.caption_id, r.text, r.split) for r in train] == [
        (r.caption_id, r.text, r.split) for r in via_split_file]
    outside = read_captions(folder, exclude_splits=["train"]).records
    assert len(outside) == 10460 and {r.split for r in outside} == {""}
    assert "1022454332_6af2c1449a.jpg#0" in {r.caption_id for r in outside}
    assert read_captions(folder, splits=["dev", "test"]).records == []


@pytest.fixture
def flickr8k_folder(tmp_path):
    folder = tmp_path / "Flickr8k_text"
    folder.mkdir()
    (folder / "Flickr8k.token.txt").write_bytes(
        b"a.jpg#0\tA cat.\na.jpg#1\tA cat sleeps.\nb.jpg#0\tA dog.\nc.jpg#0\tA bird.\n"
        b"d.jpg#0\tA fish.\nd.jpg#1\tA f\xefsh.\ne.jpg#0 A horse.\n")
    (folder / "Flickr_8k.trainImages.txt").write_text("a.jpg\nb.jpg\n")
    (folder / "Flickr_8k.devImages.txt").write_text("c.jpg\n")
    (folder / "Flickr_8k.testImages.txt").write_text("d.jpg\n")
    (folder / "Flickr8k.lemma.token.txt").write_text("not read\n")
    (folder / "images").mkdir()  # subfolders are ignored
    (folder / "images" / "Flickr_8k.trainImages.txt").write_text("e.jpg\n")
    return folder


def test_flickr8k_folder_format(flickr8k_folder):
    result = read_captions(flickr8k_folder, source="f8k")
    assert [(r.caption_id, r.split, r.source) for r in result.records] == [
        ("a.jpg#0", "train", "f8k"), ("a.jpg#1", "train", "f8k"), ("b.jpg#0", "train", "f8k"),
        ("c.jpg#0", "dev", "f8k"), ("d.jpg#0", "test", "f8k"), ("e.jpg#0", "", "f8k"),
    ]
    token_file = flickr8k_folder / "Flickr8k.token.txt"
    assert result.undecodable == [f"{token_file}:6"]
    assert [r.caption_id for r in read_captions(flickr8k_folder, splits="dev").records] == ["c.jpg#0"]
    assert [r.caption_id for r in read_captions(flickr8k_folder, splits=["dev", ""]).records] == [
        "c.jpg#0", "e.jpg#0"]


def test_flickr8k_folder_undecodable_lines_follow_the_splits(flickr8k_folder):
    token_file = flickr8k_folder / "Flickr8k.token.txt"
    assert read_captions(flickr8k_folder, splits=["test"]).undecodable == [f"{token_file}:6"]  # d.jpg's
    assert read_captions(flickr8k_folder, splits=["train"]).undecodable == []
    assert read_captions(flickr8k_folder, exclude_splits="train").undecodable == [f"{token_file}:6"]
    assert read_captions(flickr8k_folder, exclude_splits=["test"]).undecodable == []


def test_flickr8k_folder_exclude_splits(flickr8k_folder):
    records = read_captions(flickr8k_folder, exclude_splits=["train"]).records
    assert [(r.caption_id, r.split) for r in records] == [("c.jpg#0", "dev"), ("d.jpg#0", "test"), ("e.jpg#0", "")]
    both = read_captions(flickr8k_folder, splits=["train", "dev"], exclude_splits=["train"]).records
    assert [r.caption_id for r in both] == ["c.jpg#0"]


def test_flickr8k_folder_with_only_some_split_files(flickr8k_folder):
    (flickr8k_folder / "Flickr_8k.devImages.txt").unlink()
    (flickr8k_folder / "Flickr_8k.testImages.txt").unlink()
    records = read_captions(flickr8k_folder).records
    assert [(r.group_id, r.split) for r in records if r.caption_id.endswith("#0")] == [
        ("a.jpg", "train"), ("b.jpg", "train"), ("c.jpg", ""), ("d.jpg", ""), ("e.jpg", "")]


def test_flickr8k_folder_image_in_two_split_files_is_an_error(flickr8k_folder):
    (flickr8k_folder / "Flickr_8k.testImages.txt").write_text("d.jpg\nb.jpg\n")
    with pytest.raises(ValueError, match="b.jpg") as error:
        read_captions(flickr8k_folder)
    assert "Flickr_8k.trainImages.txt" in str(error.value) and "Flickr_8k.testImages.txt" in str(error.value)


def test_flickr8k_folder_split_file_listing_an_image_without_captions(flickr8k_folder):
    (flickr8k_folder / "Flickr_8k.devImages.txt").write_text("c.jpg\nnope.jpg\n")
    with pytest.raises(ValueError, match=r"Flickr_8k\.devImages\.txt.*nope\.jpg"):
        read_captions(flickr8k_folder)


def test_flickr8k_folder_errors(flickr8k_folder, tmp_path, coco_file):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="Flickr8k.token.txt"):
        read_captions(empty)  # auto on a folder without the token file
    with pytest.raises(FileNotFoundError, match="Flickr8k.token.txt"):
        read_captions(empty, format="flickr8k")
    with pytest.raises(ValueError, match="reads a folder"):
        read_captions(flickr8k_folder / "Flickr8k.token.txt", format="flickr8k")
    with pytest.raises(ValueError, match="is a directory"):
        read_captions(flickr8k_folder, format="flickr8k_tokens")
    with pytest.raises(ValueError, match="split_file"):
        read_captions(flickr8k_folder, split_file=flickr8k_folder / "Flickr_8k.devImages.txt")
    with pytest.raises(ValueError, match="exclude_splits.*carry no split"):
        read_captions(coco_file, exclude_splits=["train"])


@pytest.mark.parametrize("ending", ["\r", "\r\n", "\n"])
def test_every_line_ending_splits_captions(tmp_path, ending):
    path = tmp_path / "captions.txt"
    path.write_bytes(ending.join(["a dog runs", "two cats sleep", "a red ball"]).encode() + ending.encode())
    texts = [r.text for r in read_captions(path, format="plain_text").records]
    assert texts == ["a dog runs", "two cats sleep", "a red ball"]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32"])
def test_a_utf16_or_utf32_caption_file_is_read_as_such(tmp_path, encoding):
    """With a byte-order mark (utf-16, utf-32) or, for UTF-16, without one: never captions full of NULs."""
    path = tmp_path / "captions.txt"
    path.write_bytes("a dog runs\r\ntwo cats sleep on a café sofa\r\n".encode(encoding))
    read = read_captions(path)
    assert [r.text for r in read.records] == ["a dog runs", "two cats sleep on a café sofa"]
    assert read.undecodable == []


def test_a_utf16_json_caption_file_is_read_and_a_broken_utf16_file_named(tmp_path):
    path = tmp_path / "captions.json"
    path.write_bytes(json.dumps([{"image_name": "a.jpg", "captions": ["a dog"], "split": "train"}]).encode("utf-16"))
    assert [r.text for r in read_captions(path).records] == ["a dog"]
    broken = tmp_path / "broken.txt"
    broken.write_bytes("a dog runs\n".encode("utf-16") + b"\x00\xd8")      # a lone surrogate at the end
    with pytest.raises(ValueError, match=r"broken\.txt: read as UTF-16-LE .* save it as UTF-8"):
        read_captions(broken)
