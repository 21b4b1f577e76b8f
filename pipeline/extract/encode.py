"""CLIP features of images (global, projected patches, CLS attention, the last layer's attention map) and
of texts, as Arrow tables.

Image decoding and preprocessing of batch i+1 run on a background thread while CLIP encodes batch i.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from pipeline.models.clip import IMAGE_COLUMNS, ClipEncoder
from pipeline.data.images import ImageError, decode_image, skip_reason
from pipeline.data.shards import feature_array


def _decode(clip: ClipEncoder, blobs: Sequence[bytes], ids: Sequence[str]) -> torch.Tensor:
    """CLIP pixels of each image, decoded by the one decoder every stage uses (8-bit RGB,
    alpha on white, EXIF orientation). These images come from our own stages, so one that
    cannot be decoded is an error naming it, never a skip."""
    pixels = []
    for blob, item in zip(blobs, ids):
        try:
            image = decode_image(blob)
        except ImageError as err:
            raise ValueError(f"image {item!r} cannot be decoded: {skip_reason(err)}") from err
        pixels.append(clip.preprocess(image))
    return torch.stack(pixels)


def _prefetched_pixels(clip: ClipEncoder, blobs: list[bytes], ids: list[str], batch_size: int) -> Iterator[torch.Tensor]:
    starts = list(range(0, len(blobs), batch_size))
    with ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(_decode, clip, blobs[:batch_size], ids[:batch_size]) if starts else None
        for i, start in enumerate(starts):
            pixels = future.result()
            if i + 1 < len(starts):
                nxt = starts[i + 1]
                future = pool.submit(_decode, clip, blobs[nxt:nxt + batch_size], ids[nxt:nxt + batch_size])
            yield pixels


def encode_image_table(images: pa.Table, clip: ClipEncoder, id_column: str, batch_size: int,
                       dtype: str, columns: Sequence[str] = IMAGE_COLUMNS) -> pa.Table:
    """images (id, image bytes) -> id and the ``columns`` asked for (pipeline/models/clip.py): global [D],
    patches [Np*D], cls_attention [Np], attention [(Np+1)*(Np+1)], each a fixed-size list a row."""
    columns = tuple(columns)
    ids = images.column(id_column).to_pylist()
    blobs = images.column("image").to_pylist()
    parts: dict[str, list[np.ndarray]] = {key: [] for key in columns}
    batches = _prefetched_pixels(clip, blobs, ids, batch_size)
    for pixels in tqdm(batches, total=-(-len(ids) // batch_size), desc="  images", unit="batch", leave=False):
        out = clip.encode_pixels(pixels, columns)
        for key in parts:
            parts[key].append(out[key].reshape(len(pixels), -1))
    empty = {"global": clip.dim, "patches": 0, "cls_attention": 0, "attention": 0}
    table = {key: feature_array(np.concatenate(v) if v else np.zeros((0, empty[key]), np.float32), dtype)
             for key, v in parts.items()}
    return pa.table({id_column: ids, **table})


def encode_text_table(captions: pa.Table, clip: ClipEncoder, batch_size: int, dtype: str) -> pa.Table:
    """captions (caption_id, text) -> caption_id, text_feature [D]."""
    ids = captions.column("caption_id").to_pylist()
    texts = captions.column("text").to_pylist()
    return pa.table({"caption_id": ids, "text_feature": feature_array(clip.encode_texts(texts, batch_size), dtype)})


def patch_grid(clip: ClipEncoder, columns: Sequence[str] = IMAGE_COLUMNS) -> dict:
    """Shape facts written beside the image features so readers can unflatten them: N_p and D, and
    ``num_tokens`` = N_p + 1 (CLS first) when the ``attention`` map is among ``columns``."""
    visual = clip.model.visual
    grid = visual.grid_size if hasattr(visual, "grid_size") else None
    num_patches = int(grid[0] * grid[1]) if grid else None
    facts = {"num_patches": num_patches, "dim": clip.dim}
    if "attention" in columns and num_patches:
        facts["num_tokens"] = num_patches + 1
    return facts
