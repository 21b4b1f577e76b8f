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
