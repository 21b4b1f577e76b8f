"""Captioning the user's own photos with the trained method instances (``synthcap caption``).

Nothing is re-chosen: the photos are encoded with the CLIP model the method was trained on (loaded
from the identity its checkpoint records, weights hash checked), tagged with the detector the
pipeline's tags were made with (the identity the tag artifact records) at the pipeline's threshold,
and captioned through the runner's own captioning path, with the support set, tag vocabulary and
concept vocabulary of the artifacts. A method trained on another CLIP than the artifacts' is refused.
An unreadable photo is skipped with its reason.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import pyarrow as pa

from pipeline import config as cfg
from pipeline import methods, paths, runner
from pipeline.data.images import ImageError, decode_image, skip_reason
from pipeline.data.shards import ShardedArtifact, describe_model, require_same_model, write_sharded
from pipeline.extract.encode import encode_image_table, patch_grid
from pipeline.extract.tag import tag_table
from pipeline.models.clip import clip_from_identity
from pipeline.models.detector import detector_for
from pipeline.models import weights_sha256

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
LIST_SUFFIXES = {".txt", ".lst"}


@dataclass
class Photos:
    ids: list[str] = field(default_factory=list)          # the paths as given
    blobs: list[bytes] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # path -> reason


def collect(specs: list[str]) -> list[Path]:
    """Image files, folders (recursively: their image files, sorted) and text files listing paths."""
    out: list[Path] = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            out += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.suffix.lower() in LIST_SUFFIXES and path.is_file():
            lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
            out += [(path.parent / line) if not Path(line).is_absolute() else Path(line) for line in lines if line]
        else:
            out.append(path)
    return out


def load(paths_: list[Path], max_pixels: int) -> Photos:
    photos = Photos()
    for path in paths_:
        key = str(path)
        if not path.is_file():
            photos.skipped[key] = "missing"
            continue
        data = path.read_bytes()
        try:
            decode_image(data, max_pixels=max_pixels)
        except ImageError as err:
            photos.skipped[key] = skip_reason(err)
            continue
        photos.ids.append(key)
        photos.blobs.append(data)
    return photos


def _write(folder: Path, table: pa.Table, meta: dict) -> ShardedArtifact:
    write_sharded(folder, table.num_rows, max(table.num_rows, 1), "photos", lambda task: table, meta)
    return ShardedArtifact(folder)


def trained(name: str) -> bool:
    return (paths.model(name) / runner.MODEL_FILE).is_file()


def caption_photos(config: cfg.Config, names: list[str], photos: Photos, beam_size: int | None = None,
                   batch_size: int = 64) -> tuple[dict[str, dict[str, str]], dict[str, list[str]]]:
    """({method instance: {photo: caption}}, {photo: detector tags}) for the trained instances ``names``."""
    device = config.device
    headers = {name: runner.checkpoint_header(paths.model(name) / runner.MODEL_FILE) for name in names}
    artifacts_clip = ShardedArtifact(paths.TEXT_FEATURES).model
    for name, header in headers.items():
        try:
            require_same_model(**{"artifacts": artifacts_clip, f"model_{name}": header["clip_model"]})
        except ValueError as err:
            raise ValueError(f"{err}: retrain it (`dvc repro train@{name}`) or restore the artifacts it was trained "
                             f"on") from None
    clip = clip_from_identity(artifacts_clip, device)
    tags_meta = ShardedArtifact(paths.SYNTHETIC_TAGS).meta
    d = tags_meta["model"]
    detector = detector_for(d["name"], d.get("pretrained"), d.get("seed") or 0, device)
    if weights_sha256(detector.model) != d.get("weights_sha256"):
        raise ValueError(f"the detector loads as other weights than the {describe_model(d)} the tags were made with")
    table = pa.table({"image_id": photos.ids, "image": photos.blobs})
    columns = methods.image_columns([config.methods[name] for name in names], "image")   # what these instances read
    with tempfile.TemporaryDirectory(prefix="synthcap-photos-") as tmp:
        features = _write(Path(tmp) / "features", encode_image_table(
            table, clip, "image_id", config.encode.batch_size, config.feature_dtype, columns),
            {"model": clip.identity, "dtype": config.feature_dtype, **patch_grid(clip, columns)})
        tags = _write(Path(tmp) / "tags", tag_table(table, detector, "image_id", tags_meta["threshold"],
                                                    config.tag.max_tags, config.tag.batch_size,
                                                    draft_size=detector.input_size),
                      {"model": detector.identity, "threshold": tags_meta["threshold"]})
        out = {}
        for name in names:
            model, header = runner.load_checkpoint(paths.model(name) / runner.MODEL_FILE, device)
            instance = config.methods[name]
            caption = instance.caption
            if beam_size is not None and hasattr(caption, "beam_size"):
                caption = replace(caption, beam_size=beam_size)
            module = methods.get(header["method"])
            inputs = runner.Inputs(module.needs(header["train"], caption), device, evalset="photos",
                                   artifacts={"image": features, "image_tags": tags})
            out[name] = runner.caption_shards(model, header, caption, inputs, progress=len(photos.ids) > batch_size)
            out[name] = {i: out[name][i] for i in photos.ids}
        labels = dict(zip(tags.read_column("image_id").to_pylist(), tags.read_column("labels").to_pylist()))
    return out, labels
