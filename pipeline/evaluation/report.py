"""A self-contained HTML report: a metrics table in the papers' Table-1 style and a caption gallery.

The page has no external assets: styles are inline and gallery thumbnails are embedded as
base64 JPEG data URIs. Every piece of text (method names, captions, reasons, notes) is
HTML-escaped: captions are user data.
"""
from __future__ import annotations

import base64
import html
import io
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
"""


def write_report(
    path: str | Path,
    title: str,
    metrics_table: Sequence[Mapping],
    gallery: Sequence[Mapping],
    notes: Iterable[str] = (),
    papers: Sequence[Mapping] = (),
    images: Sequence[tuple[str, bytes]] = (),
) -> None:
    """Write one self-contained HTML page with a metrics table, the papers' numbers, figures, a
    gallery and notes.

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
    """
    for index, row in enumerate(metrics_table):
        _check_keys(row, ("method", "eval_set"), f"metrics_table[{index}]")
    for index, item in enumerate(gallery):
        _check_keys(item, ("image_id", "image", "predictions", "references"), f"gallery[{index}]")
    page = _page(title, metrics_table, gallery, list(notes), papers, images)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")


def _check_keys(entry: Mapping, required: Sequence[str], where: str) -> None:
    missing = [key for key in required if key not in entry]
    if missing:
        raise ValueError(f"{where} lacks required key(s) {missing}")


def _page(title: str, metrics_table: Sequence[Mapping], gallery: Sequence[Mapping],
          notes: list[str], papers: Sequence[Mapping] = (), images: Sequence[tuple[str, bytes]] = ()) -> str:
    sections = [f"<h1>{_text(title)}</h1>", _metrics_section(metrics_table)]
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
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{_text(title)}</title>\n<style>{STYLE}</style>\n</head>\n"
        f"<body>\n{body}\n</body>\n</html>\n"
    )


def _text(value: object) -> str:
    """Any value as HTML-escaped text (quotes included, so it is safe in attributes too)."""
    return html.escape(str(value), quote=True)


# --- metrics table ------------------------------------------------------------------------------

def _metrics_section(rows: Sequence[Mapping]) -> str:
    footnotes: dict[str, int] = {}  # skip reason -> footnote number, in order of appearance
    header = "".join(f"<th>{_text(name)}</th>" for name in ("Method", "Variant", "Eval set"))
    header += "".join(f"<th>{_text(name)}</th>" for name, _, _ in METRIC_COLUMNS)
    body = "\n".join(_metrics_row(row, footnotes) for row in rows)
    parts = [
        "<h2>Metrics</h2>",
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


# --- notes --------------------------------------------------------------------------------------

def _notes_section(notes: list[str]) -> str:
    items = "".join(f"<li>{_text(note)}</li>" for note in notes)
    return f"<h2>Notes</h2>\n<ul>{items}</ul>"


# --- the pipeline's report ------------------------------------------------------------------------

def build_report(config, out: Path) -> tuple[int, int]:
    """Read every method instance's (and external result's) metrics, captions and the eval sets, put
    the papers' numbers beside them, write the report page. Returns (result rows, gallery images)."""
    rows, papers_rows, figures = [], [], []
    notes = []
    if config.models.clip.pretrained is None:
        notes.append("What these numbers mean: this profile's models are small and randomly initialised "
                     "(no pretrained weights can be downloaded here), so no caption follows its image. The "
                     "numbers test the plumbing, not caption quality; a paper profile on real weights "
                     "reproduces the papers.")
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
        for evalset in config.evalsets:
            scores = read_json(paths.metrics(name, evalset))
            details = read_json(paths.evaluation(name, evalset))
            rows.append({"method": name, "variant": variant, "eval_set": evalset, **scores,
                         "skipped": details["skipped_metrics"]})
            row = papers.paper_row(instance.method, variant, config.corpus.source, config.evalsets[evalset].dataset)
            if row is not None:
                papers_rows.append({"method": name, "eval_set": evalset, "paper": row.paper, "source": row.source,
                                    "not_comparable": papers.not_comparable(row, config.models.clip.name, instance),
                                    "metrics": papers.comparison(scores, row)})
        curve = paths.train_curve(name)
        if curve.is_file():
            figures.append((f"Training loss of {name} ({variant}), per step (`dvc plots show`)",
                            plot_loss_curve(read_json(curve))))
    for name, external in config.external_results.items():
        scores = read_json(paths.metrics(name, external.evalset))
        rows.append({"method": external.label or name, "variant": "external result", "eval_set": external.evalset,
                     **scores, "skipped": read_json(paths.evaluation(name, external.evalset))["skipped_metrics"]})
        notes.append(f"{external.label or name}: the captions of {external.path}, scored with the same protocol "
                     f"({scores['images_evaluated']} images matched, {scores['images_missing']} without a caption, "
                     f"{scores['results_unmatched']} results matching no image).")
    gallery = []
    for evalset in config.evalsets:
        images = ShardedArtifact(paths.evalset(evalset))
        tags = ShardedArtifact(paths.eval_tags(evalset))
        skipped = read_json(paths.evalset(evalset) / "report.json")["skipped"]
        notes.append(f"Eval set {evalset}: {images.num_rows} images evaluated, {len(skipped)} skipped"
                     + (": " + "; ".join(f"{k} ({v})" for k, v in list(skipped.items())[:10]) if skipped else "."))
        predictions = {name: read_json(paths.captions(name, evalset)) for name in config.methods}
        labels = dict(zip(tags.read_column("image_id").to_pylist(), tags.read_column("labels").to_pylist()))
        size = config.report.gallery_size
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
    write_report(out, f"SynthCap report ({config.profile})", rows, gallery, notes, papers_rows, figures)
    return len(rows), len(gallery)
