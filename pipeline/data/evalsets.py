"""Evaluation sets: reference captions (any caption format of :mod:`pipeline.data.captions`) paired
with the real images they describe.

Typical use (the Flickr8k photos outside the train split)::

    references = read_references("Flickr8k_text/", exclude_splits=["train"])
    rows, report = load_eval_images("Flickr8k_Dataset/", references, max_images=100)
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import warnings
from collections.abc import Iterable
from pathlib import Path, PurePosixPath, PureWindowsPath

import pyarrow as pa

from pipeline.data.captions import _load, _read_loaded, normalize_whitespace
from pipeline.data.images import DEFAULT_MAX_PIXELS, ImageError, decode_image, skip_reason

# --------------------------------------------------------------------------------------------
# Evaluation references and images
# --------------------------------------------------------------------------------------------


def read_references(
    path: str | Path,
    format: str = "auto",
    split_file: str | Path | None = None,
    splits: Iterable[str] | str | None = None,
    exclude_splits: Iterable[str] | str | None = None,
) -> dict[str, list[str]]:
    """Reference captions of an evaluation set: image name → its captions, in file order.

    Accepts every caption format except ``plain_text`` (which has no images: ``ValueError``);
    ``format``, ``split_file``, ``splits`` and ``exclude_splits`` mean what they mean in
    :func:`read_captions`: e.g. the Flickr8k photos outside the train split are
    ``read_references("Flickr8k_text/", exclude_splits=["train"])`` (images of the dev and test
    split files, and of no split file).
    The key is the image's file name: ``image_name`` / ``filename`` for the Karpathy formats,
    the image for Flickr8k, and for COCO annotations the ``file_name`` of the matching
    entry in ``images`` (``str(image_id)`` when the file has no such entry). Reference texts
    are whitespace-normalised (:func:`normalize_whitespace`); none is dropped. Undecodable lines
    cannot be references: they are skipped with a :class:`UserWarning` naming them.
    """
    path = Path(path)
    fmt, content = _load(path, format)
    if fmt == "plain_text":
        raise ValueError(f"{path}: plain text has no images, so it cannot give references")
    caption_file = _read_loaded(
        path, fmt, content, path.name, splits, split_file, None, exclude_splits
    )
    if caption_file.undecodable:
        warnings.warn(
            f"skipped undecodable reference lines: {caption_file.undecodable}", stacklevel=2
        )
    image_names = _coco_file_names(content) if fmt == "coco_annotations" else {}
    references: dict[str, list[str]] = {}
    for record in caption_file.records:
        name = image_names.get(record.group_id, record.group_id)
        references.setdefault(name, []).append(normalize_whitespace(record.text))
    return references


def _coco_file_names(data: dict) -> dict[str, str]:
    images = data.get("images") or []
    return {
        str(image["id"]): image["file_name"]
        for image in images
        if isinstance(image, dict) and "id" in image and isinstance(image.get("file_name"), str)
    }


def resolve_dir(spec: str | Path) -> Path:
    """The image folder of an eval set.

    Raises:
        NotADirectoryError: the directory does not exist.
    """
    directory = Path(spec)
    if not directory.is_dir():
        raise NotADirectoryError(f"image directory not found: {directory}")
    return directory


def copy_package_files(package: str, names: Iterable[str], out: Path) -> list[Path]:
    """Copy data files shipped inside an installed Python package (e.g. scikit-image's sample photos)
    into ``out``, atomically per file; the package's version is pinned by the lock file."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{package!r} is not an importable package")
    source = Path(next(iter(spec.submodule_search_locations)))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in names:
        _check_inside(name)
        data = (source / name).read_bytes()
        tmp = out / f".{name}.tmp"
        tmp.write_bytes(data)
        tmp.replace(out / name)
        copied.append(out / name)
    return copied


SKIP_KINDS = ("missing", "corrupt", "too_large")


def load_eval_images(
    image_dir: str | Path,
    references: dict[str, list[str]],
    max_images: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> tuple[list[dict], dict]:
    """Load the evaluation images named by ``references`` from ``image_dir``.

    Image names are taken in sorted order; ``max_images`` keeps the first N of them (skipped
    images count towards N).
    Every name must stay inside ``image_dir``: an absolute name or one with ``..`` raises
    ``ValueError`` naming it, before anything is read. Each image is decoded by
    :func:`pipeline.data.images.decode_image` (the decoder the encode and tag stages use), so
    an image loaded here decodes there too. A missing file, one that cannot be decoded, or one
    of more than ``max_pixels`` pixels (refused from its header, never decoded) is skipped
    with its reason, never fatal.

    Returns ``(rows, report)``; each row is
    ``{"image_id": name, "image": <the file's bytes>, "width": int, "height": int,
    "references": [str, ...]}`` with the size of the decoded image (upright, after the EXIF
    orientation), and the report is JSON-able::

        {"requested": n, "loaded": n,
         "skipped": {image_name: reason, ...},          # in sorted name order
         "skipped_counts": {"missing": n, "corrupt": n, "too_large": n}}

    with reasons such as ``"missing"``, ``"corrupt: cannot identify image file"``,
    ``"too large (20000×20000 = 400000000 pixels > limit 89478485)"``.
    """
    if max_images is not None and not _is_count(max_images):
        raise ValueError(f"max_images must be None or a non-negative integer, got {max_images!r}")
    directory = resolve_dir(image_dir)
    for name in references:
        _check_inside(name)
    names = sorted(references)[:max_images]

    rows: list[dict] = []
    skipped: dict[str, str] = {}
    counts = dict.fromkeys(SKIP_KINDS, 0)
    for name in names:
        file = directory / name
        if not file.is_file():
            skipped[name] = "missing"
            counts["missing"] += 1
            continue
        data = file.read_bytes()
        try:
            width, height = decode_image(data, max_pixels=max_pixels).size
        except ImageError as err:
            skipped[name] = skip_reason(err)
            counts[err.kind] += 1
            continue
        rows.append({
            "image_id": name,
            "image": data,
            "width": width,
            "height": height,
            "references": list(references[name]),
        })
    report = {"requested": len(names), "loaded": len(rows), "skipped": skipped,
              "skipped_counts": counts}
    return rows, report


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_inside(name: str) -> None:
    """Reject an image name that is empty, absolute (POSIX or Windows) or climbs out with ``..``."""
    as_posix = PurePosixPath(name.replace("\\", "/"))
    if not name or as_posix.is_absolute() or PureWindowsPath(name).drive or ".." in as_posix.parts:
        raise ValueError(f"image name {name!r} escapes the image directory")


# --------------------------------------------------------------------------------------------
# The eval-set artifact
# --------------------------------------------------------------------------------------------
EVAL_SCHEMA = pa.schema([("image_id", pa.string()), ("image", pa.binary()), ("width", pa.int32()),
                         ("height", pa.int32()), ("references", pa.list_(pa.string()))])
# An eval set whose references file gives each image its ground-truth scene (a world's, pipeline/world)
# keeps it beside the image: the checker's exact metrics read it.
SCENE_FIELD = pa.field("scene", pa.string())


def eval_schema(rows: list[dict]) -> pa.Schema:
    """EVAL_SCHEMA, with the ``scene`` column when the rows carry scenes."""
    return EVAL_SCHEMA.append(SCENE_FIELD) if any("scene" in r for r in rows) else EVAL_SCHEMA


def read_scenes(path: str | Path) -> dict[str, str]:
    """Image name -> its ground-truth scene (JSON text), from a Karpathy-style list whose items carry a
    ``scene`` (a world's eval set); {} for any other references file."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".json":
        return {}
    data = json.loads(path.read_bytes())
    if not isinstance(data, list):
        return {}
    return {item["image_name"]: json.dumps(item["scene"], sort_keys=True) for item in data
            if isinstance(item, dict) and isinstance(item.get("scene"), dict) and isinstance(item.get("image_name"), str)}


def eval_rows(cfg) -> tuple[list[dict], dict]:
    """The rows of an eval set (``pipeline.config.EvalSet``) and a report of what was selected and
    skipped, with reasons."""
    references = read_references(cfg.references, cfg.format, splits=cfg.splits, exclude_splits=cfg.exclude_splits)
    selection = {"referenced": len(references)}
    if cfg.only_images_in_folder:
        present = {f.name for f in resolve_dir(cfg.images).iterdir()}
        references = {k: v for k, v in references.items() if k in present}
        selection["not_in_folder"] = selection["referenced"] - len(references)
    rows, report = load_eval_images(cfg.images, references, cfg.max_images, cfg.max_pixels)
    scenes = read_scenes(cfg.references)
    if scenes:
        missing = [r["image_id"] for r in rows if r["image_id"] not in scenes]
        if missing:
            raise ValueError(f"{cfg.references}: some images have a scene and some do not, e.g. {missing[:3]}")
        for r in rows:
            r["scene"] = scenes[r["image_id"]]
    return rows, {**report, "selection": selection}


def rows_fingerprint(rows: list[dict]) -> str:
    """What an eval set is: its image ids, references and image bytes."""
    digest = hashlib.sha256()
    for r in rows:
        digest.update(json.dumps([r["image_id"], r["references"]] + ([r["scene"]] if "scene" in r else [])).encode())
        digest.update(hashlib.sha256(r["image"]).digest())
    return digest.hexdigest()
