"""The world with ground truth (pipeline/world): its grammar reads back what it writes, the checker's
counts against hand computations, the renderer's determinism, the text-to-image model's mistakes at their
rates, the shuffled control, and the eval set keeping each image's scene."""
import json

import numpy as np
import pytest

from pipeline.world.checker import check, derangement, exact_metrics, pair_audit, summarize
from pipeline.world.grammar import describe, parse, references
from pipeline.world.render import render
from pipeline.world.scenes import Scene, WorldObject, holds, sample_scene, world_rng
from pipeline.world.text_to_image import Mistakes, WorldTextToImage, layout, make_mistakes


def obj(shape, colour, x, y, size="small"):
    return WorldObject(shape, colour, size, x, y)


SCENE = Scene((obj("circle", "red", 0.2, 0.5), obj("square", "blue", 0.8, 0.5)), background=7)


def test_every_caption_the_grammar_writes_reads_back_as_an_exact_description_of_its_scene():
    rng = world_rng(0, "test")
    for _ in range(300):
        scene = sample_scene(rng)
        for caption in references(scene, rng, 5):
            result = check(caption, scene)
            assert result["exact"] == 1, (caption, scene, result)


def test_references_are_different_phrasings():
    rng = world_rng(1, "test")
    refs = references(sample_scene(rng), rng, 5)
    assert len(refs) == len(set(refs)) == 5


def test_the_reader_tolerates_missing_and_extra_words():
    reading = parse("Well, I think there's a shiny RED ball sitting left of some tiny, blue box!")
    assert [(m.colour, m.shape, m.size, m.count) for m in reading.mentions] == [
        ("red", "circle", None, 1), ("blue", "square", "small", 1)]
    assert reading.relations == ((0, "left", 1),)
    colourless = parse("two discs")
    assert [(m.colour, m.shape, m.count) for m in colourless.mentions] == [(None, "circle", 2)]
    assert parse("nothing to see").mentions == ()


def test_checker_counts_against_a_hand_computation():
    # named: red circle (right), blue circle (wrong binding: blue and circle exist, not together),
    # green star (hallucinated shape); missing: blue square; relation red circle above blue circle: not
    # scored (blue circle is not an object of the scene)
    result = check("a red circle above a blue circle and a green star", SCENE)
    assert (result["objects_tp"], result["objects_fp"], result["objects_fn"]) == (1, 2, 1)
    assert (result["binding_total"], result["binding_correct"]) == (2, 1)
    assert result["hallucinated"] == 1 and result["mentions"] == 3
    assert result["relation_total"] == 0 and result["exact"] == 0
    assert result["wrong"] == ["blue circle", "green star"] and result["missing"] == ["blue square"]
    right_of = check("a red ball right of a blue box", SCENE)      # both there, relation false
    assert (right_of["relation_total"], right_of["relation_correct"], right_of["exact"]) == (1, 0, 0)
    left_of = check("a red ball left of a blue box", SCENE)
    assert (left_of["relation_total"], left_of["relation_correct"], left_of["exact"]) == (1, 1, 1)


def test_counts_and_plurals():
    scene = Scene((obj("circle", "red", 0.2, 0.2), obj("circle", "red", 0.8, 0.2), obj("star", "white", 0.5, 0.8)))
    assert check("two red circles and a white star", scene)["exact"] == 1
    wrong = check("three red circles and a white star", scene)
    assert (wrong["count_total"], wrong["count_correct"], wrong["exact"]) == (2, 1, 0)
    plural = check("red circles and a white star", scene)      # a plural without a number: "more than one"
    assert plural["count_correct"] == 2
    single = check("a red circle and a white star", scene)
    assert single["count_correct"] == 1


def test_summarize_micro_averages_over_captions():
    a = check("a red circle", SCENE)                     # tp 1, fn 1
    b = check("a green star and a blue square", SCENE)   # tp 1, fp 1, fn 1
    m = summarize([a, b])
    assert m["object_precision"] == pytest.approx(2 / 3)
    assert m["object_recall"] == pytest.approx(2 / 4)
    assert m["object_f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert m["hallucination_rate"] == pytest.approx(1 / 3)
    assert m["exact_match"] == 0.0 and m["captions"] == 2


def test_relations_hold_on_positions_with_a_margin():
    a, b = obj("circle", "red", 0.2, 0.2), obj("square", "blue", 0.7, 0.8)
    assert holds(a, "left", b) and holds(a, "above", b) and holds(b, "right", a) and holds(b, "below", a)
    assert not holds(a, "right", b) and not holds(obj("star", "red", 0.5, 0.5), "left", obj("star", "red", 0.52, 0.1))


def test_a_scene_renders_to_the_same_pixels_every_time_and_the_styles_differ():
    for style in ("photo", "synthetic"):
        first, second = np.asarray(render(SCENE, style, 64)), np.asarray(render(SCENE, style, 64))
        assert first.shape == (64, 64, 3) and np.array_equal(first, second)
    assert np.abs(np.asarray(render(SCENE, "photo"), float) - np.asarray(render(SCENE, "synthetic"), float)).mean() > 20
    with pytest.raises(ValueError, match="unknown style"):
        render(SCENE, "oil")


def test_the_synthetic_style_draws_each_object_in_its_palette_colour_where_the_scene_puts_it():
    image = np.asarray(render(Scene((obj("square", "blue", 0.25, 0.75, "large"),)), "synthetic", 64))
    assert tuple(image[48, 16]) == (40, 80, 210)         # the square's centre
    assert tuple(image[16, 48]) == (236, 234, 226)       # the canvas


def test_layout_places_the_named_objects_so_that_the_stated_relation_holds():
    for seed in range(30):
        scene = layout("a red ball above a blue box", np.random.default_rng(seed))
        assert check("a red ball above a blue box", scene)["exact"] == 1


def test_mistakes_are_made_at_their_rates_and_recorded():
    model = WorldTextToImage({"mistakes": {"binding": 0.0, "drop": 0.0, "count": 0.0, "extra": 0.0},
                              "style": "synthetic", "resolution": 32}, "world", None)
    captions = [describe(sample_scene(world_rng(3, "t2i")), world_rng(s, "c")) for s in range(50)]
    assert all(check(c, model.draw(c, s))["exact"] for s, c in enumerate(captions))
    rng = np.random.default_rng(0)
    scene = Scene((obj("circle", "red", 0.2, 0.5), obj("square", "blue", 0.8, 0.5)))
    made = [make_mistakes(scene, Mistakes(binding=0.3, drop=0.0, count=0.0, extra=0.0), rng) for _ in range(2000)]
    swapped = [m for m in made if m.extra["mistakes"] == ["binding"]]
    assert abs(len(swapped) / 2000 - 0.3) < 0.04
    assert all(sorted(o.kind for o in m.objects) == [("blue", "circle"), ("red", "square")] for m in swapped)
    extra = make_mistakes(scene, Mistakes(binding=0, drop=0, count=0, extra=1.0), rng)
    assert len(extra.objects) == 3 and extra.extra["mistakes"] == ["extra"]


def test_generate_records_the_scene_each_image_shows_and_the_audit_counts_matches():
    model = WorldTextToImage({"mistakes": {"binding": 0.0, "drop": 1.0, "count": 0.0, "extra": 0.0},
                              "style": "synthetic", "resolution": 32}, "world", None)
    captions = ["a red ball left of a blue box", "a white star"]
    images = model.generate(captions, [1, 2])
    scenes = [Scene.from_dict(json.loads(im.info["scene"])) for im in images]
    assert [len(s.objects) for s in scenes] == [1, 1]          # dropped one of two; a single object stays
    audit = pair_audit(captions, scenes)
    assert audit["exact_matches"] == 1 and audit["mistakes_made"] == {"drop": 1}
    again = model.generate(captions, [1, 2])
    assert [np.asarray(a).tobytes() for a in again] == [np.asarray(a).tobytes() for a in images]


def test_the_shuffled_control_scores_each_caption_against_another_image():
    p = derangement(10, seed=3)
    assert sorted(p) == list(range(10)) and not any(p == np.arange(10))
    scenes = [Scene((obj(shape, "red", 0.5, 0.5),)) for shape in ("circle", "square", "star", "heart")]
    captions = ["a red circle", "a red square", "a red star", "a red heart"]
    own, shuffled, _ = exact_metrics(captions, scenes)
    assert own["object_f1"] == 1.0 and shuffled["object_f1"] == 0.0
    with pytest.raises(ValueError, match="at least 2"):
        derangement(1)


def test_a_world_eval_set_keeps_each_images_scene(tmp_path):
    from pipeline.config import EvalSet
    from pipeline.data.evalsets import eval_rows, eval_schema
    from pipeline.world.dataset import write_eval_set, write_frequent_caption

    write_eval_set(tmp_path, seed=0, images=4, references_per_image=5, image_size=32)
    rows, report = eval_rows(EvalSet(images=str(tmp_path / "images"), references=str(tmp_path / "references.json")))
    assert report["loaded"] == 4 and "scene" in eval_schema(rows).names
    truth = json.loads((tmp_path / "references.json").read_text())
    for row, item in zip(rows, truth):
        scene = Scene.from_dict(json.loads(row["scene"]))
        assert scene == Scene.from_dict(item["scene"]) and len(row["references"]) == 5
        assert all(check(r, scene)["exact"] for r in row["references"])
    corpus = tmp_path / "corpus.json"
    corpus.write_text(json.dumps([{"split": "train", "image_name": "a", "captions": ["x", "y"]},
                                  {"split": "train", "image_name": "b", "captions": ["y", "z"]}]))
    assert write_frequent_caption(tmp_path / "f.json", corpus, tmp_path / "references.json")["caption"] == "y"
    assert {r["prediction"] for r in json.loads((tmp_path / "f.json").read_text())} == {"y"}


def test_a_shape_twin_differs_from_its_scene_in_shapes_only_and_keeps_pairs_pairs():
    from pipeline.world.scenes import shape_twin
    rng = world_rng(0, "twin-test")
    for _ in range(200):
        scene = sample_scene(rng)
        twin = shape_twin(scene, rng)
        assert twin.background == scene.background and len(twin.objects) == len(scene.objects)
        for a, b in zip(scene.objects, twin.objects):
            assert b.shape != a.shape and (a.colour, a.size, a.x, a.y) == (b.colour, b.size, b.x, b.y)
        mapping = {(a.shape, b.shape) for a, b in zip(scene.objects, twin.objects)}
        assert len({a for a, _ in mapping}) == len(mapping)            # one shape, one replacement


def test_a_binding_twin_moves_every_colour_to_other_objects_and_keeps_the_rest():
    from pipeline.world.scenes import binding_twin
    rng = world_rng(0, "binding-twin-test")
    twins = none = 0
    for _ in range(300):
        scene = sample_scene(rng)
        twin = binding_twin(scene, rng)
        if len({o.colour for o in scene.objects}) < 2:
            assert twin is None                                        # nothing to swap
            none += 1
            continue
        twins += 1
        assert twin.background == scene.background and len(twin.objects) == len(scene.objects)
        for a, b in zip(scene.objects, twin.objects):
            assert b.colour != a.colour and (a.shape, a.size, a.x, a.y) == (b.shape, b.size, b.x, b.y)
        mapping = {(a.colour, b.colour) for a, b in zip(scene.objects, twin.objects)}
        assert len({a for a, _ in mapping}) == len(mapping)            # a pair of red circles stays a pair
        assert {o.colour for o in twin.objects} == {o.colour for o in scene.objects}   # the same colours, moved
    assert twins > 50 and none > 50
