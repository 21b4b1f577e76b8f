"""Result files of other systems: every format read, matched to eval images by id, file name or COCO number."""
import json

import pytest

from pipeline.evaluation.results import match, read_predictions

IMAGES = ["COCO_val2014_000000391895.jpg", "COCO_val2014_000000522418.jpg", "1000268201_693b08cb0e.jpg"]


def test_coco_results_match_by_the_number_in_the_file_name(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(json.dumps([{"image_id": 391895, "caption": "a man"}, {"image_id": 7, "caption": "x"}]))
    matched, missing, extra = match(read_predictions(path), IMAGES)
    assert matched == {"COCO_val2014_000000391895.jpg": "a man"}
    assert missing == IMAGES[1:] and extra == ["7"]


def test_karpathy_style_and_json_lines_match_by_file_name(tmp_path):
    path = tmp_path / "k.json"
    path.write_text(json.dumps([{"image_name": "1000268201_693b08cb0e.jpg", "captions": ["r"], "prediction": "a"}]))
    assert match(read_predictions(path), IMAGES)[0] == {"1000268201_693b08cb0e.jpg": "a"}
    lines = tmp_path / "c.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in [
        {"image": "/photos/1000268201_693b08cb0e.jpg", "method": "syntic", "caption": "a dog", "tags": []},
        {"image": "/photos/1000268201_693b08cb0e.jpg", "method": "pcmnet", "caption": "a cat", "tags": []}]))
    with pytest.raises(ValueError, match="several methods \\(pcmnet, syntic\\): pick one"):
        read_predictions(lines)
    assert match(read_predictions(lines, "pcmnet"), IMAGES)[0] == {"1000268201_693b08cb0e.jpg": "a cat"}


@pytest.mark.parametrize("content, message", [
    ({"images": []}, "expected a JSON list"),
    ([{"image_id": 1}], "item 0 has neither image_id"),
    ([{"image_id": 1, "caption": 3}], "the caption of '1' is not a string"),
    ([{"image_id": 1, "caption": "a"}, {"image_id": 1, "caption": "b"}], "a second caption for image '1'"),
])
def test_bad_result_files_are_named(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ValueError, match=message):
        read_predictions(path)
