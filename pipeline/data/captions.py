"""Caption corpora: read the caption formats users bring, and clean them.

Readers turn the caption formats users bring into one record type, :class:`Caption`
(``group_id`` in brackets):

- ``karpathy_list``: a JSON list of ``{split, image_name, [file_path], captions: [str, ...]}``
  (``image_name``).
- ``karpathy_dataset``: Karpathy's ``dataset_*.json``,
  ``{"images": [{filename, split, sentences: [{raw}, ...]}, ...]}`` (``filename``).
- ``coco_annotations``: COCO captions JSON, ``{"annotations": [{image_id, caption}, ...],
  "images": [{id, file_name}, ...]}`` (``str(image_id)``).
- ``flickr8k``: the Flickr8k *text folder*, a directory holding ``Flickr8k.token.txt`` and any of
  the split files ``Flickr_8k.trainImages.txt``, ``Flickr_8k.devImages.txt``,
  ``Flickr_8k.testImages.txt`` (one image name a line); each caption's ``split`` is that of the
  split file listing its image (``train``/``dev``/``test``), or ``""`` if none does. Other files
  and subfolders (e.g. ``images/``) are ignored. This is the format the pipeline uses for
  Flickr8k (``IMAGE.jpg``).
- ``flickr8k_tokens``: the token file alone, ``IMAGE.jpg#k<TAB>caption`` a line; a space in place
  of the tab is accepted (``IMAGE.jpg``). A split can be attached with ``split_file=``.
- ``plain_text``: one caption a line (``line{lineno}``). A file whose whole content parses as a
  JSON list or object is refused ("looks like JSON"): read as text it would give captions
  such as ``'{'``.

``caption_id`` is ``f"{group_id}#{k}"`` with ``k`` the caption's index within its group (for
Flickr8k, the ``k`` written in the file; for plain text, ``line{lineno}`` like ``group_id``).
Caption ids are unique within a file; a file that repeats one is rejected.

Text files are decoded line by line as UTF-8: a line that is not valid UTF-8 is skipped and
reported as ``"file:line"`` in :attr:`CaptionFile.undecodable`, never fatal and never mangled.
A line ends at ``\n``, ``\r\n`` or a lone ``\r`` (old Mac files). A UTF-16 or UTF-32 file (told by
its byte-order mark, or for UTF-16 without one by its NUL bytes) is decoded whole in that encoding,
and refused naming the file if it is not valid in it. JSON files must be valid JSON as a whole, in
UTF-8 or in UTF-16/32 with a byte-order mark.

Cleaning (:func:`clean_captions`) normalises whitespace and drops empty captions and captions
with no letter or digit (``"..."``, a lone zero-width space); the length cap and the
de-duplication are options. Of the corpora in the papers, only SynTIC's SS1M corpus is filtered
to captions of at most 15 words; the paper profiles use no cap and keep repeated captions.

Typical use::

    corpus = read_captions("Flickr8k_text/", splits=["train"])
    kept, report = clean_captions(corpus, max_words=15)
"""
from __future__ import annotations

import codecs
import dataclasses
import json
import re
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "FORMATS",
    "Caption",
    "CaptionFile",
    "read_captions",
    "clean_captions",
    "normalize_whitespace",
    "split_name_from_file",
]

JSON_FORMATS = ("karpathy_list", "karpathy_dataset", "coco_annotations")
TEXT_FORMATS = ("flickr8k_tokens", "plain_text")
FOLDER_FORMATS = ("flickr8k",)
FORMATS = JSON_FORMATS + TEXT_FORMATS + FOLDER_FORMATS
_FORMATS_WITH_SPLITS = ("karpathy_list", "karpathy_dataset", "flickr8k")

# The Flickr8k text folder: the token file and the standard split files.
FLICKR8K_TOKEN_FILE = "Flickr8k.token.txt"
FLICKR8K_SPLIT_FILES = (
    "Flickr_8k.trainImages.txt",
    "Flickr_8k.devImages.txt",
    "Flickr_8k.testImages.txt",
)

# ``IMAGE#k``, then a tab or space(s), then the caption (possibly empty).
_TOKEN_LINE = re.compile(r"^(?P<image>[^\s#]+)#(?P<k>\d+)(?:[ \t]+(?P<text>.*))?$")
_TOKEN_PREFIX = re.compile(rb"^(?P<image>[^\s#]+)#\d+")
_LINES_SNIFFED = 5
_MAX_EXAMPLES = 5


@dataclass(frozen=True, slots=True)
class Caption:
    """One caption of a corpus.

    ``split`` is ``""`` when the source format has no splits; ``source`` is the caller's name
    for the file the caption came from.
    """

    caption_id: str
    group_id: str
    text: str
    split: str
    source: str

    def to_dict(self) -> dict[str, str]:
        """The record as a plain dict (for JSON, Arrow tables and the like)."""
        return dataclasses.asdict(self)


@dataclass
class CaptionFile:
    """What :func:`read_captions` read: the captions, and the lines it had to skip.

    ``undecodable`` names the text lines that were not valid UTF-8, as ``"file:line"``
    (1-based line numbers). Two results are combined by concatenating both lists, e.g.
    ``CaptionFile(a.records + b.records, a.undecodable + b.undecodable)``.
    """

    records: list[Caption]
    undecodable: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Reading captions
# --------------------------------------------------------------------------------------------


def read_captions(
    path: str | Path,
    format: str = "auto",
    source: str | None = None,
    splits: Iterable[str] | str | None = None,
    split_file: str | Path | None = None,
    split_name: str | None = None,
    exclude_splits: Iterable[str] | str | None = None,
) -> CaptionFile:
    """Read a caption file (or the Flickr8k text folder) into :class:`Caption` records.

    Args:
        path: the caption file, or for ``flickr8k`` the folder.
        format: one of :data:`FORMATS`, or ``"auto"``: a directory holding
            ``Flickr8k.token.txt`` is ``flickr8k``; a ``.json`` file, or any file whose whole
            content parses as a JSON list or object, is told apart by its structure (list →
            ``karpathy_list``; ``images`` with ``sentences`` → ``karpathy_dataset``;
            ``annotations`` → ``coco_annotations``); any other file is ``flickr8k_tokens`` if
            its first non-blank lines all look like ``IMAGE#k caption``, else ``plain_text``.
        source: the name stored in each record's ``source``; defaults to the file's (folder's)
            name.
        splits: keep only records whose split is one of these (a single string is one split).
            Only for formats that carry splits (Karpathy formats, the ``flickr8k`` folder, or
            Flickr8k tokens with a ``split_file``); otherwise ``ValueError``, since nothing
            could match.
        split_file: ``flickr8k_tokens`` only: a file listing one image name a line; only those
            images' captions are kept, with ``split`` set to ``split_name`` or else the name
            derived from the file name (``Flickr_8k.trainImages.txt`` → ``"train"``). Every
            listed image must have captions (``ValueError`` otherwise). Kept for single token
            files; the pipeline reads Flickr8k as the ``flickr8k`` folder, whose split files
            need no parameter of their own (DVC cannot take optional files as dependencies).
        split_name: the split to record for ``split_file``'s captions.
        exclude_splits: drop records whose split is one of these (same formats as ``splits``);
            e.g. ``["train"]`` on the ``flickr8k`` folder keeps the images outside the train
            split, those of no split file included.

    Returns:
        a :class:`CaptionFile`: records in file order, plus the undecodable text lines (only
        those that may belong to the selected images: with ``split_file``, ``splits`` or
        ``exclude_splits``, a line whose image name can still be read is kept only if that
        image is selected).

    Raises:
        FileNotFoundError: ``path`` or ``split_file`` does not exist.
        ValueError: unknown format, invalid UTF-8 or JSON in a JSON file, JSON content given as
            ``plain_text``, a malformed record (the message names the file and the item index
            or line), repeated caption ids, an image in two split files, or an argument that
            does not apply to the format.
    """
    path = Path(path)
    fmt, content = _load(path, format)
    return _read_loaded(
        path, fmt, content, source or path.name, splits, split_file, split_name, exclude_splits
    )


def _read_loaded(
    path: Path,
    fmt: str,
    content,
    source: str,
    splits,
    split_file,
    split_name,
    exclude_splits=None,
) -> CaptionFile:
    """:func:`read_captions` once the file is loaded and its format known."""
    _check_split_arguments(fmt, splits, split_file, split_name, exclude_splits)
    caption_file = _READERS[fmt](content, path, source)
    if split_file is not None:
        caption_file = _restrict_to_split_file(
            caption_file, content, path, Path(split_file), split_name
        )
    if splits is not None or exclude_splits is not None:
        wanted = _as_split_set(splits) if splits is not None else None
        unwanted = _as_split_set(exclude_splits) if exclude_splits is not None else set()

        def selected(split: str) -> bool:
            return (wanted is None or split in wanted) and split not in unwanted

        caption_file.records = [r for r in caption_file.records if selected(r.split)]
        if isinstance(content, _Flickr8kFolder):
            caption_file.undecodable = _undecodable_of_splits(content, selected)
    _check_unique_ids(caption_file.records, path)
    return caption_file


@dataclass
class _TextLines:
    """A text file's decoded lines as ``(lineno, text)``, and its undecodable lines' bytes."""

    lines: list[tuple[int, str]]
    undecodable: list[tuple[int, bytes]]


@dataclass
class _Flickr8kFolder:
    """The Flickr8k text folder, loaded: the token file's lines and each listed image's split."""

    token_file: Path
    tokens: _TextLines
    split_of: dict[str, str]


def _load(path: Path, format: str) -> tuple[str, object]:
    """Read ``path`` once and settle its format: returns ``(format, parsed content)``."""
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"unknown caption format {format!r}; expected 'auto' or one of {FORMATS}")
    if path.is_dir():
        if format == "auto" and not (path / FLICKR8K_TOKEN_FILE).is_file():
            raise ValueError(
                f"{path} is a directory without {FLICKR8K_TOKEN_FILE}: the only folder format "
                "is flickr8k (the Flickr8k text folder); give a caption file instead"
            )
        if format not in ("auto", *FOLDER_FORMATS):
            raise ValueError(f"{path} is a directory, but format {format!r} reads a file")
        return "flickr8k", _load_flickr8k_folder(path)
    if format in FOLDER_FORMATS:
        if not path.exists():
            raise FileNotFoundError(f"Flickr8k text folder not found: {path}")
        raise ValueError(f"{path}: format {format!r} reads a folder (holding "
                         f"{FLICKR8K_TOKEN_FILE} and split files), not a file")
    raw = path.read_bytes()
    is_json = format in JSON_FORMATS or (format == "auto" and path.suffix.lower() == ".json")
    if is_json:
        data = _parse_json(raw, path)
        return (format if format != "auto" else _detect_json_format(data, path)), data
    whole_json = _whole_json(raw)
    if whole_json is not None:
        if format == "auto":
            return _detect_json_format(whole_json, path), whole_json
        if format == "plain_text":
            kind = "list" if isinstance(whole_json, list) else "object"
            raise ValueError(
                f"{path}: the whole file parses as a JSON {kind}, so it looks like JSON, not "
                f"plain text (one caption a line); read it with format 'auto' or one of "
                f"{', '.join(JSON_FORMATS)} (the pipeline setting is corpus.format)"
            )
    lines = _decode_lines(raw, path)
    return (format if format != "auto" else _detect_text_format(lines)), lines


def _json_text(raw: bytes) -> str:
    """A JSON file's text: UTF-16/32 with a byte-order mark, else UTF-8 (a BOM tolerated)."""
    for mark, codec in _BYTE_ORDER_MARKS:
        if raw.startswith(mark):
            return raw[len(mark):].decode(codec)
    return raw.decode("utf-8-sig")


def _whole_json(raw: bytes) -> list | dict | None:
    """The parsed content if the whole file is one JSON list or object, else ``None``."""
    try:
        text = _json_text(raw)
    except UnicodeDecodeError:
        return None
    if not re.match(r"[\ufeff \t\r\n]*[\[{]", text):
        return None
    try:
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, (list, dict)) else None


def _parse_json(raw: bytes, path: Path) -> object:
    try:
        text = _json_text(raw)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not valid UTF-8 ({err})") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def _detect_json_format(data: object, path: Path) -> str:
    if isinstance(data, list):
        return "karpathy_list"
    if isinstance(data, dict):
        images = data.get("images")
        first_image = images[0] if isinstance(images, list) and images else None
        if isinstance(first_image, dict) and "sentences" in first_image:
            return "karpathy_dataset"
        if "annotations" in data:
            return "coco_annotations"
    raise ValueError(f"{path}: cannot tell the caption format of this JSON; pass format=")


# UTF-32's little-endian mark begins with UTF-16's: look for it first
_BYTE_ORDER_MARKS = ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"),
                     (codecs.BOM_UTF16_LE, "utf-16-le"), (codecs.BOM_UTF16_BE, "utf-16-be"))
_LINE_END = re.compile(rb"\r\n|\r|\n")


def _wide_encoding(raw: bytes) -> tuple[str, int] | None:
    """(codec, length of its byte-order mark) of a UTF-16/32 file, None for anything else (UTF-8).
    Without a mark, UTF-16 is told by its NUL bytes: text of mostly ASCII letters has a NUL in every
    other byte, on the even bytes for big-endian and the odd ones for little-endian."""
    for mark, codec in _BYTE_ORDER_MARKS:
        if raw.startswith(mark):
            return codec, len(mark)
    sample = raw[:4096]
    even, odd = sample[0::2].count(0), sample[1::2].count(0)
    if len(sample) >= 4 and max(even, odd) >= len(sample) // 4 and min(even, odd) <= max(even, odd) // 8:
        return ("utf-16-be" if even > odd else "utf-16-le"), 0
    return None


def _decode_lines(raw: bytes, path: Path) -> _TextLines:
    """Split into lines at every line ending (LF, CRLF, a lone CR) and decode each as UTF-8 on its own
    (a leading BOM tolerated); a UTF-16/32 file is decoded whole, or refused naming ``path``."""
    wide = _wide_encoding(raw)
    if wide is not None:
        codec, mark = wide
        try:
            text = raw[mark:].decode(codec)
        except UnicodeDecodeError as err:
            raise ValueError(f"{path}: read as {codec.upper()} (its byte-order mark or NUL bytes say so), but it is "
                             f"not valid {codec.upper()} ({err}); save it as UTF-8") from None
        raw = text.encode("utf-8")
    chunks = _LINE_END.split(raw)
    if chunks and chunks[-1] == b"":
        chunks.pop()  # the file's final newline ends a line, it does not start one
    decoded = _TextLines(lines=[], undecodable=[])
    for lineno, chunk in enumerate(chunks, start=1):
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError:
            decoded.undecodable.append((lineno, chunk))
            continue
        decoded.lines.append((lineno, text.removeprefix("\ufeff") if lineno == 1 else text))
    return decoded


def _detect_text_format(text: _TextLines) -> str:
    sniffed = [line for _, line in text.lines if line.strip()][:_LINES_SNIFFED]
    if sniffed and all(_TOKEN_LINE.match(line) for line in sniffed):
        return "flickr8k_tokens"
    return "plain_text"


def _check_split_arguments(fmt: str, splits, split_file, split_name, exclude_splits) -> None:
    if split_name is not None and split_file is None:
        raise ValueError("split_name= only applies together with split_file=")
    if split_file is not None and fmt != "flickr8k_tokens":
        hint = " (the flickr8k folder reads its own split files)" if fmt == "flickr8k" else ""
        raise ValueError(f"split_file= only applies to flickr8k_tokens, not {fmt}{hint}")
    carries_splits = fmt in _FORMATS_WITH_SPLITS or split_file is not None
    for name, value in (("splits", splits), ("exclude_splits", exclude_splits)):
        if value is not None and not carries_splits:
            raise ValueError(f"{name}= given but {fmt} captions carry no split")


def _as_split_set(splits: Iterable[str] | str) -> set[str]:
    return {splits} if isinstance(splits, str) else set(splits)


def _check_unique_ids(records: list[Caption], path: Path) -> None:
    seen: set[str] = set()
    for record in records:
        if record.caption_id in seen:
            raise ValueError(f"{path}: caption id {record.caption_id!r} occurs more than once")
        seen.add(record.caption_id)


# --- one reader per format: (parsed content, path, source) -> CaptionFile --------------------


def _read_karpathy_list(data: object, path: Path, source: str) -> CaptionFile:
    items = _require_list(data, path, "a JSON list of images")
    records = []
    for index, item in enumerate(items):
        name = _field(item, "image_name", str, path, index)
        split = _field(item, "split", str, path, index)
        captions = _field(item, "captions", list, path, index)
        for k, text in enumerate(captions):
            _require_str(text, path, index, f"captions[{k}]")
            records.append(Caption(f"{name}#{k}", name, text, split, source))
    return CaptionFile(records)


def _read_karpathy_dataset(data: object, path: Path, source: str) -> CaptionFile:
    images = _require_list(_top_level_key(data, "images", path), path, "'images' as a list")
    records = []
    for index, item in enumerate(images):
        name = _field(item, "filename", str, path, index)
        split = _field(item, "split", str, path, index)
        sentences = _field(item, "sentences", list, path, index)
        for k, sentence in enumerate(sentences):
            text = _field(sentence, "raw", str, path, index, where=f"sentences[{k}]")
            records.append(Caption(f"{name}#{k}", name, text, split, source))
    return CaptionFile(records)


def _read_coco_annotations(data: object, path: Path, source: str) -> CaptionFile:
    annotations = _top_level_key(data, "annotations", path)
    _require_list(annotations, path, "'annotations' as a list")
    captions_so_far: dict[str, int] = defaultdict(int)
    records = []
    for index, annotation in enumerate(annotations):
        group = str(_field(annotation, "image_id", (int, str), path, index))
        text = _field(annotation, "caption", str, path, index)
        k = captions_so_far[group]
        captions_so_far[group] += 1
        records.append(Caption(f"{group}#{k}", group, text, "", source))
    return CaptionFile(records)


def _read_flickr8k_tokens(text: _TextLines, path: Path, source: str) -> CaptionFile:
    records = []
    for lineno, line in text.lines:
        if not line.strip():
            continue
        match = _TOKEN_LINE.match(line)
        if match is None:
            raise ValueError(f"{path}:{lineno}: expected 'IMAGE#k<TAB>caption', got {line[:80]!r}")
        image = match["image"]
        records.append(Caption(f"{image}#{match['k']}", image, match["text"] or "", "", source))
    return CaptionFile(records, _labels(path, text.undecodable))


def _read_plain_text(text: _TextLines, path: Path, source: str) -> CaptionFile:
    """Every line is a caption; a blank line is an empty caption (for cleaning to drop)."""
    records = [
        Caption(f"line{lineno}", f"line{lineno}", line, "", source) for lineno, line in text.lines
    ]
    return CaptionFile(records, _labels(path, text.undecodable))


def _read_flickr8k_folder(folder: _Flickr8kFolder, path: Path, source: str) -> CaptionFile:
    """The token file's captions, each with the split of the split file listing its image."""
    caption_file = _read_flickr8k_tokens(folder.tokens, folder.token_file, source)
    caption_file.records = [
        dataclasses.replace(r, split=folder.split_of.get(r.group_id, ""))
        for r in caption_file.records
    ]
    return caption_file


_READERS: dict[str, Callable[[object, Path, str], CaptionFile]] = {
    "karpathy_list": _read_karpathy_list,
    "karpathy_dataset": _read_karpathy_dataset,
    "coco_annotations": _read_coco_annotations,
    "flickr8k_tokens": _read_flickr8k_tokens,
    "plain_text": _read_plain_text,
    "flickr8k": _read_flickr8k_folder,
}


def _labels(path: Path, undecodable: list[tuple[int, bytes]]) -> list[str]:
    return [f"{path}:{lineno}" for lineno, _ in undecodable]


# --- validation helpers for JSON records ------------------------------------------------------


def _top_level_key(data: object, key: str, path: Path) -> object:
    if not isinstance(data, dict) or key not in data:
        raise ValueError(f"{path}: expected a JSON object with {key!r}")
    return data[key]


def _require_list(value: object, path: Path, expected: str) -> list:
    if not isinstance(value, list):
        raise ValueError(f"{path}: expected {expected}, got {type(value).__name__}")
    return value


def _field(item: object, key: str, kind, path: Path, index: int, where: str = "") -> object:
    """``item[key]``, checked to be of ``kind``; errors name the file and the item index."""
    place = f"{path}: item {index}" + (f" {where}" if where else "")
    if not isinstance(item, dict):
        raise ValueError(f"{place}: expected an object, got {type(item).__name__}")
    if key not in item:
        raise ValueError(f"{place}: missing {key!r}")
    value = item[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"{place}: {key!r} has type {type(value).__name__}")
    return value


def _require_str(value: object, path: Path, index: int, where: str) -> None:
    if not isinstance(value, str):
        kind = type(value).__name__
        raise ValueError(f"{path}: item {index} {where}: expected a string, got {kind}")


# --- split files ------------------------------------------------------------------------------


def _restrict_to_split_file(
    caption_file: CaptionFile,
    text: _TextLines,
    path: Path,
    split_file: Path,
    split_name: str | None,
) -> CaptionFile:
    """Keep the captions, and the undecodable lines, of the images listed in ``split_file``.

    An undecodable line whose ``IMAGE#k`` prefix cannot be read either is kept (reported).
    """
    images = _read_split_file(split_file)
    kept_images = images | {None}  # None: an undecodable line with no readable image name
    split = split_name if split_name is not None else split_name_from_file(split_file)
    records = [
        dataclasses.replace(r, split=split) for r in caption_file.records if r.group_id in images
    ]
    _check_split_images_have_captions(images, records, split_file)
    undecodable = [(n, raw) for n, raw in text.undecodable if _raw_line_image(raw) in kept_images]
    return CaptionFile(records, _labels(path, undecodable))


def _load_flickr8k_folder(folder: Path) -> _Flickr8kFolder:
    """Read the token file and whichever standard split files the folder holds.

    Raises ``ValueError`` if an image is listed by two split files (naming both) or a split
    file lists an image that has no captions.
    """
    token_file = folder / FLICKR8K_TOKEN_FILE
    if not token_file.is_file():
        raise FileNotFoundError(f"{folder}: no {FLICKR8K_TOKEN_FILE} in this Flickr8k folder")
    tokens = _decode_lines(token_file.read_bytes(), token_file)
    split_of: dict[str, str] = {}
    listed_by: dict[str, Path] = {}
    for name in FLICKR8K_SPLIT_FILES:
        split_file = folder / name
        if not split_file.is_file():
            continue
        split = split_name_from_file(split_file)
        for image in sorted(_read_split_file(split_file)):
            if image in listed_by:
                raise ValueError(
                    f"{folder}: image {image!r} is listed by two split files, "
                    f"{listed_by[image].name} and {split_file.name}"
                )
            listed_by[image] = split_file
            split_of[image] = split
    captioned = {
        match["image"] for _, line in tokens.lines if (match := _TOKEN_LINE.match(line))
    }
    for name in FLICKR8K_SPLIT_FILES:
        listed = {image for image, file in listed_by.items() if file.name == name}
        missing = sorted(listed - captioned)
        if missing:
            raise ValueError(
                f"{folder / name}: {len(missing)} listed images have no captions in "
                f"{FLICKR8K_TOKEN_FILE}, e.g. {missing[:3]}"
            )
    return _Flickr8kFolder(token_file, tokens, split_of)


def _undecodable_of_splits(folder: _Flickr8kFolder, selected: Callable[[str], bool]) -> list[str]:
    """The folder's undecodable token lines that may belong to a selected image: those whose
    image name is readable and selected by its split, and those whose image name is not."""
    kept = []
    for lineno, raw in folder.tokens.undecodable:
        image = _raw_line_image(raw)
        if image is None or selected(folder.split_of.get(image, "")):
            kept.append((lineno, raw))
    return _labels(folder.token_file, kept)


def _raw_line_image(raw: bytes) -> str | None:
    """The image name of an undecodable token line, if its ``IMAGE#k`` prefix is readable."""
    match = _TOKEN_PREFIX.match(raw)
    try:
        return match["image"].decode("utf-8") if match else None
    except UnicodeDecodeError:
        return None


def _read_split_file(split_file: Path) -> set[str]:
    try:
        text = split_file.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{split_file}: not valid UTF-8 ({err})") from err
    return {line.strip() for line in text.splitlines() if line.strip()}


def split_name_from_file(split_file: str | Path) -> str:
    """The split a split file names: ``Flickr_8k.trainImages.txt`` → ``"train"``.

    Takes the last dot-separated part of the stem, drops a trailing ``Images`` and lowercases;
    falls back to the whole stem (``my_split.txt`` → ``"my_split"``).
    """
    stem = Path(split_file).stem
    last_part = stem.rsplit(".", 1)[-1]
    name = re.sub(r"images$", "", last_part, flags=re.IGNORECASE).lower()
    return name or stem


def _check_split_images_have_captions(
    images: set[str], records: list[Caption], split_file: Path
) -> None:
    missing = sorted(images - {r.group_id for r in records})
    if missing:
        raise ValueError(
            f"{split_file}: {len(missing)} listed images have no captions, e.g. {missing[:3]}"
        )


# --------------------------------------------------------------------------------------------
# Cleaning
# --------------------------------------------------------------------------------------------

_DROP_REASONS = ("empty", "no_letter_or_digit", "too_long", "duplicate", "undecodable")


def normalize_whitespace(text: str) -> str:
    """Strip, and collapse every run of whitespace (spaces, tabs, newlines, any Unicode
    whitespace) to one space."""
    return " ".join(text.split())


def clean_captions(
    captions: CaptionFile | Iterable[Caption],
    max_words: int | None = 15,
    deduplicate: bool = True,
) -> tuple[list[Caption], dict]:
    """Clean a corpus: normalise whitespace; drop empty captions, captions with no letter or
    digit, and optionally over-long and repeated ones.

    Each caption's text is whitespace-normalised (:func:`normalize_whitespace`), then it is
    dropped, checking in this order, if it is

    - ``empty``;
    - ``no_letter_or_digit``: not one character is a letter or digit (``str.isalnum``, any
      script): punctuation only (``"..."``, ``"!!! ???"``), or invisible format characters
      such as a zero-width space U+200B (not whitespace, so not removed by normalisation);
    - ``too_long``: more than ``max_words`` words (split on whitespace); ``max_words=None``
      sets no cap. (The default 15 is SynTIC's filter of its SS1M corpus; the papers' other
      corpora are not length-filtered.)
    - ``duplicate``: with ``deduplicate``, the same normalised text was already kept (exact,
      case-sensitive match: ``"A dog."`` and ``"a dog."`` are both kept; the first occurrence
      wins). ``deduplicate=False`` keeps repeated captions.

    Kept records carry the normalised text.

    ``captions`` is a :class:`CaptionFile` (its undecodable lines are then reported too) or any
    iterable of :class:`Caption`.

    Returns ``(kept, report)``; ``report`` is JSON-able and has every reason, a reason that is
    switched off counting 0::

        {"read": n, "kept": n,
         "dropped": {"empty": n, "no_letter_or_digit": n, "too_long": n, "duplicate": n,
                     "undecodable": n},
         "examples": {reason: [up to 5 caption ids, or "file:line" for undecodable]}}

    ``read`` counts the records plus the undecodable lines, so
    ``read == kept + sum(dropped.values())``.
    """
    if max_words is not None and (
        isinstance(max_words, bool) or not isinstance(max_words, int) or max_words < 1
    ):
        raise ValueError(f"max_words must be None or a positive integer, got {max_words!r}")
    if not isinstance(deduplicate, bool):
        raise ValueError(f"deduplicate must be True or False, got {deduplicate!r}")
    if isinstance(captions, CaptionFile):
        records, undecodable = captions.records, captions.undecodable
    else:
        records, undecodable = list(captions), []

    dropped: dict[str, list[str]] = {reason: [] for reason in _DROP_REASONS}
    dropped["undecodable"] = list(undecodable)
    kept: list[Caption] = []
    kept_texts: set[str] | None = set() if deduplicate else None
    for record in records:
        text = normalize_whitespace(record.text)
        reason = _drop_reason(text, max_words, kept_texts)
        if reason:
            dropped[reason].append(record.caption_id)
            continue
        if kept_texts is not None:
            kept_texts.add(text)
        kept.append(record if text == record.text else dataclasses.replace(record, text=text))
    return kept, _cleaning_report(len(records) + len(undecodable), len(kept), dropped)


def _drop_reason(text: str, max_words: int | None, kept_texts: set[str] | None) -> str | None:
    if not text:
        return "empty"
    if not any(character.isalnum() for character in text):
        return "no_letter_or_digit"
    if max_words is not None and len(text.split(" ")) > max_words:
        return "too_long"
    if kept_texts is not None and text in kept_texts:
        return "duplicate"
    return None


def _cleaning_report(read: int, kept: int, dropped: dict[str, list[str]]) -> dict:
    return {
        "read": read,
        "kept": kept,
        "dropped": {reason: len(ids) for reason, ids in dropped.items()},
        "examples": {reason: ids[:_MAX_EXAMPLES] for reason, ids in dropped.items()},
    }
