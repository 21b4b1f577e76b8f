"""Caption metrics against hand computations and properties that a wrong wiring would break."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from pipeline.evaluation import metrics
from pipeline.evaluation.metrics import caption_metrics, clip_score, missing_spice_jars, ref_clip_score

COCO_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr")

REFERENCES = {
    "dog": ["A black dog runs across the green grass."],
    "cats": ["Two cats are sleeping on a red sofa."],
    "bike": ["A man in a helmet rides a bicycle down a hill."],
}
WORSE_PREDICTIONS = {
    "dog": "A black cat sits on a chair.",
    "cats": "A dog is sleeping near a door.",
    "bike": "A woman walks up the street.",
}


@pytest.fixture(scope="module")
def identical_scores():
    predictions = {image_id: refs[0] for image_id, refs in REFERENCES.items()}
    return caption_metrics(predictions, REFERENCES)


@pytest.fixture(scope="module")
def worse_scores():
    return caption_metrics(WORSE_PREDICTIONS, REFERENCES)


# --- COCO metrics -------------------------------------------------------------------------------

def test_identical_caption_gets_bleu_4_of_one_and_more_cider_than_a_wrong_one(
    identical_scores, worse_scores
):
    assert identical_scores["scores"]["BLEU-4"] == pytest.approx(1.0)
    assert identical_scores["scores"]["CIDEr"] > worse_scores["scores"]["CIDEr"] + 1.0


def test_worse_caption_scores_lower_on_every_metric(identical_scores, worse_scores):
    assert set(identical_scores["scores"]) >= set(COCO_METRICS)
    for name in identical_scores["scores"]:
        assert worse_scores["scores"][name] < identical_scores["scores"][name], name


def test_coco_metrics_are_fractions_and_cider_unscaled(identical_scores):
    scores = identical_scores["scores"]
    for name in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L"):
        assert 0.0 <= scores[name] <= 1.0, name
    assert 1.0 < scores["CIDEr"] <= 10.0  # CIDEr-D is not scaled to [0, 1]


def test_meteor_off_is_listed_as_skipped_and_leaves_the_other_scores_alone(worse_scores):
    without = caption_metrics(WORSE_PREDICTIONS, REFERENCES, meteor=False)
    assert "METEOR" not in without["scores"] and "evaluate.meteor" in without["skipped"]["METEOR"]
    assert without["scores"] == {k: v for k, v in worse_scores["scores"].items() if k != "METEOR"}


def test_corpus_bleu_matches_hand_computation():
    predictions = {"dog": "A dog, a dog runs on grass.", "cats": "Two cats sleep."}
    references = {
        "dog": ["A brown dog is running on green grass.", "The dog runs."],
        "cats": ["Two cats are sleeping.", "Cats asleep on a sofa"],
    }
    # After PTB tokenisation (lower case, punctuation dropped):
    #   dog:  "a dog a dog runs on grass" (7 tokens); references of 8 and 3 tokens, closest 8.
    #         Unigrams clipped by the largest count in one reference: a 1, dog 1, runs 1, on 1,
    #         grass 1 -> 5 matches. Bigrams: only "dog runs" matches -> 1 of 6.
    #   cats: "two cats sleep" (3 tokens); references of 4 and 5 tokens, closest 4.
    #         Unigrams: two, cats -> 2 matches. Bigrams: "two cats" -> 1 of 2.
    # Corpus: candidate length 10 < reference length 12 -> brevity penalty exp(1 - 12/10).
    brevity_penalty = math.exp(1 - 12 / 10)
    unigram_precision = (5 + 2) / (7 + 3)
    bigram_precision = (1 + 1) / (6 + 2)

    scores = caption_metrics(predictions, references)["scores"]

    assert scores["BLEU-1"] == pytest.approx(brevity_penalty * unigram_precision, rel=1e-6)
    assert scores["BLEU-2"] == pytest.approx(
        brevity_penalty * math.sqrt(unigram_precision * bigram_precision), rel=1e-6
    )


def test_empty_prediction_is_scored_not_rejected():
    predictions = {"dog": "", "cats": "Two cats are sleeping on a red sofa."}
    references = {image_id: REFERENCES[image_id] for image_id in predictions}

    scores = caption_metrics(predictions, references)["scores"]

    assert all(math.isfinite(value) for value in scores.values())
    assert scores["BLEU-1"] < 1.0


def test_held_out_human_caption_beats_shuffled_captions_on_flickr30k(shared_data):
    images = json.loads((shared_data / "flickr30k-karpathy" / "test.json").read_text())[:20]
    references = {image["image_name"]: image["captions"][1:] for image in images}
    held_out = {image["image_name"]: image["captions"][0] for image in images}
    names = list(held_out)
    shuffled = {name: held_out[other] for name, other in zip(names, np.roll(names, 1))}

    matched = caption_metrics(held_out, references)["scores"]
    mismatched = caption_metrics(shuffled, references)["scores"]

    for name in COCO_METRICS:
        assert math.isfinite(matched[name]) and math.isfinite(mismatched[name]), name
        assert matched[name] > mismatched[name], name


def test_spice_is_skipped_with_reason_when_corenlp_jars_are_absent(monkeypatch, tmp_path):
    monkeypatch.setattr(metrics, "spice_lib_dir", lambda: tmp_path)

    result = caption_metrics({"a": "a dog", "b": "a cat"}, {"a": ["a dog"], "b": ["a cat"]})

    assert "SPICE" not in result["scores"]
    reason = result["skipped"]["SPICE"]
    assert str(tmp_path / "stanford-corenlp-3.6.0.jar") in reason
    assert str(tmp_path / "stanford-corenlp-3.6.0-models.jar") in reason
    assert "download" in reason and str(tmp_path) in reason


def test_missing_spice_jars_lists_only_absent_files(tmp_path):
    (tmp_path / "stanford-corenlp-3.6.0.jar").write_bytes(b"")
    assert missing_spice_jars(tmp_path) == [tmp_path / "stanford-corenlp-3.6.0-models.jar"]
    (tmp_path / "stanford-corenlp-3.6.0-models.jar").write_bytes(b"")
    assert missing_spice_jars(tmp_path) == []


# --- input validation ---------------------------------------------------------------------------

def test_mismatched_ids_are_named_at_most_five():
    references = {f"img{i}": ["a dog"] for i in range(8)}
    predictions = {"img0": "a dog", "stray": "a cat"}

    with pytest.raises(ValueError) as error:
        caption_metrics(predictions, references)

    message = str(error.value)
    assert "7 image id(s)" in message and "'img1'" in message and "'img5'" in message
    assert "'img6'" not in message and "2 more" in message
    assert "no references for 1 image id(s): 'stray'" in message


def test_non_string_prediction_raises_type_error_naming_the_id():
    with pytest.raises(TypeError, match="'b'.*must be a string, got NoneType"):
        caption_metrics({"a": "a dog", "b": None}, {"a": ["a dog"], "b": ["a cat"]})


def test_image_without_references_is_named():
    with pytest.raises(ValueError, match="image 'b' has no reference captions"):
        caption_metrics({"a": "a dog", "b": "a cat"}, {"a": ["a dog"], "b": []})


def test_single_string_as_references_is_rejected():
    with pytest.raises(TypeError, match="references for image 'a' must be a list of strings"):
        caption_metrics({"a": "a dog"}, {"a": "a dog"})


def test_missing_java_is_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="Java.*PTB tokenizer and METEOR"):
        caption_metrics({"a": "a dog"}, {"a": ["a dog"]})


# --- CLIPScore ----------------------------------------------------------------------------------

def _unit(degrees: float) -> list[float]:
    """A 2-D unit vector at the given angle from the x axis."""
    radians = math.radians(degrees)
    return [math.cos(radians), math.sin(radians)]


def test_clip_score_on_hand_vectors():
    images = np.array([_unit(0), _unit(0), _unit(0), _unit(0)])
    # orthogonal, opposite (negative cosine), parallel, 45 degrees; lengths need not be 1.
    captions = np.array([_unit(90), _unit(150), _unit(0), _unit(45)]) * [[3.0], [0.5], [7.0], [2.0]]

    mean, per_item = clip_score(images, captions)

    expected = [0.0, 0.0, 2.5, 2.5 * math.cos(math.radians(45))]
    np.testing.assert_allclose(per_item, expected, atol=1e-12)
    assert mean == pytest.approx(sum(expected) / 4)


def test_clip_score_weight_scales_linearly():
    _, per_item = clip_score(np.array([_unit(0)]), np.array([_unit(60)]), w=1.0)
    assert per_item[0] == pytest.approx(0.5)


def test_ref_clip_score_is_harmonic_mean_of_image_and_best_reference_terms():
    images = np.array([_unit(60), _unit(90), _unit(0)])
    captions = np.array([_unit(0), _unit(0), _unit(0)])
    references = [
        np.array([_unit(90), _unit(180), _unit(45)]) * 4.0,  # best cosine: cos 45
        np.array([_unit(0)]),  # caption orthogonal to its image: CLIP-S 0
        np.array([_unit(120), _unit(200)]),  # every cosine negative: reference term 0
    ]

    mean, per_item = ref_clip_score(images, captions, references)

    clip_s = 2.5 * 0.5  # cos 60 degrees
    best_reference = math.cos(math.radians(45))
    expected_first = 2 * clip_s * best_reference / (clip_s + best_reference)
    np.testing.assert_allclose(per_item, [expected_first, 0.0, 0.0], atol=1e-12)
    assert mean == pytest.approx(expected_first / 3)


def test_clip_score_dimension_mismatch_states_both_shapes():
    with pytest.raises(ValueError, match=r"\(2, 4\) and \(2, 3\)"):
        clip_score(np.ones((2, 4)), np.ones((2, 3)))


def test_ref_clip_score_reference_dimension_mismatch_is_named():
    with pytest.raises(ValueError, match=r"reference_features\[1\] has shape \(2, 3\).*4"):
        ref_clip_score(np.ones((2, 4)), np.ones((2, 4)), [np.ones((1, 4)), np.ones((2, 3))])


def test_ref_clip_score_needs_one_reference_array_per_caption():
    with pytest.raises(ValueError, match="1 entries, expected one"):
        ref_clip_score(np.ones((2, 4)), np.ones((2, 4)), [np.ones((1, 4))])


def test_zero_feature_vector_is_rejected():
    captions = np.ones((3, 4))
    captions[1] = 0.0
    with pytest.raises(ValueError, match=r"caption_features rows \[1\] have zero"):
        clip_score(np.ones((3, 4)), captions)
