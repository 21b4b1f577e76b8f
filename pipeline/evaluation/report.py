"""A self-contained HTML report: a metrics table in the papers' Table-1 style and a caption gallery.

In a world run (params.yaml ``worlds`` non-empty, pipeline/world) the page opens with the world's eval
images, their ground-truth objects and every method instance's caption with the kinds it names wrongly
struck through; then the exact metrics table (object P/R/F1, binding, hallucination, count, relation,
exact match beside CIDEr, with the shuffled-image and frequent-caption controls and the issue's bars),
the world's own models (CLIP retrieval, detector, synthetic pairs), the caption metrics and the notes.
The papers' table never appears in a world run: the world's numbers are not the papers'.

The page has no external assets: styles are inline and gallery thumbnails are embedded as
base64 JPEG data URIs (a world's small images as the PNGs they are, scaled up by the browser). Every piece of text (method names, captions, reasons, notes) is
HTML-escaped: captions are user data.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from PIL import Image, ImageOps

from pipeline.environment import library_versions
from pipeline import methods, paths
from pipeline.data.shards import ShardedArtifact
from pipeline.evaluation import papers
from pipeline.stage import read_json

# (column, scale, decimals): the COCO metrics are printed ×100 with one decimal as in the papers.
METRIC_COLUMNS = (
    ("BLEU-4", 100.0, 1),
    ("METEOR", 100.0, 1),
    ("ROUGE-L", 100.0, 1),
    ("CIDEr", 100.0, 1),
    ("SPICE", 100.0, 1),
    ("CLIPScore", 1.0, 3),
    ("RefCLIPScore", 1.0, 3),
)
MISSING = "\u2013"  # en dash
THUMBNAIL_PX = 256
THUMBNAIL_JPEG_QUALITY = 85

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table.metrics { border-collapse: collapse; margin-bottom: 0.5em; }
table.metrics th, table.metrics td { padding: 0.3em 0.7em; border-bottom: 1px solid #ddd; }
table.metrics td.score { text-align: right; font-variant-numeric: tabular-nums; }
ol.footnotes, p.scale { font-size: 0.9em; color: #555; }
div.item { display: flex; gap: 1.2em; padding: 1em 0; border-top: 1px solid #ddd; }
div.item img { flex: none; align-self: flex-start; max-width: 256px; }
dl.predictions dt { font-weight: 600; }
dl.predictions dd { margin: 0 0 0.4em 1em; }
ul.references { margin: 0.2em 0; color: #555; }
span.tag { background: #eef; border-radius: 3px; padding: 0 0.4em; margin-right: 0.3em; }
div.world-item { display: flex; gap: 1.2em; padding: 0.8em 0; border-top: 1px solid #ddd; }
div.world-item img { flex: none; align-self: flex-start; width: 128px; height: 128px;
  image-rendering: pixelated; border: 1px solid #ccc; }
div.world-item h3 { margin: 0 0 0.2em 0; font-size: 1em; }
p.truth { margin: 0 0 0.4em 0; }
table.captions { border-collapse: collapse; font-size: 0.95em; }
table.captions td { padding: 0.1em 0.6em 0.1em 0; vertical-align: top; }
table.captions td.who { color: #555; min-width: 9em; max-width: 14em; }
table.captions tr.control td { color: #888; }
span.wrong { color: #c00; text-decoration: line-through; text-decoration-color: #c00;
  text-decoration-thickness: 2px; }
span.missing { color: #c00; font-size: 0.9em; margin-left: 0.6em; }
span.exact { color: #080; margin-left: 0.4em; }
p.legend, p.detail { font-size: 0.9em; color: #555; }
div.wide { overflow-x: auto; }
table.world { font-size: 0.85em; }
table.world th, table.world td { padding: 0.25em 0.45em; }
table.world tr:not(.control) td:first-child { white-space: nowrap; }
table.world td:nth-child(2) { min-width: 7em; }
body.world { max-width: 1320px; }
table.world td.bar-fail, table.world td.bar-ok { white-space: nowrap; }
table.metrics tr.fails td { background: #fde8e8; }
table.metrics td.bar-fail { color: #c00; font-weight: 600; }
table.metrics td.bar-ok { color: #080; }
table.metrics tr.group th { text-align: left; background: #f4f4f4; font-weight: 600; }
table.metrics tr.control td { color: #666; }
"""


def write_report(
    path: str | Path,
    title: str,
    metrics_table: Sequence[Mapping],
    gallery: Sequence[Mapping],
    notes: Iterable[str] = (),
    papers: Sequence[Mapping] = (),
    images: Sequence[tuple[str, bytes]] = (),
    world: Mapping | None = None,
    refined: Mapping | None = None,
    seeds: Mapping | None = None,
) -> None:
    """Write one self-contained HTML page with a metrics table, the papers' numbers, figures, a
    gallery and notes (and, for a world run, the world's gallery, exact metrics and models first).

    ``metrics_table`` rows: ``{"method", "eval_set", ["variant"], metric: value, ...,
    ["skipped": {metric: reason}]}`` with metrics from :data:`METRIC_COLUMNS` on the scale
    :mod:`pipeline.evaluation.metrics` returns them (other keys are ignored). BLEU-4, METEOR, ROUGE-L,
    CIDEr and SPICE are shown ×100 with one decimal, CLIPScore and RefCLIPScore as given with
    three. A missing metric shows "–", with a footnote when the row gives a skip reason.

    ``gallery`` items: ``{"image_id", "image": PNG/JPEG bytes, "predictions": {method: caption},
    "references": [caption, ...], ["tags": [...]]}``; images are embedded as JPEG thumbnails
    of at most 256 px on the long side.

    ``papers`` rows: ``{"method", "eval_set", "paper", "source", "not_comparable": reason or None,
    "metrics": [(metric, this run x100 or None, the paper's, difference or None), ...]}``.
    ``images``: (caption, PNG bytes) figures embedded as they are (e.g. training curves).

    ``world`` (a world run; None otherwise): ``{"gallery": [...], "rows": [...], "controls": [...],
    "models": [...]}``, see :func:`_world_sections`. With it the page opens with the world's gallery
    and exact metrics, and ``papers`` must be empty: the world's numbers are never put beside the papers'.

    ``refined`` (SynC's refined pairs, stage refine): ``{"rows": [{"method", "original", "eval_set", "CIDEr":
    (original, refined), ["object_f1": (original, refined)]}], ["report": the refine stage's report]}``: each
    instance trained on the refined pairs beside the instance trained on the original ones, see
    :func:`_refined_section`.

    ``seeds`` (instances that differ only in ``train.seed``): ``{"rows": [{"methods": [name, ...], "seeds":
    [seed, ...], "eval_set", ["object_f1": [value per seed]], ["CIDEr": [value per seed]]}]}``, see
    :func:`_seeds_section`.
    """
    if world is not None and papers:
        raise ValueError("a world run's report shows no papers' numbers: its numbers are not comparable with them")
    for index, row in enumerate(metrics_table):
        _check_keys(row, ("method", "eval_set"), f"metrics_table[{index}]")
    for index, item in enumerate(gallery):
        _check_keys(item, ("image_id", "image", "predictions", "references"), f"gallery[{index}]")
    page = _page(title, metrics_table, gallery, list(notes), papers, images, world, refined, seeds)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")


def _check_keys(entry: Mapping, required: Sequence[str], where: str) -> None:
    missing = [key for key in required if key not in entry]
    if missing:
        raise ValueError(f"{where} lacks required key(s) {missing}")


def _page(title: str, metrics_table: Sequence[Mapping], gallery: Sequence[Mapping],
          notes: list[str], papers: Sequence[Mapping] = (), images: Sequence[tuple[str, bytes]] = (),
          world: Mapping | None = None, refined: Mapping | None = None, seeds: Mapping | None = None) -> str:
    sections = [f"<h1>{_text(title)}</h1>"]
    if world is not None:
        sections += _world_sections(world)
    if seeds and seeds.get("rows"):
        sections.append(_seeds_section(seeds))
    if refined:
        sections.append(_refined_section(refined))
    sections.append(_metrics_section(metrics_table, "Caption metrics" if world is not None else "Metrics"))
    if notes:
        sections.append(_notes_section(notes))
    if papers:
        sections.append(_papers_section(papers))
    for caption, png in images:
        uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        sections.append(f'<figure><img src="{uri}" alt="{_text(caption)}"><figcaption>{_text(caption)}'
                        f"</figcaption></figure>")
    if gallery:
        sections.append(_gallery_section(gallery))
    body = "\n".join(sections)
    body_class = ' class="world"' if world is not None else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{_text(title)}</title>\n<style>{STYLE}</style>\n</head>\n"
        f"<body{body_class}>\n{body}\n</body>\n</html>\n"
    )


def _text(value: object) -> str:
    """Any value as HTML-escaped text (quotes included, so it is safe in attributes too)."""
    return html.escape(str(value), quote=True)


# --- metrics table ------------------------------------------------------------------------------

def _metrics_section(rows: Sequence[Mapping], heading: str = "Metrics") -> str:
    footnotes: dict[str, int] = {}  # skip reason -> footnote number, in order of appearance
    header = "".join(f"<th>{_text(name)}</th>" for name in ("Method", "Variant", "Eval set"))
    header += "".join(f"<th>{_text(name)}</th>" for name, _, _ in METRIC_COLUMNS)
    body = "\n".join(_metrics_row(row, footnotes) for row in rows)
    parts = [
        f"<h2>{_text(heading)}</h2>",
        f'<table class="metrics">\n<thead><tr>{header}</tr></thead>\n<tbody>\n{body}\n</tbody>\n'
        "</table>",
        '<p class="scale">BLEU-4, METEOR, ROUGE-L, CIDEr and SPICE ×100; CLIPScore and '
        "RefCLIPScore as computed.</p>",
    ]
    if footnotes:
        items = "".join(
            f'<li id="skip-{number}">{_text(reason)}</li>' for reason, number in footnotes.items()
        )
        parts.append(f'<ol class="footnotes">{items}</ol>')
    return "\n".join(parts)


def _metrics_row(row: Mapping, footnotes: dict[str, int]) -> str:
    skipped = row.get("skipped") or {}
    labels = [_text(row["method"]), _text(row.get("variant", "")), _text(row["eval_set"])]
    cells = "".join(f"<td>{label}</td>" for label in labels)
    for name, scale, decimals in METRIC_COLUMNS:
        score = _metric_cell(row.get(name), scale, decimals, skipped.get(name), footnotes)
        cells += f'<td class="score">{score}</td>'
    return f"<tr>{cells}</tr>"


def _metric_cell(value: object, scale: float, decimals: int, skip_reason: str | None,
                 footnotes: dict[str, int]) -> str:
    """A formatted score, or "–" with a link to its skip reason's footnote."""
    if isinstance(value, numbers.Real) and math.isfinite(value):
        return f"{value * scale:.{decimals}f}"
    if not skip_reason:
        return MISSING
    number = footnotes.setdefault(str(skip_reason), len(footnotes) + 1)
    return f'{MISSING}<sup><a href="#skip-{number}" title="{_text(skip_reason)}">{number}</a></sup>'


# --- the papers' numbers --------------------------------------------------------------------------

def _papers_section(rows: Sequence[Mapping]) -> str:
    """One row per (method, eval set) that a paper reports: this run, the paper, the difference."""
    body = []
    for row in rows:
        status = f"not comparable: {row['not_comparable']}" if row.get("not_comparable") else "comparable"
        inner = "".join(f'<tr><td>{_text(metric)}</td><td class="score">{_fmt(here)}</td>'
                        f'<td class="score">{paper:.1f}</td><td class="score">{_fmt(diff, signed=True)}</td></tr>'
                        for metric, here, paper, diff in row["metrics"])
        body.append(f"<tr><td>{_text(row['method'])}</td><td>{_text(row['eval_set'])}</td>"
                    f"<td>{_text(row['paper'])}, {_text(row['source'])}</td><td>{_text(status)}</td>"
                    f'<td><table class="metrics"><tr><th>metric</th><th>this run</th><th>paper</th>'
                    f"<th>difference</th></tr>{inner}</table></td></tr>")
    return ('<h2>Against the papers</h2>\n<table class="metrics"><thead><tr><th>Method</th><th>Eval set</th>'
            "<th>Paper</th><th>Comparable</th><th>Metrics (x100)</th></tr></thead><tbody>\n"
            + "\n".join(body) + "\n</tbody></table>")


def _fmt(value: float | None, signed: bool = False) -> str:
    if value is None:
        return MISSING
    return f"{value:+.1f}" if signed else f"{value:.1f}"


# --- gallery ------------------------------------------------------------------------------------

def _gallery_section(items: Sequence[Mapping]) -> str:
    return "<h2>Gallery</h2>\n" + "\n".join(_gallery_item(item) for item in items)


def _gallery_item(item: Mapping) -> str:
    image_id = _text(item["image_id"])
    try:
        image_uri = thumbnail_data_uri(item["image"])
    except (OSError, ValueError) as error:
        message = f"gallery image {item['image_id']!r} could not be read: {error}"
        raise ValueError(message) from error
    predictions = "".join(
        f"<dt>{_text(method)}</dt><dd>{_text(caption)}</dd>"
        for method, caption in item["predictions"].items()
    )
    references = "".join(f"<li>{_text(caption)}</li>" for caption in item["references"])
    tags = "".join(f'<span class="tag">{_text(tag)}</span>' for tag in item.get("tags", ()))
    tag_line = f"<p>{tags}</p>\n" if tags else ""
    return (
        f'<div class="item">\n<img src="{image_uri}" alt="{image_id}">\n'
        f"<div>\n<h3>{image_id}</h3>\n{tag_line}"
        f'<dl class="predictions">{predictions}</dl>\n'
        f'<p>References:</p>\n<ul class="references">{references}</ul>\n</div>\n</div>'
    )


def thumbnail_data_uri(image_bytes: bytes, max_px: int = THUMBNAIL_PX) -> str:
    """A ``data:image/jpeg;base64,...`` thumbnail at most ``max_px`` on its long side."""
    with Image.open(io.BytesIO(image_bytes)) as image:
        thumbnail = _flatten_to_rgb(ImageOps.exif_transpose(image))
    thumbnail.thumbnail((max_px, max_px))
    buffer = io.BytesIO()
    thumbnail.save(buffer, format="JPEG", quality=THUMBNAIL_JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _flatten_to_rgb(image: Image.Image) -> Image.Image:
    """RGB for JPEG, with any transparency composited onto white."""
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, "white")
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


LIBRARIES_THAT_SHAPE_RESULTS = ("torch", "open_clip_torch", "diffusers", "transformers", "faiss", "pycocoevalcap")


# --- training curves -----------------------------------------------------------------------------

def plot_loss_curve(rows: Sequence[Mapping]) -> bytes:
    """PNG of a training curve (runner.loss_curve rows {step, loss[, phase]}): loss against step, one line
    per phase (matplotlib, Agg backend)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.0, 3.0), constrained_layout=True)
    phases = list(dict.fromkeys(r.get("phase") for r in rows))
    for phase in phases:
        part = [r for r in rows if r.get("phase") == phase]
        ax.plot([r["step"] for r in part], [r["loss"] for r in part], label=phase)
    if len(phases) > 1:
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


# --- a world run: gallery, exact metrics, the world's models -----------------------------------------

# (key, column, what it is): the checker's metrics (pipeline/world/checker.py), fractions as computed
EXACT_COLUMNS = (
    ("object_precision", "Obj P", "object precision: kinds (colour + shape) named that are in the image"),
    ("object_recall", "Obj R", "object recall: kinds in the image that are named"),
    ("object_f1", "Obj F1", "object F1"),
    ("binding_accuracy", "Binding", "colour-shape binding accuracy"),
    ("hallucination_rate", "Halluc.", "hallucination rate: mentions whose shape is in no object of the image "
                                      "(lower is better)"),
    ("count_accuracy", "Count", "count accuracy of the kinds in the image"),
    ("relation_accuracy", "Relation", "relation accuracy (left of, above, ...)"),
    ("exact_match", "Exact", "exact match: everything named is there, counted right, nothing missing"),
)
SHUFFLED_FACTOR = 2.0     # the bar: object F1 at least twice its shuffled-image control
CLIP_R5_BAR = 0.5         # the world CLIP's zero-shot image->text R@5 on held-out pairs
DETECTOR_F1_BAR = 0.8     # the detector's held-out label F1 (photo style)
BEST_F1_BAR = 0.6         # the best method's object F1


def _world_sections(world: Mapping) -> list[str]:
    """The world's part of the page, in order: the gallery, the exact metrics table, the world's models.

    ``world["gallery"]`` items: ``{"image_id", "image": PNG bytes, "objects": ["2 red circles", ...],
    "captions": [{"method", "caption", "wrong": [kind, ...], "missing": [kind, ...], ["exact": bool],
    ["control": bool]}], ["references": [...]], ["tags": [...]]}``; a kind is what the checker names it
    ("red circle", or "circle" for a shape named without a colour).
    ``world["rows"]``: a method instance each, ``{"method", "variant", "eval_set", exact metrics ...,
    "CIDEr", "shuffled_control": {exact metrics}, ["full": the method instance of the full method]}``.
    ``world["controls"]``: ``{"method", "eval_set", exact metrics ..., "CIDEr", ["frequent": True]}``,
    the frequent-caption row marked ``frequent``.
    ``world["models"]``: one per world, ``{"name", ["data"], ["clip"], ["detector"], ["pairs"]}`` (the world
    stages' reports and the synthetic pairs' audit; a missing one is left out).
    """
    sections = []
    if world.get("gallery"):
        sections.append(_world_gallery_section(world["gallery"]))
    if world.get("rows") or world.get("controls"):
        sections.append(_world_table_section(world.get("rows", ()), world.get("controls", ())))
    models = [_world_models_section(m) for m in world.get("models", ())]
    sections += [m for m in models if m]
    return sections


def world_mentions(caption: str) -> list[tuple[int, int, str]]:
    """(start, end, kind) of every object mention in ``caption`` as the world's grammar reads it
    (``pipeline.world.grammar.parse``): the shape word with the colour, size and count words right before
    it; ``kind`` is the checker's name of it ("red circle", or "circle" without a colour)."""
    from pipeline.world.grammar import _COLOUR_OF, _COUNT_OF, _SHAPE_OF, _SIZE_OF, _WORD

    out = []
    colour, start, previous_end = None, None, 0   # the colour parse gives the next mention; where its words begin
    text = caption.lower()
    for match in _WORD.finditer(text):
        word = match.group()
        if text[previous_end:match.start()].strip():
            start = None          # the phrase is the words right before the shape word, apart by spaces only
        previous_end = match.end()
        if word in _SHAPE_OF:
            shape = _SHAPE_OF[word][0]
            out.append((match.start() if start is None else start, match.end(),
                        " ".join(k for k in (colour, shape) if k)))
            colour = start = None
        elif word in _COLOUR_OF or word in _SIZE_OF or word in _COUNT_OF:
            colour = _COLOUR_OF.get(word, colour)
            start = match.start() if start is None else start
        else:
            start = None          # only the words right before the shape word belong to its phrase
    return out


def mark_caption(caption: str, wrong: Iterable[str]) -> str:
    """``caption`` as HTML with the words of every mention of a ``wrong`` kind struck through in red."""
    wrong = set(wrong)
    parts, at = [], 0
    for start, end, kind in world_mentions(caption):
        if kind in wrong:
            parts.append(_text(caption[at:start]))
            parts.append(f'<span class="wrong" title="not in the image: {_text(kind)}">{_text(caption[start:end])}'
                         "</span>")
            at = end
    parts.append(_text(caption[at:]))
    return "".join(parts)


def _world_gallery_section(items: Sequence[Mapping]) -> str:
    legend = ('<p class="legend">Each eval image (64 px, shown at 128 px) with the objects it holds, and every '
              'method instance\'s caption: <span class="wrong">struck-through words</span> name a kind (colour + '
              'shape) that is not in the image, <span class="missing" style="margin:0">missing:</span> lists the '
              'kinds in the image the caption leaves out, <span class="exact" style="margin:0">✓</span> marks an '
              'exact caption (pipeline/world/checker.py).</p>')
    return "<h2>The world's images and every method's captions</h2>\n" + legend + "\n" + "\n".join(
        _world_gallery_item(item) for item in items)


def _world_gallery_item(item: Mapping) -> str:
    image_id = _text(item["image_id"])
    uri = "data:image/png;base64," + base64.b64encode(_as_png(item["image"], item["image_id"])).decode("ascii")
    rows = []
    for entry in item["captions"]:
        missing = entry.get("missing") or ()
        after = (f'<span class="missing">missing: {_text(", ".join(missing))}</span>' if missing else "")
        after += '<span class="exact" title="exact: the checker finds nothing wrong">✓</span>' if entry.get("exact") else ""
        css = ' class="control"' if entry.get("control") else ""
        rows.append(f'<tr{css}><td class="who">{_text(entry["method"])}</td>'
                    f'<td>{mark_caption(entry["caption"], entry.get("wrong") or ())}{after}</td></tr>')
    objects = ", ".join(item.get("objects") or ())
    tags = "".join(f'<span class="tag">{_text(tag)}</span>' for tag in item.get("tags") or ())
    tag_line = f'<p class="detail">Detector: {tags or "nothing"}</p>\n' if item.get("tags") is not None else ""
    references = item.get("references") or ()
    reference_line = (f'<p class="detail">References: {_text(" | ".join(references))}</p>\n' if references else "")
    return (f'<div class="world-item">\n<img src="{uri}" alt="{image_id}" width="128" height="128">\n<div>\n'
            f"<h3>{image_id}</h3>\n<p class=\"truth\"><b>In the image:</b> {_text(objects)}</p>\n"
            f'<table class="captions">{"".join(rows)}</table>\n{tag_line}{reference_line}</div>\n</div>')


def _as_png(image: bytes, image_id: object) -> bytes:
    """The image as PNG bytes (a world image already is one; anything else is converted)."""
    try:
        with Image.open(io.BytesIO(image)) as decoded:
            if decoded.format == "PNG":
                return bytes(image)
            buffer = io.BytesIO()
            _flatten_to_rgb(decoded).save(buffer, format="PNG")
            return buffer.getvalue()
    except (OSError, ValueError) as error:
        raise ValueError(f"gallery image {image_id!r} could not be read: {error}") from error


def scene_objects(scene) -> list[str]:
    """A scene's objects by kind, as "2 red circles", "1 blue square" (its most numerous kinds first)."""
    from pipeline.world.grammar import PLURAL

    kinds = scene.kinds()
    return [f"{n} {colour} {PLURAL[shape] if n > 1 else shape}"
            for (colour, shape), n in sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0]))]


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, numbers.Real) and math.isfinite(value) else None


def bar_failures(row: Mapping, frequent_f1: float | None) -> list[str]:
    """Which of the issue's bars a method instance's row misses: object F1 at least twice its
    shuffled-image control, and above the frequent-caption row."""
    f1 = _number(row.get("object_f1"))
    shuffled = _number((row.get("shuffled_control") or {}).get("object_f1"))
    failures = []
    if f1 is None:
        return ["no object F1"]
    if shuffled is not None and f1 < SHUFFLED_FACTOR * shuffled:
        failures.append(f"object F1 {f1:.3f} < {SHUFFLED_FACTOR:g}× its shuffled control {shuffled:.3f}")
    if frequent_f1 is not None and f1 <= frequent_f1:
        failures.append(f"object F1 {f1:.3f} ≤ the frequent caption's {frequent_f1:.3f}")
    return failures


def _short_reason(failure: str) -> str:
    """A bar failure in a few words for the table cell (the whole reason is its tooltip and the summary)."""
    if "shuffled" in failure:
        return f"< {SHUFFLED_FACTOR:g}× shuffled"
    if "frequent" in failure:
        return "≤ frequent caption"
    return failure


def _fraction(value: object) -> str:
    number = _number(value)
    return MISSING if number is None else f"{number:.3f}"


def _signed(value: float | None, scale: float = 1.0, decimals: int = 3) -> str:
    return MISSING if value is None else f"{value * scale:+.{decimals}f}"


def _ratio_cell(f1: float | None, shuffled: float | None) -> str:
    if f1 is None or shuffled is None:
        return MISSING
    if shuffled == 0:
        return "∞" if f1 > 0 else MISSING
    return f"{f1 / shuffled:.1f}×"


def _world_table_section(rows: Sequence[Mapping], controls: Sequence[Mapping]) -> str:
    frequent = {c["eval_set"]: _number(c.get("object_f1")) for c in controls if c.get("frequent")}
    by_name = {(r["eval_set"], r["method"]): r for r in rows}
    names = [label for _, label, _ in EXACT_COLUMNS]
    header = ("<th>Method</th><th>Variant</th><th>Eval set</th>"
              + "".join(f'<th title="{_text(title)}">{_text(label)}</th>' for _, label, title in EXACT_COLUMNS[:3])
              + '<th title="object F1 of the same captions given to other images (a fixed derangement)">'
                "Shuffled F1</th><th title=\"object F1 / its shuffled control\">F1 ÷ shuffled</th>"
              + "".join(f'<th title="{_text(title)}">{_text(label)}</th>' for _, label, title in EXACT_COLUMNS[3:])
              + "<th>CIDEr</th><th title=\"ablation row minus the full method's row\">Δ Obj F1 vs full</th>"
                "<th title=\"ablation row minus the full method's row, x100\">Δ CIDEr vs full</th><th>Bars</th>")
    width = 3 + len(names) + 2 + 4
    body = []
    for row in rows:
        f1, shuffled = _number(row.get("object_f1")), _number((row.get("shuffled_control") or {}).get("object_f1"))
        full = by_name.get((row["eval_set"], row.get("full"))) if row.get("full") not in (None, row["method"]) else None
        delta_f1 = delta_cider = None
        if full is not None:
            if f1 is not None and _number(full.get("object_f1")) is not None:
                delta_f1 = f1 - _number(full["object_f1"])
            if _number(row.get("CIDEr")) is not None and _number(full.get("CIDEr")) is not None:
                delta_cider = _number(row["CIDEr"]) - _number(full["CIDEr"])
        failures = bar_failures(row, frequent.get(row["eval_set"]))
        bar = (f'<td class="bar-fail" title="{_text("; ".join(failures))}">✗ '
               f'{"<br>".join(_text(_short_reason(f)) for f in failures)}</td>' if failures else '<td class="bar-ok">✓</td>')
        variant = _text(row.get("variant", "")) + (f" <small>(vs {_text(full['method'])})</small>" if full else "")
        cells = [_text(row["method"]), variant, _text(row["eval_set"])]
        scores = [_fraction(row.get(key)) for key, _, _ in EXACT_COLUMNS[:3]]
        scores += [_fraction(shuffled), _ratio_cell(f1, shuffled)]
        scores += [_fraction(row.get(key)) for key, _, _ in EXACT_COLUMNS[3:]]
        scores += [_cider(row.get("CIDEr")), _signed(delta_f1), _signed(delta_cider, 100.0, 1)]
        css = ' class="fails"' if failures else ""
        body.append(f"<tr{css}>" + "".join(f"<td>{c}</td>" for c in cells)
                    + "".join(f'<td class="score">{c}</td>' for c in scores) + bar + "</tr>")
    control_rows = []
    for control in controls:
        control_rows.append(_control_row(control["method"], control.get("variant", "control"), control["eval_set"],
                                         control, control.get("CIDEr")))
    for row in rows:
        if row.get("shuffled_control"):
            control_rows.append(_control_row(row["method"], "shuffled images", row["eval_set"],
                                             row["shuffled_control"], None))
    if control_rows:
        body.append(f'<tr class="group"><th colspan="{width}">Controls: the most frequent corpus caption for every '
                    "image, and each instance's captions given to other images (shuffled)</th></tr>")
        body += control_rows
    best = max((f for f in (_number(r.get("object_f1")) for r in rows) if f is not None), default=None)
    failing = [r["method"] for r in rows if bar_failures(r, frequent.get(r["eval_set"]))]
    summary = (f"Bars (issue 18): every instance's object F1 at least {SHUFFLED_FACTOR:g}× its shuffled control and "
               f"above the frequent-caption row; rows that miss one are shaded red and say why"
               + (f" ({len(failing)} of {len(rows)}: {', '.join(failing)})" if failing else
                  f" (all {len(rows)} pass)" if rows else "")
               + (f". Best object F1: {best:.3f} (bar: at least {BEST_F1_BAR:g}, "
                  f"{'met' if best >= BEST_F1_BAR else 'missed'})." if best is not None else "."))
    return ("<h2>Exact metrics in the world</h2>\n"
            '<p class="legend">Every caption is read back with the world\'s grammar and compared with its image\'s '
            "scene (pipeline/world/checker.py), micro-averaged over the eval set; fractions, 1 is best except "
            "Halluc. CIDEr ×100. Ablation rows show their difference to the full method's row.</p>\n"
            f'<div class="wide"><table class="metrics world">\n<thead><tr>{header}</tr></thead>\n<tbody>\n'
            + "\n".join(body) + f'\n</tbody>\n</table></div>\n<p class="scale">{_text(summary)}</p>')


def _cider(value: object) -> str:
    number = _number(value)
    return MISSING if number is None else f"{100 * number:.1f}"


def _control_row(name: str, variant: str, eval_set: str, metrics: Mapping, cider: object) -> str:
    scores = [_fraction(metrics.get(key)) for key, _, _ in EXACT_COLUMNS[:3]] + [MISSING, MISSING]
    scores += [_fraction(metrics.get(key)) for key, _, _ in EXACT_COLUMNS[3:]]
    scores += [_cider(cider), MISSING, MISSING]
    return ('<tr class="control">' + "".join(f"<td>{_text(c)}</td>" for c in (name, variant, eval_set))
            + "".join(f'<td class="score">{c}</td>' for c in scores) + "<td></td></tr>")


def _recall(report: Mapping, direction: str, k: int) -> float | None:
    """R@k of ``direction`` ("i2t" or "t2i") in a world CLIP report: ``i2t_r5`` (pipeline/world/
    clip_training.py), or a nested ``{"image_to_text": {"R@5": ...}}``."""
    flat = _number(report.get(f"{direction}_r{k}"))
    if flat is not None:
        return flat
    nested = report.get({"i2t": "image_to_text", "t2i": "text_to_image"}[direction])
    if isinstance(nested, Mapping):
        for key in (f"R@{k}", f"r{k}", f"R{k}", str(k)):
            if _number(nested.get(key)) is not None:
                return _number(nested[key])
    return None


def _style_note(synthetic, total) -> str:
    """The styles a world model trained on, from its own report: " (N in the photo style, M in the synthetic style)"."""
    if _number(synthetic) is None or _number(total) is None:
        return ""
    if not synthetic:
        return ", all in the photo style"
    return f" ({_text(total - synthetic)} in the photo style, {_text(synthetic)} in the synthetic style)"


def _bar_note(value: float | None, bar: float, what: str) -> str:
    if value is None:
        return ""
    ok = value >= bar
    return (f' <span class="{"exact" if ok else "missing"}" style="margin:0">({what} bar {bar:g}: '
            f'{"met" if ok else "missed"})</span>')


def _probe_note(clip: Mapping) -> str:
    """The world CLIP's zero-shot probes (pipeline/world/clip_training.py), where its report has them: shape and
    colour of single objects, and colour-shape binding, the limit the methods' binding errors come from."""
    single, binding = clip.get("zero_shot_single_object"), clip.get("zero_shot_binding")
    if not isinstance(single, Mapping) and not isinstance(binding, Mapping):
        return ""
    text = "Zero-shot probes on photo-style images:"
    if isinstance(single, Mapping):
        text += (f" the shape of a single object {_fraction(single.get('shape_accuracy'))} and its colour "
                 f"{_fraction(single.get('colour_accuracy'))} (chance {_fraction(single.get('chance'))})")
    if isinstance(binding, Mapping):
        text += ((";" if isinstance(single, Mapping) else "") +
                 f" an image of two or more colours closer to its caption than to the same caption with the colours "
                 f"swapped {_fraction(binding.get('binding_accuracy'))} (chance {_fraction(binding.get('chance'))}). "
                 "A CLIP that sees colours and shapes but barely which goes with which (as real CLIP, a bag of words "
                 "in this respect: Yuksekgonul et al., ICLR 2023) caps every captioner's colour-shape binding (the "
                 "Binding column of the exact metrics)")
    return f'<p class="legend">{_text(text)}.</p>'


def _world_models_section(world: Mapping) -> str:
    """The world's own models and data: what the methods are built on (each part only if its report exists)."""
    name = world.get("name", "")
    parts = []
    data = world.get("data")
    if data:
        corpus, evalset = data.get("corpus") or {}, data.get("eval") or {}
        frequent = data.get("frequent_caption") or {}
        parts.append(f"<h3>Data</h3>\n<p>The world's caption corpus describes {_text(corpus.get('scenes', MISSING))} "
                     f"scenes of which no image exists ({_text(corpus.get('captions', MISSING))} captions); the eval set "
                     f"holds {_text(evalset.get('images', MISSING))} photo-style images with "
                     f"{_text(evalset.get('references', MISSING))} reference captions and each image's scene as ground "
                     "truth."
                     + (f" The most frequent corpus caption, the control row's, is “{_text(frequent['caption'])}” "
                        f"({_text(frequent.get('count', MISSING))} times)." if frequent.get("caption") else "")
                     + "</p>")
    clip = world.get("clip")
    if clip:
        ks = (1, 5, 10)
        header = "".join(f"<th>R@{k}</th>" for k in ks)
        lines = "".join(f"<tr><td>{label}</td>" + "".join(f'<td class="score">{_fraction(_recall(clip, d, k))}</td>'
                                                          for k in ks) + "</tr>"
                        for d, label in (("i2t", "image → text"), ("t2i", "text → image")))
        r5 = _recall(clip, "i2t", 5)
        parts.append(f"<h3>CLIP</h3>\n<p>The world's CLIP ({_text(clip.get('model', ''))}), trained contrastively on "
                     f"{_text(clip.get('pairs', MISSING))} web pairs apart from the corpus and the eval set"
                     + _style_note(clip.get("synthetic_pairs"), clip.get("pairs"))
                     + (", each beside its shape twin in its batch" if clip.get("shape_twins") else "") + ": "
                     f"its zero-shot retrieval among {_text(clip.get('heldout', MISSING))} held-out pairs (the share of "
                     "queries whose match ranks in the top k)" + _bar_note(r5, CLIP_R5_BAR, "image → text R@5") + ".</p>\n"
                     f'<table class="metrics"><thead><tr><th></th>{header}</tr></thead><tbody>{lines}</tbody></table>'
                     + _probe_note(clip))
    detector = world.get("detector")
    if detector:
        styles = [(label, detector.get(key)) for key, label in (("heldout_photo", "photo style (held out)"),
                                                                ("heldout_synthetic", "synthetic style"
                                                                 + ("" if detector.get("synthetic_images") else
                                                                    " (domain gap)")))
                  if isinstance(detector.get(key), Mapping)]
        if not styles and _number(detector.get("f1")) is not None:
            styles = [("held out", detector)]
        lines = "".join(f"<tr><td>{_text(label)}</td>" + "".join(f'<td class="score">{_fraction(m.get(k))}</td>'
                                                                  for k in ("precision", "recall", "f1")) + "</tr>"
                        for label, m in styles)
        photo_f1 = _number(styles[0][1].get("f1")) if styles else None
        parts.append("<h3>Detector</h3>\n<p>The world's shape detector, trained on "
                     f"{_text(detector.get('images', MISSING))} images"
                     + _style_note(detector.get("synthetic_images", 0), detector.get("images"))
                     + ": the precision, "
                     "recall and F1 of the shape labels it finds per held-out image against the shapes in the scene"
                     + (f" ({_text(detector.get('heldout'))} images, score threshold {_text(detector.get('threshold'))})"
                        if detector.get("heldout") is not None else "")
                     + _bar_note(photo_f1, DETECTOR_F1_BAR, "photo label F1") + ".</p>\n"
                     '<table class="metrics"><thead><tr><th></th><th>Precision</th><th>Recall</th><th>F1</th></tr>'
                     f"</thead><tbody>{lines}</tbody></table>")
    pairs = world.get("pairs")
    if pairs:
        mistakes = pairs.get("mistakes_made") or {}
        fraction = _number(pairs.get("exact_match_fraction"))
        metrics = pairs.get("metrics") or {}
        parts.append("<h3>Synthetic pairs</h3>\n<p>The text-to-image model draws every corpus caption and makes "
                     "Stable Diffusion's known mistakes on purpose; the checker reads each caption against what was "
                     f"drawn: {_text(pairs.get('exact_matches', MISSING))} of {_text(pairs.get('pairs', MISSING))} "
                     f"synthetic images ({_fraction(fraction)}) show exactly what their caption says"
                     + (f" (object F1 {_fraction(metrics.get('object_f1'))}, binding "
                        f"{_fraction(metrics.get('binding_accuracy'))})" if metrics else "")
                     + ". Mistakes made: "
                     + (", ".join(f"{_text(kind)} {_text(n)}" for kind, n in mistakes.items()) or "none") + ".</p>")
    if not parts:
        return ""
    return (f"<h2>The world{' ' + _text(name) if name else ''}: its data and models</h2>\n" + "\n".join(parts))


# --- SynC's refined pairs -------------------------------------------------------------------------

def _refined_section(refined: Mapping) -> str:
    """Each instance trained on SynC's refined pairs beside its original, with the differences in CIDEr and object
    F1, and the refine stage's figures: pairs kept, and (the world) the share of pairs whose image shows its caption
    before and after refinement, by the checker."""
    parts = ["<h2>Refined synthetic pairs (SynC)</h2>"]
    report = refined.get("report") or {}
    if report:
        text = (f"<p>Stage refine re-paired each caption with the best of its top-{_text(report.get('k', MISSING))} "
                f"synthetic images by the cycle score (top-{_text(report.get('kr', MISSING))} captions back, "
                f"text-text similarity: {_text(report.get('text_similarity', MISSING))}) and kept the top "
                f"{_text(report.get('tau', MISSING))} of the pairs: {_text(report.get('kept', MISSING))} of "
                f"{_text(report.get('captions', MISSING))} kept, "
                f"{_text(report.get('re-paired_to_another_image', MISSING))} re-paired to another image, "
                f"{_text(report.get('images_used', MISSING))} distinct images in the kept pairs.")
        audit = report.get("pair_audit") or {}
        if audit:
            def share(key):
                a = audit.get(key) or {}
                return (f"{_fraction(a.get('exact_match_fraction'))} ({_text(a.get('exact_matches', MISSING))} of "
                        f"{_text(a.get('pairs', MISSING))})")
            text += (" Pairs whose image shows exactly what its caption says (the checker): "
                     f"original {share('original')}; re-paired, before the filter {share('re-paired')}; "
                     f"refined (kept) {share('refined')}.")
        parts.append(text + "</p>")
    rows = refined.get("rows") or ()
    if rows:
        has_f1 = any("object_f1" in r for r in rows)
        head = ("<tr><th>Refined instance</th><th>Beside</th><th>Eval set</th><th>CIDEr original</th>"
                "<th>CIDEr refined</th><th>Δ CIDEr</th>"
                + ("<th>Object F1 original</th><th>Object F1 refined</th><th>Δ object F1</th>" if has_f1 else "")
                + "</tr>")
        body = []
        for r in rows:
            cells = [_text(r["method"]), _text(r["original"] or "– (no instance with pairs: original)"),
                     _text(r["eval_set"])]
            before, after = r.get("CIDEr") or (None, None)
            diff = None if _number(before) is None or _number(after) is None else _number(after) - _number(before)
            cells += [_cider(before), _cider(after), _signed(diff, 100, 1)]
            if has_f1:
                before, after = r.get("object_f1") or (None, None)
                diff = None if _number(before) is None or _number(after) is None else _number(after) - _number(before)
                cells += [_fraction(before), _fraction(after), _signed(diff)]
            body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        parts.append(f'<table class="metrics"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>')
    return "\n".join(parts)


def original_instance(config, name: str) -> str | None:
    """The instance a refined one (train.pairs: refined) is compared with: the same method and settings on the
    original pairs; None if the profile has none."""
    from pipeline import config as cfg
    instance = config.methods[name]
    want = {**cfg.as_dict(instance.train), "pairs": "original"}
    for other, o in config.methods.items():
        if o.method == instance.method and cfg.as_dict(o.train) == want and o.caption == instance.caption:
            return other
    return None


def refined_comparison(config, rows: Sequence[Mapping]) -> dict | None:
    """``write_report``'s ``refined``: every refined instance beside its original, and the refine stage's report."""
    by = {(r["method"], r["eval_set"]): r for r in rows}
    refined = [n for n, i in config.methods.items() if getattr(i.train, "pairs", "original") == "refined"]
    if not refined:
        return None
    out = []
    for name in refined:
        original = original_instance(config, name)
        for evalset in config.evalsets:
            here, there = by.get((name, evalset), {}), by.get((original, evalset), {})
            row = {"method": name, "original": original, "eval_set": evalset,
                   "CIDEr": (there.get("CIDEr"), here.get("CIDEr"))}
            if "object_f1" in here:
                row["object_f1"] = (there.get("object_f1"), here.get("object_f1"))
            out.append(row)
    return {"rows": out, "report": _optional_json(paths.REFINE_REPORT)}


# --- training seeds -------------------------------------------------------------------------------

def _seeds_section(seeds: Mapping) -> str:
    """One row per group of instances that differ only in their training seed: each metric's mean and range
    over the seeds, so that a difference between two methods can be read against the spread of one."""
    rows = seeds["rows"]
    has_f1 = any(r.get("object_f1") for r in rows)
    head = ("<tr><th>Instances</th><th>Seeds</th><th>Eval set</th>"
            + ("<th>Object F1 mean</th><th>Object F1 min–max</th>" if has_f1 else "")
            + "<th>CIDEr mean</th><th>CIDEr min–max</th></tr>")
    body, best = [], None
    for r in rows:
        cells = [_text(", ".join(r["methods"])), _text(", ".join(str(s) for s in r["seeds"])), _text(r["eval_set"])]
        for metric, show in [("object_f1", _fraction)] * has_f1 + [("CIDEr", _cider)]:
            values = r.get(metric) or []
            if values:
                mean = sum(values) / len(values)
                cells += [show(mean), f"{show(min(values))}–{show(max(values))}"]
                if metric == "object_f1" and (best is None or mean > best[1]):
                    best = (r["methods"][0], mean, len(values))
            else:
                cells += [MISSING, MISSING]
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    summary = "" if best is None else (
        f'<p class="scale">Best mean object F1: {_text(best[0])} over {best[2]} seeds, {best[1]:.3f} '
        f"(bar: at least {BEST_F1_BAR:g}, {'met' if best[1] >= BEST_F1_BAR else 'missed'}).</p>")
    return ("<h2>Training seeds</h2>\n<p class=\"legend\">Instances whose settings differ only in "
            "<code>train.seed</code> (e.g. profiles/world-seeds.yaml), with each metric's mean and range over "
            "the seeds: one seed's row is one draw.</p>\n"
            f'<table class="metrics"><thead>{head}</thead><tbody>{"".join(body)}</tbody></table>\n{summary}')


def seed_groups(config) -> dict[str, list[str]]:
    """Instances whose method, settings and caption settings are the same but for ``train.seed``, by the first
    of each group in params order; only groups of two or more."""
    from pipeline import config as cfg
    first_of: dict[str, str] = {}
    groups: dict[str, list[str]] = {}
    for name, instance in config.methods.items():
        train = cfg.as_dict(instance.train)
        if not isinstance(train, dict) or "seed" not in train:
            continue
        train.pop("seed")
        key = json.dumps([instance.method, train, cfg.as_dict(instance.caption)], sort_keys=True, default=str)
        groups.setdefault(first_of.setdefault(key, name), []).append(name)
    return {first: names for first, names in groups.items() if len(names) > 1}


def seed_comparison(config, rows: Sequence[Mapping]) -> dict | None:
    """``write_report``'s ``seeds``: each group of :func:`seed_groups` on each eval set, its members' object F1 and
    CIDEr (a metric left out when a member lacks it)."""
    groups = seed_groups(config)
    if not groups:
        return None
    by = {(r["method"], r["eval_set"]): r for r in rows}
    out = []
    for names in groups.values():
        for evalset in config.evalsets:
            row = {"methods": names, "seeds": [config.methods[n].train.seed for n in names], "eval_set": evalset}
            for metric in ("object_f1", "CIDEr"):
                values = [_number(by.get((n, evalset), {}).get(metric)) for n in names]
                if all(v is not None for v in values):
                    row[metric] = values
            out.append(row)
    return {"rows": out}


# --- notes --------------------------------------------------------------------------------------

def _notes_section(notes: list[str]) -> str:
    items = "".join(f"<li>{_text(note)}</li>" for note in notes)
    return f"<h2>Notes</h2>\n<ul>{items}</ul>"


# --- the pipeline's report ------------------------------------------------------------------------

def build_report(config, out: Path) -> tuple[int, int]:
    """Read every method instance's (and external result's) metrics, captions and the eval sets, put
    the papers' numbers beside them, write the report page. Returns (result rows, gallery images).

    A world run (``config.worlds`` non-empty) opens with the world's gallery and exact metrics, shows
    the world's models, and puts no paper's numbers beside its own."""
    rows, papers_rows, figures = [], [], []
    world_run = bool(config.worlds)
    world_rows, world_controls = [], []
    notes = []
    if config.models.clip.pretrained is None:
        notes.append("What these numbers mean: this profile's models are small and randomly initialised "
                     "(no pretrained weights can be downloaded here), so no caption follows its image. The "
                     "numbers test the plumbing, not caption quality; a paper profile on real weights "
                     "reproduces the papers.")
    if world_run:
        notes.append(f"What these numbers mean: this is a world run ({', '.join(config.worlds)}; pipeline/world), a "
                     "small world whose every caption can be checked exactly. Its numbers are for finding bugs and "
                     "comparing the methods on common ground; they are never compared with the papers' numbers, so "
                     "this report has no papers' table.")
    notes += [f"Profile: {config.profile}. CLIP: {config.models.clip.name} (pretrained: "
              f"{config.models.clip.pretrained}); detector: {config.models.detector.name}; text-to-image: "
              f"{config.models.diffusion.name}.",
              "BLEU, METEOR, ROUGE-L, CIDEr (CIDEr-D) and SPICE are pycocoevalcap's, x100. CLIPScore and "
              "RefCLIPScore (Hessel et al. 2021, w = 2.5) use the pipeline's CLIP model, so they compare methods "
              "within one profile only."]
    software = library_versions()
    notes.append("Software of this report: " + ", ".join(f"{k} {v}" for k, v in software.items() if v is not None)
                 + ". Each model's train_report.json records the software it was trained with.")
    for name, instance in config.methods.items():
        train_report = paths.model(name) / "train_report.json"
        trained_with = read_json(train_report).get("environment") if train_report.is_file() else None
        differs = sorted(k for k in LIBRARIES_THAT_SHAPE_RESULTS
                         if trained_with is not None and trained_with.get(k) != software.get(k))
        if differs:
            notes.append(f"{name} was trained with other software than this report's: "
                         + ", ".join(f"{k} {trained_with.get(k)} (here {software.get(k)})" for k in differs) + ".")
    for name, instance in config.methods.items():
        variant = methods.get(instance.method).variant(instance.train, instance.caption)
        # an ablation row's full method: the instance named as its method module (profiles: `_like: syntic`)
        full = instance.method if instance.method in config.methods and \
            config.methods[instance.method].method == instance.method else None
        for evalset in config.evalsets:
            scores = read_json(paths.metrics(name, evalset))
            details = read_json(paths.evaluation(name, evalset))
            rows.append({"method": name, "variant": variant, "eval_set": evalset, **scores,
                         "skipped": details["skipped_metrics"]})
            if world_run and "object_f1" in scores:
                world_rows.append({**scores, "method": name, "variant": variant, "eval_set": evalset, "full": full})
            # a world's corpus is no paper's: its rows never meet a paper's numbers
            row = None if world_run else papers.paper_row(instance.method, variant, config.corpus.source,
                                                          config.evalsets[evalset].dataset)
            if row is not None:
                papers_rows.append({"method": name, "eval_set": evalset, "paper": row.paper, "source": row.source,
                                    "not_comparable": papers.not_comparable(row, config.models.clip.name, instance, config),
                                    "metrics": papers.comparison(scores, row)})
        curve = paths.train_curve(name)
        if curve.is_file():
            figures.append((f"Training loss of {name} ({variant}), per step (`dvc plots show`)",
                            plot_loss_curve(read_json(curve))))
    for name, external in config.external_results.items():
        scores = read_json(paths.metrics(name, external.evalset))
        rows.append({"method": external.label or name, "variant": "external result", "eval_set": external.evalset,
                     **scores, "skipped": read_json(paths.evaluation(name, external.evalset))["skipped_metrics"]})
        if world_run and "object_f1" in scores:
            world_controls.append({**scores, "method": external.label or name, "variant": "control",
                                   "eval_set": external.evalset, "frequent": _is_frequent_caption(name, external)})
        notes.append(f"{external.label or name}: the captions of {external.path}, scored with the same protocol "
                     f"({scores['images_evaluated']} images matched, {scores['images_missing']} without a caption, "
                     f"{scores['results_unmatched']} results matching no image).")
    gallery, world_gallery = [], []
    for evalset in config.evalsets:
        images = ShardedArtifact(paths.evalset(evalset))
        skipped = read_json(paths.evalset(evalset) / "report.json")["skipped"]
        notes.append(f"Eval set {evalset}: {images.num_rows} images evaluated, {len(skipped)} skipped"
                     + (": " + "; ".join(f"{k} ({v})" for k, v in list(skipped.items())[:10]) if skipped else "."))
        size = config.report.gallery_size
        if world_run and "scene" in images.columns:
            world_gallery += _world_gallery(config, evalset, images, size)
            if size:
                notes.append(f"The world's gallery shows the first {min(size, images.num_rows)} of the "
                             f"{images.num_rows} images of {evalset} (`report.gallery_size`).")
            continue
        tags = ShardedArtifact(paths.eval_tags(evalset))
        predictions = {name: read_json(paths.captions(name, evalset)) for name in config.methods}
        labels = dict(zip(tags.read_column("image_id").to_pylist(), tags.read_column("labels").to_pylist()))
        if size == 0:
            continue
        first = next(images.iter_batches(["image_id", "image", "references"], batch_size=size))
        for image_id, image, references in zip(*(first.column(i).to_pylist() for i in range(3))):
            gallery.append({"image_id": f"{evalset}/{image_id}", "image": image, "references": references,
                            "tags": labels[image_id],
                            "predictions": {name: predictions[name][image_id] for name in config.methods}})
    for name in config.modality_gap.models:
        result = read_json(paths.method(name) / "modality_gap.json")
        curve = ", ".join(f"λ={r['lambda']:g}: {100 * r['CIDEr']:.1f}" for r in result["results"])
        notes.append(f"Modality-gap analysis of {name} on {result['evalset']} (CIDEr of "
                     f"caption(normalize(λ·t + (1−λ)·v)); {result['caveat']}): {curve}.")
        figures.append((f"Modality gap of {name}", (paths.method(name) / "modality_gap.png").read_bytes()))
    world = None
    if world_run:
        world = {"gallery": world_gallery, "rows": world_rows, "controls": world_controls,
                 "models": [_world_models(config, name) for name in config.worlds]}
    write_report(out, f"SynthCap report ({config.profile})", rows, gallery, notes, papers_rows, figures, world,
                 refined_comparison(config, rows), seed_comparison(config, rows))
    return len(rows), len(gallery) + len(world_gallery)


def _is_frequent_caption(name: str, external) -> bool:
    """Is this external result the world's frequent-caption control (pipeline/world/dataset.py)?"""
    return name == "frequent-caption" or Path(external.path).name == "frequent_caption.json"


def _optional_json(path: Path):
    """A report file's content, or None when it does not exist or cannot be read (its section is left out)."""
    try:
        return read_json(path) if Path(path).is_file() else None
    except ValueError:
        return None


def _world_models(config, name: str) -> dict:
    """World ``name``'s stage reports, and the synthetic pairs' audit if this run's corpus is its."""
    parts = {"name": name, **{part: _optional_json(paths.world_metrics(name, part))
                              for part in ("data", "clip", "detector")}}
    corpus_world = next((w for w in config.worlds if f"world/{w}/" in str(config.corpus.path)), next(iter(config.worlds)))
    if name == corpus_world:
        parts["pairs"] = _optional_json(paths.SYNTHETIC_IMAGES / "report.json")
    return parts


def _world_gallery(config, evalset: str, images: ShardedArtifact, size: int) -> list[dict]:
    """The first ``size`` images of a world eval set with their objects and every method instance's (and
    control's) caption, with the kinds each names wrongly and leaves out (the evaluation's ``per_image``,
    or the checker where that lacks them)."""
    from pipeline.world.checker import check
    from pipeline.world.scenes import Scene

    if size == 0:
        return []
    who = [(name, name, False) for name in config.methods]
    who += [(name, external.label or name, True) for name, external in config.external_results.items()
            if external.evalset == evalset]
    captions = {name: read_json(paths.captions(name, evalset)) for name, _, _ in who}
    per_image = {name: read_json(paths.evaluation(name, evalset)).get("per_image", {}) for name, _, _ in who}
    labels = {}
    try:
        tags = ShardedArtifact(paths.eval_tags(evalset))
        labels = dict(zip(tags.read_column("image_id").to_pylist(), tags.read_column("labels").to_pylist()))
    except (FileNotFoundError, ValueError, KeyError):
        pass
    first = next(images.iter_batches(["image_id", "image", "references", "scene"], batch_size=size))
    items = []
    for image_id, image, references, scene_json in zip(*(first.column(i).to_pylist() for i in range(4))):
        scene = Scene.from_dict(json.loads(scene_json))
        entries = []
        for name, label, control in who:
            caption = captions[name].get(image_id)
            if caption is None:
                continue
            found = per_image[name].get(image_id) or {}
            if "wrong" not in found:
                found = check(caption, scene)
            entries.append({"method": label, "caption": caption, "wrong": found["wrong"],
                            "missing": found["missing"], "exact": bool(found.get("exact")), "control": control})
        items.append({"image_id": f"{evalset}/{image_id}", "image": image, "objects": scene_objects(scene),
                      "references": references, "tags": labels.get(image_id) if labels else None,
                      "captions": entries})
    return items
