"""The HTML report: table formatting, skip footnotes, escaping and embedded thumbnails."""
from __future__ import annotations

import base64
import html
import io
import re

import pytest
from PIL import Image

from pipeline.evaluation.report import write_report

SPICE_REASON = "SPICE needs the Stanford CoreNLP jars <missing>"
HOSTILE_CAPTION = "a dog <script>alert('x')</script> & a cat"


def _image_bytes(size: tuple[int, int], mode: str, file_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, "red" if mode == "RGB" else (0, 128, 255, 128)).save(buffer, file_format)
    return buffer.getvalue()


def _metrics_rows() -> list[dict]:
    return [
        {
            "method": "SynTIC", "eval_set": "coco-test", "variant": "paper",
            "BLEU-4": 0.2901, "METEOR": 0.2502, "ROUGE-L": 0.5287, "CIDEr": 1.0134,
            "CLIPScore": 0.76123, "RefCLIPScore": 0.81,
            "skipped": {"SPICE": SPICE_REASON},
        },
        {
            "method": "CapDec & friends", "eval_set": "flickr30k-test",
            "BLEU-4": 0.17, "METEOR": 0.2, "ROUGE-L": 0.44, "CIDEr": 0.391, "SPICE": 0.1234,
        },
    ]


def _gallery() -> list[dict]:
    return [
        {
            "image_id": "wide.png",
            "image": _image_bytes((900, 300), "RGBA", "PNG"),
            "predictions": {"SynTIC": HOSTILE_CAPTION, "CapDec & friends": "a red square"},
            "references": ["a red <b>square</b>", "an empty picture"],
            "tags": ["synthetic", "<odd tag>"],
        },
        {
            "image_id": "small.jpg",
            "image": _image_bytes((120, 80), "RGB", "JPEG"),
            "predictions": {"SynTIC": "a small red image"},
            "references": ["red"],
        },
    ]


@pytest.fixture()
def page(tmp_path) -> str:
    path = tmp_path / "out" / "report.html"
    write_report(path, "Results <v1>", _metrics_rows(), _gallery(),
                 notes=["CIDEr is CIDEr-D", "seed <7>"])
    return path.read_text(encoding="utf-8")


def _table_rows(page: str) -> list[str]:
    tbody = re.search(r"<tbody>(.*?)</tbody>", page, re.S).group(1)
    return re.findall(r"<tr>(.*?)</tr>", tbody, re.S)


def _cells(row: str) -> list[str]:
    return re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)


def test_each_method_has_a_row_in_table_one_style(page):
    rows = _table_rows(page)
    assert len(rows) == 2
    syntic, capdec = (_cells(row) for row in rows)
    # Method, Variant, Eval set, BLEU-4, METEOR, ROUGE-L, CIDEr, SPICE, CLIPScore, RefCLIPScore
    assert syntic[:3] == ["SynTIC", "paper", "coco-test"]
    assert syntic[3:7] == ["29.0", "25.0", "52.9", "101.3"]
    assert syntic[8:] == ["0.761", "0.810"]
    assert capdec[:3] == ["CapDec &amp; friends", "", "flickr30k-test"]
    assert capdec[3:8] == ["17.0", "20.0", "44.0", "39.1", "12.3"]
    assert capdec[8:] == ["\u2013", "\u2013"]  # not computed, no reason given: no footnote


def test_skipped_metric_shows_dash_with_its_reason(page):
    spice_cell = _cells(_table_rows(page)[0])[7]
    assert spice_cell.startswith("\u2013<sup>")
    footnote = re.search(r'href="#(skip-\d+)"', spice_cell).group(1)
    assert f'<li id="{footnote}">{html.escape(SPICE_REASON)}</li>' in page


def test_captions_and_names_are_escaped(page):
    assert "<script>" not in page
    assert html.escape(HOSTILE_CAPTION) in page
    assert "a red &lt;b&gt;square&lt;/b&gt;" in page
    assert "&lt;odd tag&gt;" in page
    assert "<title>Results &lt;v1&gt;</title>" in page
    assert "<li>seed &lt;7&gt;</li>" in page


def _thumbnail_sizes(page: str) -> list[tuple[int, int]]:
    """Sizes of the embedded images, checking each is a decodable JPEG data URI."""
    sizes = []
    for data in re.findall(r'<img src="data:image/jpeg;base64,([^"]+)"', page):
        with Image.open(io.BytesIO(base64.b64decode(data))) as thumbnail:
            assert thumbnail.format == "JPEG"
            sizes.append(thumbnail.size)
    return sizes


def test_gallery_images_are_embedded_thumbnails(page):
    # 900x300 is scaled to 256 on the long side with its aspect kept; 120x80 is not enlarged.
    assert _thumbnail_sizes(page) == [(256, 85), (120, 80)]


def test_real_photo_is_embedded_at_most_256_px(tmp_path, shared_data):
    photo = sorted((shared_data / "flickr8k" / "images").glob("*.jpg"))[0]
    item = {"image_id": photo.name, "image": photo.read_bytes(),
            "predictions": {"SynTIC": "a photo"}, "references": ["a real photo"]}
    write_report(tmp_path / "report.html", "Flickr8k", [], [item])

    (size,) = _thumbnail_sizes((tmp_path / "report.html").read_text(encoding="utf-8"))
    assert max(size) == 256


def test_page_is_self_contained(page):
    assert not re.search(r"""(src|href)=["'](?!data:|#)""", page)
    assert "<link" not in page and "@import" not in page


def test_notes_and_empty_gallery_are_optional(tmp_path):
    path = tmp_path / "report.html"
    write_report(path, "Only metrics", _metrics_rows(), [])
    page = path.read_text(encoding="utf-8")
    assert len(_table_rows(page)) == 2
    assert "Gallery" not in page and "Notes" not in page


def test_row_without_method_is_rejected(tmp_path):
    expected = r"metrics_table\[0\] lacks required key\(s\) \['method'\]"
    with pytest.raises(ValueError, match=expected):
        write_report(tmp_path / "r.html", "t", [{"eval_set": "coco-test"}], [])


def test_unreadable_gallery_image_is_named(tmp_path):
    item = dict(_gallery()[1], image=b"not an image")
    with pytest.raises(ValueError, match="gallery image 'small.jpg' could not be read"):
        write_report(tmp_path / "r.html", "t", [], [item])


# --- a world run (pipeline/world): the gallery with wrong kinds marked, the exact metrics, the world's models ---

import json  # noqa: E402

from pipeline.evaluation.report import bar_failures, build_report, mark_caption, world_mentions  # noqa: E402

WORLD_METHODS = ("syntic", "syntic-baseline", "capdec")      # full SynTIC, its ablation, a method that fails
EVALSET = "shapes"


def _world_config(worlds: bool = True):
    """The world profile with three method instances, no modality-gap analysis and (``worlds=False``) no world."""
    from pipeline import config as cfg
    from pipeline.profiles import resolve_profile

    params = resolve_profile("world")
    params["methods"] = {name: params["methods"][name] for name in WORLD_METHODS}
    params["modality_gap"]["models"] = []
    params["report"]["gallery_size"] = 4
    if not worlds:
        params["worlds"] = {}
    return cfg.from_dict(params)


def make_world_artifacts(config, images: int = 8, seed: int = 3, tags: bool = True) -> dict:
    """Small fake artifacts of a world run in ``pipeline.paths`` (point them at a temp folder first): an eval
    set with scenes, every method instance's and the frequent-caption control's captions scored by the real
    checker, and the world stages' reports. Each instance's captioner (image -> caption) is chosen by its
    name: the full method describes the image, the ablation swaps a colour in every second caption, and the
    others describe another image (they ignore it: the shuffled-control bar must catch them).
    Returns {instance: {image_id: caption}}."""
    import pyarrow as pa

    from pipeline import paths
    from pipeline.data.shards import write_sharded
    from pipeline.stage import write_json
    from pipeline.world.checker import exact_metrics
    from pipeline.world.grammar import describe
    from pipeline.world.render import render
    from pipeline.world.scenes import sample_scene, world_rng

    rng = world_rng(seed, "report-test")
    scenes = [sample_scene(rng) for _ in range(images)]
    ids = [f"{k:05d}.png" for k in range(images)]

    def png(scene) -> bytes:
        buffer = io.BytesIO()
        render(scene, "photo", 64).save(buffer, format="PNG")
        return buffer.getvalue()

    references = [[describe(s, rng) for _ in range(3)] for s in scenes]
    table = pa.table({"image_id": ids, "image": [png(s) for s in scenes], "references": references,
                      "scene": [json.dumps(s.to_dict()) for s in scenes]})
    for evalset in config.evalsets:
        write_sharded(paths.evalset(evalset), images, images, "fake-evalset", lambda task: table, {"model": None})
        write_json(paths.evalset(evalset) / "report.json", {"skipped": {}})
        if tags:
            labels = pa.table({"image_id": ids, "labels": [sorted(s.shapes()) for s in scenes]})
            write_sharded(paths.eval_tags(evalset), images, images, "fake-tags", lambda task: labels, {"model": None})

    def swap_colour(caption: str) -> str:
        return caption.replace("red", "@").replace("blue", "red").replace("@", "blue") if "red" in caption or \
            "blue" in caption else caption.replace("green", "purple", 1)

    def captioner(name: str):
        if name == "syntic":
            return lambda k: describe(scenes[k], rng)
        if name == "syntic-baseline":
            return lambda k: swap_colour(describe(scenes[k], rng)) if k % 2 else describe(scenes[k], rng)
        return lambda k: describe(scenes[(k + 1) % images], rng)

    frequent = describe(scenes[0], rng)
    written = {}
    who = [(name, captioner(name)) for name in config.methods]
    who += [(name, lambda k: frequent) for name in config.external_results]
    for rank, (name, caption_of) in enumerate(who):
        captions = {image_id: caption_of(k) for k, image_id in enumerate(ids)}
        exact, shuffled, checks = exact_metrics([captions[i] for i in ids], scenes)
        scores = {"BLEU-1": 0.5, "BLEU-4": 0.2, "METEOR": 0.2, "ROUGE_L": 0.4, "ROUGE-L": 0.4,
                  "CIDEr": 1.2 - 0.2 * rank, "CLIPScore": 0.7, "RefCLIPScore": 0.75, "images_evaluated": images,
                  "images_missing": 0, "results_unmatched": 0,
                  **{k: v for k, v in exact.items() if k != "captions"},
                  "shuffled_control": {k: v for k, v in shuffled.items() if k != "captions"}}
        for evalset in config.evalsets:
            write_json(paths.captions(name, evalset), captions)
            write_json(paths.metrics(name, evalset), scores)
            write_json(paths.evaluation(name, evalset), {
                "skipped_metrics": {"SPICE": "no Java here"}, "skipped_images": [],
                "per_image": {i: {"wrong": c["wrong"], "missing": c["missing"], "exact": bool(c["exact"])}
                              for i, c in zip(ids, checks)}})
        written[name] = captions
    for world in config.worlds:
        write_json(paths.world_metrics(world, "data"), {"corpus": {"captions": 1200, "scenes": 600},
                                                        "eval": {"images": images, "references": 3 * images},
                                                        "frequent_caption": {"caption": frequent, "count": 3}})
        write_json(paths.world_metrics(world, "clip"), {"model": "synthcap-world-vit", "pairs": 20000, "heldout": 1000,
                                                        "synthetic_pairs": 5000, "shape_twins": True,
                                                        "i2t_r1": 0.21, "i2t_r5": 0.62, "i2t_r10": 0.8,
                                                        "t2i_r1": 0.2, "t2i_r5": 0.6, "t2i_r10": 0.79,
                                                        "zero_shot_single_object": {"shape_accuracy": 0.875,
                                                                                    "colour_accuracy": 1.0,
                                                                                    "chance": 1 / 7},
                                                        "zero_shot_binding": {"binding_accuracy": 0.5675,
                                                                              "chance": 0.5}})
        write_json(paths.world_metrics(world, "detector"), {
            "heldout": 500, "threshold": 0.4, "images": 1500, "synthetic_images": 0,
            "heldout_photo": {"precision": 0.93, "recall": 0.88, "f1": 0.904},
            "heldout_synthetic": {"precision": 0.7, "recall": 0.6, "f1": 0.646}})
    write_json(paths.SYNTHETIC_IMAGES / "report.json", {
        "pairs": 1200, "exact_matches": 853, "exact_match_fraction": 0.7108,
        "mistakes_made": {"binding": 104, "count": 115, "drop": 76, "extra": 118},
        "metrics": {"object_f1": 0.885, "binding_accuracy": 0.924}})
    return written


def _world_table(page: str) -> list[str]:
    section = page[page.index("<h2>Exact metrics in the world</h2>"):]
    tbody = re.search(r"<tbody>(.*?)</tbody>", section, re.S).group(1)
    return re.findall(r"<tr[^>]*>.*?</tr>", tbody, re.S)


def _row_of(rows: list[str], method: str) -> str:
    return next(r for r in rows if _cells(r) and _cells(r)[0] == method)


def test_wrong_kinds_are_struck_through_in_the_caption():
    caption = "a small red ball to the left of two blue boxes & a <star>"
    marked = mark_caption(caption, ["red circle", "star"])
    struck = re.findall(r'<span class="wrong"[^>]*>(.*?)</span>', marked)
    assert struck == ["a small red ball", "star"]
    assert "two blue boxes" in marked and "blue boxes</span>" not in marked     # a right kind stays plain
    assert "&amp; a &lt;" in marked and "<star>" not in marked                  # the rest is escaped text
    assert re.sub(r"<[^>]+>", "", marked) == html.escape(caption, quote=True)   # no word is lost or moved


def test_marking_agrees_with_the_checker():
    """The struck phrases are exactly the mentions of the kinds the checker calls wrong."""
    from pipeline.world.checker import check
    from pipeline.world.grammar import parse
    from pipeline.world.scenes import Scene, WorldObject

    from pipeline.world.grammar import describe
    from pipeline.world.scenes import sample_scene, world_rng

    rng = world_rng(1, "report-marking")
    scene = Scene((WorldObject("circle", "red", "small", 0.2, 0.5), WorldObject("square", "blue", "large", 0.8, 0.5)))
    written = [describe(sample_scene(rng), rng) for _ in range(200)]     # every phrasing of the grammar, roughly
    for caption in ("a red box left of a blue ball", "a pair of violet discs and a square",
                    "there is a little red circle to the left of a blue block", "a picture of a green wedge",
                    *written):
        mentions = world_mentions(caption)
        assert [kind for _, _, kind in mentions] == [" ".join(k for k in m.kind if k) for m in parse(caption).mentions]
        wrong = check(caption, scene)["wrong"]
        struck = {kind for _, _, kind in mentions if kind in wrong}
        assert struck == set(wrong), caption
        assert mark_caption(caption, wrong).count('class="wrong"') == sum(kind in wrong for _, _, kind in mentions)


def test_a_row_below_a_bar_is_marked():
    frequent = 0.3
    good = {"object_f1": 0.8, "shuffled_control": {"object_f1": 0.2}}
    blind = {"object_f1": 0.35, "shuffled_control": {"object_f1": 0.3}}
    assert bar_failures(good, frequent) == []
    (reason,) = bar_failures(blind, frequent)
    assert reason == "object F1 0.350 < 2× its shuffled control 0.300"
    (reason,) = bar_failures({"object_f1": 0.3, "shuffled_control": {"object_f1": 0.1}}, frequent)
    assert reason == "object F1 0.300 ≤ the frequent caption's 0.300"
    assert len(bar_failures({"object_f1": 0.1, "shuffled_control": {"object_f1": 0.2}}, frequent)) == 2


@pytest.fixture()
def world_page(artifacts_root) -> tuple[str, dict]:
    config = _world_config()
    captions = make_world_artifacts(config)
    out = artifacts_root / "report" / "index.html"
    build_report(config, out)
    return out.read_text(encoding="utf-8"), captions


def test_world_report_opens_with_the_gallery_then_the_tables(world_page):
    page, captions = world_page
    order = [page.index(h) for h in ("<h2>The world's images and every method's captions</h2>",
                                     "<h2>Exact metrics in the world</h2>", "<h2>The world shapes: its data and models",
                                     "<h2>Caption metrics</h2>", "<h2>Notes</h2>")]
    assert order == sorted(order)
    items = re.findall(r'<div class="world-item">(.*?)</div>\n</div>', page, re.S)
    assert len(items) == 4                                             # report.gallery_size
    first = items[0]
    assert 'width="128"' in first and "image-rendering: pixelated" in page
    assert "In the image:</b> " in first
    for name in WORLD_METHODS + ("control: most frequent corpus caption",):
        assert f'<td class="who">{html.escape(name)}</td>' in first
    # the methods that describe another image name kinds that are not there: struck through, with what is missing
    assert 'class="wrong"' in page and "missing: " in page
    shown = re.sub(r"<[^>]+>", "", re.search(r'<td class="who">syntic</td><td>(.*?)</td>', first).group(1))
    assert shown.startswith(html.escape(captions["syntic"]["00000.png"], quote=True))
    assert "Against the papers" not in page and "Gallery</h2>" not in page      # the old gallery is replaced


def test_world_table_has_variants_controls_ratios_and_ablation_differences(world_page):
    page, _ = world_page
    rows = _world_table(page)
    syntic, baseline, capdec = (_cells(_row_of(rows, name)) for name in WORLD_METHODS)
    assert syntic[1] == "FO+FP+AF" and baseline[1].startswith("Baseline") and "(vs syntic)" in baseline[1]
    # Method, Variant, Eval set, Obj P, Obj R, Obj F1, Shuffled F1, F1 / shuffled, Binding, Halluc., Count,
    # Relation, Exact, CIDEr, delta F1, delta CIDEr, Bars
    assert syntic[5] == "1.000" and syntic[7].endswith("×") and syntic[13] == "120.0"
    assert syntic[14] == syntic[15] == "\u2013"                            # the full row has no difference
    assert float(baseline[14]) == pytest.approx(float(baseline[5]) - 1.0, abs=1e-3)
    assert baseline[15] == "-20.0"
    assert capdec[14] == "\u2013"                                          # clipcap has no full instance here
    assert any("control: most frequent corpus caption" in r for r in rows)
    controls = [_cells(r) for r in rows if r.startswith('<tr class="control">')]
    assert [c[0] for c in controls] == ["control: most frequent corpus caption", *WORLD_METHODS]
    assert [c[1] for c in controls[1:]] == ["shuffled images"] * len(WORLD_METHODS)


def test_a_row_that_fails_a_bar_is_shaded_and_says_why(world_page):
    page, _ = world_page
    rows = _world_table(page)
    capdec = _row_of(rows, "capdec")
    # it describes other images: below the frequent caption (its shuffled control is as empty as it is)
    assert capdec.startswith('<tr class="fails">') and '<td class="bar-fail"' in capdec
    assert "✗ ≤ frequent caption</td>" in capdec and "object F1 0.000 ≤ the frequent caption&#x27;s" in capdec
    syntic = _row_of(rows, "syntic")
    assert syntic.startswith("<tr>") and '<td class="bar-ok">✓</td>' in syntic


def test_world_section_reports_clip_detector_and_synthetic_pairs(world_page):
    page, _ = world_page
    section = page[page.index("<h2>The world shapes: its data and models"):page.index("<h2>Caption metrics</h2>")]
    assert "<h3>CLIP</h3>" in section and "0.620" in section and "R@5 bar 0.5: met" in section
    assert "<h3>Detector</h3>" in section and "0.904" in section and "F1 bar 0.8: met" in section
    # the styles each model trained on, from its own report: a detector of photos alone meets a domain gap
    assert "20000 web pairs apart from the corpus and the eval set (15000 in the photo style, 5000 in the " \
           "synthetic style), each beside its shape twin in its batch" in section
    assert "trained on 1500 images, all in the photo style" in section and "synthetic style (domain gap)" in section
    assert "the shape of a single object 0.875 and its colour 1.000 (chance 0.143)" in section
    assert "the same caption with the colours swapped 0.568 (chance 0.500)" in section   # the probes, as reported
    assert "<h3>Synthetic pairs</h3>" in section and "853 of 1200" in section and "binding 104" in section
    assert "world run" in page and "never compared with the papers" in page


def test_missing_world_reports_leave_their_parts_out(artifacts_root):
    from pipeline import paths
    config = _world_config()
    make_world_artifacts(config, tags=False)       # no detector tags of the eval images either
    paths.world_metrics("shapes", "clip").unlink()
    (paths.SYNTHETIC_IMAGES / "report.json").unlink()
    build_report(config, artifacts_root / "r.html")
    page = (artifacts_root / "r.html").read_text(encoding="utf-8")
    assert "<h3>Detector</h3>" in page and "<h3>CLIP</h3>" not in page and "<h3>Synthetic pairs</h3>" not in page
    assert page.count('<div class="world-item">') == 4 and '<p class="detail">Detector:' not in page


def _any_paper_row(monkeypatch):
    """Every run row matches a paper row: only the world guard keeps the papers' table out."""
    from pipeline.evaluation import papers
    row = papers.PaperRow(id="x", paper="A paper", source="Table 1", method="syntic", variant="FO+FP+AF",
                          corpus="coco", eval="coco", clip="ViT-B-32", metrics={"CIDEr": 100.0})
    monkeypatch.setattr(papers, "paper_row", lambda *args: row)


def test_a_world_run_shows_no_papers_table(artifacts_root, monkeypatch):
    _any_paper_row(monkeypatch)
    config = _world_config()
    make_world_artifacts(config)
    build_report(config, artifacts_root / "world.html")
    assert "Against the papers" not in (artifacts_root / "world.html").read_text(encoding="utf-8")


def test_world_sections_appear_only_when_worlds_is_set(artifacts_root, monkeypatch):
    _any_paper_row(monkeypatch)
    config = _world_config(worlds=False)
    make_world_artifacts(config)
    build_report(config, artifacts_root / "plain.html")
    page = (artifacts_root / "plain.html").read_text(encoding="utf-8")
    assert '<div class="world-item">' not in page and "Exact metrics in the world" not in page
    assert "<h3>CLIP</h3>" not in page and "world run" not in page
    assert "<h2>Metrics</h2>" in page and "<h2>Gallery</h2>" in page and "Against the papers" in page


def test_write_report_refuses_papers_beside_a_world(tmp_path):
    paper = {"method": "m", "eval_set": "e", "paper": "p", "source": "s", "not_comparable": None, "metrics": []}
    with pytest.raises(ValueError, match="no papers' numbers"):
        write_report(tmp_path / "r.html", "t", [], [], papers=[paper], world={"rows": []})


# --- training seeds ------------------------------------------------------------------------------

def test_seed_groups_gather_the_instances_that_differ_only_in_their_seed():
    from pipeline import config as cfg
    from pipeline.evaluation.report import seed_groups
    from pipeline.profiles import resolve_profile
    seeds = cfg.from_dict(resolve_profile("world-seeds"))
    groups = seed_groups(seeds)
    assert groups["syntic"] == ["syntic", "syntic-seed1", "syntic-seed2"]
    assert groups["syntic-refined"] == ["syntic-refined", "syntic-refined-seed1", "syntic-refined-seed2"]
    assert len(groups) == 10 and all(len(v) == 3 for v in groups.values())
    assert seed_groups(cfg.from_dict(resolve_profile("world"))) == {}    # other settings never group


def test_seed_rows_show_each_metrics_mean_and_range_and_the_best_mean_against_the_bar(tmp_path):
    from dataclasses import dataclass
    from types import SimpleNamespace
    from pipeline.evaluation.report import seed_comparison

    @dataclass
    class Train:
        fo: bool
        seed: int

    instance = lambda seed, fo=True: SimpleNamespace(method="m", train=Train(fo, seed), caption=None)
    config = SimpleNamespace(methods={"a": instance(0), "a1": instance(1), "a2": instance(2), "b": instance(0, False)},
                             evalsets={"shapes": None})
    f1 = {"a": 0.59, "a1": 0.62, "a2": 0.61, "b": 0.9}
    rows = [{"method": n, "eval_set": "shapes", "object_f1": v, "CIDEr": 2 * v} for n, v in f1.items()]
    seeds = seed_comparison(config, rows)
    assert seeds == {"rows": [{"methods": ["a", "a1", "a2"], "seeds": [0, 1, 2], "eval_set": "shapes",
                               "object_f1": [0.59, 0.62, 0.61], "CIDEr": [1.18, 1.24, 1.22]}]}
    write_report(tmp_path / "index.html", "t", rows, [], seeds=seeds)
    page = (tmp_path / "index.html").read_text()
    section = page[page.index("<h2>Training seeds</h2>"):]
    cells = re.findall(r"<td>(.*?)</td>", section)
    assert cells[:7] == ["a, a1, a2", "0, 1, 2", "shapes", "0.607", "0.590–0.620", "121.3", "118.0–124.0"]
    assert "Best mean object F1: a over 3 seeds, 0.607 (bar: at least 0.6, met)" in section
    rows[1]["object_f1"] = None                  # a member without the metric: the metric is left out
    assert "object_f1" not in seed_comparison(config, rows)["rows"][0]
    write_report(tmp_path / "none.html", "t", rows, [])
    assert "Training seeds" not in (tmp_path / "none.html").read_text()
