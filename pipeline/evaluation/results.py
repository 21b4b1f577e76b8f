"""Caption result files of any system, matched to an eval set's images, so they are scored with the
same protocol as the pipeline's own captions (``synthcap score``, the ``score@NAME`` stage).

Formats read (by content):
- COCO results: a JSON list of ``{"image_id": ..., "caption": ...}`` (the COCO server's format);
- Karpathy-style: a JSON list of ``{"image_name" | "file_name" | "filename" | "image": ..., "prediction": ...}``
  (extra keys such as ``captions`` are ignored);
- JSON Lines from ``synthcap caption``: one ``{"image": path, "method": ..., "caption": ...}`` a line.

An image is matched by its id as written, else by the file name of a path, else (COCO's integer ids)
by the number at the end of the file name (``COCO_val2014_000000391895.jpg`` is 391895).
"""
from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath

IMAGE_KEYS = ("image_name", "file_name", "filename", "image")
TRAILING_NUMBER = re.compile(r"(\d+)$")


def read_predictions(path: str | Path, method: str | None = None) -> dict[str, str]:
    """image key -> caption, from a result file in any format above (``method`` picks one method's
    lines of a JSON Lines file that holds several)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no result file at {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _json_lines(path, text, method)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of results (COCO results or Karpathy-style), got "
                         f"{type(data).__name__}")
    out: dict[str, str] = {}
    for index, item in enumerate(data):
        if not isinstance(item, dict):
            raise ValueError(f"{path}: item {index} is not an object")
        if "caption" in item and "image_id" in item:
            key, caption = str(item["image_id"]), item["caption"]
        elif "prediction" in item and any(k in item for k in IMAGE_KEYS):
            key, caption = str(next(item[k] for k in IMAGE_KEYS if k in item)), item["prediction"]
        else:
            raise ValueError(f"{path}: item {index} has neither image_id + caption (COCO results) nor an image "
                             f"name + prediction (Karpathy-style): keys {sorted(item)}")
        _add(out, key, caption, path, f"item {index}")
    return out


def _json_lines(path: Path, text: str, method: str | None) -> dict[str, str]:
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{lineno}: neither a JSON list nor JSON Lines ({err})") from None
        if not isinstance(row, dict) or "caption" not in row or not any(k in row for k in IMAGE_KEYS):
            raise ValueError(f"{path}:{lineno}: a line needs an image and a caption")
        rows.append((lineno, row))
    methods = sorted({row.get("method") for _, row in rows if row.get("method")})
    if method is None and len(methods) > 1:
        raise ValueError(f"{path} holds the captions of several methods ({', '.join(methods)}): pick one")
    out: dict[str, str] = {}
    for lineno, row in rows:
        if method is None or row.get("method") == method:
            _add(out, str(next(row[k] for k in IMAGE_KEYS if k in row)), row["caption"], path, f"line {lineno}")
    if not out:
        raise ValueError(f"{path} has no caption" + (f" of method {method!r}" if method else ""))
    return out


def _add(out: dict, key: str, caption, path: Path, where: str) -> None:
    if not isinstance(caption, str):
        raise ValueError(f"{path}: {where}: the caption of {key!r} is not a string")
    if key in out:
        raise ValueError(f"{path}: {where}: a second caption for image {key!r}")
    out[key] = caption


def match(predictions: dict[str, str], image_ids: list[str]) -> tuple[dict[str, str], list[str], list[str]]:
    """-> (image_id -> caption for the images that have one, image ids without a caption, result keys
    that match no image)."""
    by_name = {PurePosixPath(i.replace("\\", "/")).name: i for i in image_ids}
    by_number: dict[int, str | None] = {}
    for i in image_ids:
        number = TRAILING_NUMBER.search(PurePosixPath(i).stem)
        if number:
            n = int(number.group(1))
            by_number[n] = None if n in by_number else i          # ambiguous numbers never match
    matched, extra = {}, []
    for key, caption in predictions.items():
        name = PurePosixPath(key.replace("\\", "/")).name
        image = key if key in by_name.values() else by_name.get(name)
        if image is None and key.isdigit():
            image = by_number.get(int(key))
        if image is None or image in matched:
            extra.append(key)
        else:
            matched[image] = caption
    missing = [i for i in image_ids if i not in matched]
    return matched, missing, extra
