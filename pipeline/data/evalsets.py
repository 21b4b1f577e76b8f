"""Evaluation sets: reference captions (any caption format of :mod:`pipeline.data.captions`) paired
with the real images they describe.

Typical use (the Flickr8k photos outside the train split)::

    references = read_references("Flickr8k_text/", exclude_splits=["train"])
    rows, report = load_eval_images("Flickr8k_Dataset/", references, max_images=100)
"""
from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Iterable
from pathlib import Path, PurePosixPath, PureWindowsPath

from pipeline.data.captions import _load, _read_loaded, normalize_whitespace
from pipeline.data.images import DEFAULT_MAX_PIXELS, ImageError, decode_image, skip_reason

PACKAGE_PREFIX = "package:"

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
    """A directory from a path, or from ``"package:NAME"``: the folder of importable package NAME.

    ``"package:skimage.data"`` → the folder holding ``skimage/data/__init__.py``.

    Raises:
        ValueError: NAME is not an importable package.
        NotADirectoryError: the directory does not exist.
    """
    if isinstance(spec, str) and spec.startswith(PACKAGE_PREFIX):
        directory = _package_dir(spec.removeprefix(PACKAGE_PREFIX))
    else:
        directory = Path(spec)
    if not directory.is_dir():
        raise NotADirectoryError(f"image directory not found: {directory}")
    return directory


def _package_dir(name: str) -> Path:
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError) as err:
        raise ValueError(f"package {name!r} cannot be imported: {err}") from err
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"{name!r} is not an importable package")
    return Path(next(iter(spec.submodule_search_locations)))


SKIP_KINDS = ("missing", "corrupt", "too_large")


def load_eval_images(
    image_dir: str | Path,
    references: dict[str, list[str]],
    max_images: int | None = None,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> tuple[list[dict], dict]:
    """Load the evaluation images named by ``references`` from ``image_dir``.

    Image names are taken in sorted order; ``max_images`` keeps the first N of them (skipped
    images count towards N). ``image_dir`` is a path or ``"package:NAME"`` (:func:`resolve_dir`).
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
