"""CLIP features of images (global, projected patches, the raw patch grid, CLS attention, the last layer's
attention map: the columns asked for) and of texts, as Arrow tables.

Images are decoded by the one decoder (pipeline/data/images.py) and resized and cropped by CLIP's own
transform, one by one; the float work of that transform (to [0, 1], mean/std normalisation) runs once per
batch in numpy, giving the same pixels as CLIP's per-image transform (torch's per-image ops are slow on
small tensors with several threads). Decoding of batch i+1 overlaps with CLIP encoding batch i only where
it pays (``overlap_pays``: on a GPU, or when torch leaves a CPU core free; bench/encode.py measures it).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from pipeline.models.clip import IMAGE_COLUMNS, ClipEncoder
from pipeline.data.images import ImageError, decode_image, skip_reason
from pipeline.data.shards import feature_array



def _split_transform(preprocess) -> tuple[list, np.ndarray, np.ndarray] | None:
    """CLIP's transform as (its PIL steps, mean, std) when it ends in ToTensor + Normalize, else None."""
    steps = list(getattr(preprocess, "transforms", ()))
    names = [type(t).__name__ for t in steps[-2:]]
    if names != ["MaybeToTensor", "Normalize"] and names != ["ToTensor", "Normalize"]:
        return None
    mean, std = (np.asarray(v, np.float32).reshape(3, 1, 1) for v in (steps[-1].mean, steps[-1].std))
    return steps[:-2], mean, std


def _decode(clip: ClipEncoder, blobs: Sequence[bytes], ids: Sequence[str]) -> torch.Tensor:
    """CLIP pixels [B, 3, H, W] of each image, decoded by the one decoder every stage uses (8-bit RGB,
    alpha on white, EXIF orientation), exactly as ``clip.preprocess`` makes them. These images come from
    our own stages, so one that cannot be decoded is an error naming it, never a skip."""
    images = []
    for blob, item in zip(blobs, ids):
        try:
            images.append(decode_image(blob))
        except ImageError as err:
            raise ValueError(f"image {item!r} cannot be decoded: {skip_reason(err)}") from err
    split = _split_transform(clip.preprocess)
    if split is None:
        return torch.stack([clip.preprocess(image) for image in images])
    pil_steps, mean, std = split
    arrays = []
    for image in images:
        for step in pil_steps:
            image = step(image)
        arrays.append(np.asarray(image, dtype=np.uint8))
    pixels = np.stack(arrays).transpose(0, 3, 1, 2).astype(np.float32) / 255    # ToTensor
    return torch.from_numpy((pixels - mean) / std)                               # Normalize


def overlap_pays(clip: ClipEncoder) -> bool:
    """Decode on a thread beside CLIP only where a core is free for it: CLIP on a GPU, or torch's
    intra-op threads fewer than this process's CPU cores (on a CPU that torch keeps busy, a decoding
    thread only competes with it: bench/encode.py)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return not str(clip.device).startswith("cpu") or cores > torch.get_num_threads()


def _pixel_batches(clip: ClipEncoder, blobs: list[bytes], ids: list[str], batch_size: int,
                   overlap: bool) -> Iterator[torch.Tensor]:
    starts = list(range(0, len(blobs), batch_size))
    if not overlap:
        for s in starts:
            yield _decode(clip, blobs[s:s + batch_size], ids[s:s + batch_size])
        return
    with ThreadPoolExecutor(max_workers=1) as pool:        # one batch ahead: memory O(batch)
        future = pool.submit(_decode, clip, blobs[:batch_size], ids[:batch_size]) if starts else None
        for i, start in enumerate(starts):
            pixels = future.result()
            if i + 1 < len(starts):
                nxt = starts[i + 1]
                future = pool.submit(_decode, clip, blobs[nxt:nxt + batch_size], ids[nxt:nxt + batch_size])
            yield pixels


def encode_image_table(images: pa.Table, clip: ClipEncoder, id_column: str, batch_size: int,
                       dtype: str, columns: Sequence[str] = IMAGE_COLUMNS, overlap: bool | None = None) -> pa.Table:
    """images (id, image bytes) -> id and the ``columns`` asked for (pipeline/models/clip.py): global [D],
    patches [Np*D], grid [Np*W], cls_attention [Np], attention [(Np+1)*(Np+1)], each a fixed-size list a row.
    ``overlap``: decode on a background thread (None: where it pays, ``overlap_pays``)."""
    columns = tuple(columns)
    ids = images.column(id_column).to_pylist()
    blobs = images.column("image").to_pylist()
    parts: dict[str, list[np.ndarray]] = {key: [] for key in columns}
    overlap = overlap_pays(clip) if overlap is None else overlap
    batches = _pixel_batches(clip, blobs, ids, batch_size, overlap)
    for pixels in tqdm(batches, total=-(-len(ids) // batch_size), desc="  images", unit="batch", leave=False):
        out = clip.encode_pixels(pixels, columns)
        for key in parts:
            parts[key].append(out[key].reshape(len(pixels), -1))
    empty = {"global": clip.dim, "patches": 0, "grid": 0, "cls_attention": 0, "attention": 0}
    table = {key: feature_array(np.concatenate(v) if v else np.zeros((0, empty[key]), np.float32), dtype)
             for key, v in parts.items()}
    return pa.table({id_column: ids, **table})


def encode_text_table(captions: pa.Table, clip: ClipEncoder, batch_size: int, dtype: str) -> pa.Table:
    """captions (caption_id, text) -> caption_id, text_feature [D]."""
    ids = captions.column("caption_id").to_pylist()
    texts = captions.column("text").to_pylist()
    return pa.table({"caption_id": ids, "text_feature": feature_array(clip.encode_texts(texts, batch_size), dtype)})


def patch_grid(clip: ClipEncoder, columns: Sequence[str] = IMAGE_COLUMNS) -> dict:
    """Shape facts written beside the image features so readers can unflatten them: N_p and D, the
    ``grid_dim`` W when the raw ``grid`` is among ``columns``, and ``num_tokens`` = N_p + 1 (CLS first)
    when the ``attention`` map is."""
    visual = clip.model.visual
    if hasattr(visual, "attnpool"):          # a ResNet CLIP: the attention pool's grid (image size / 32)
        side = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
        grid = (side // 32, side // 32)
        width = visual.attnpool.k_proj.in_features           # the grid's channels C
    else:
        grid = visual.grid_size if hasattr(visual, "grid_size") else None
        width = visual.conv1.out_channels                     # the tower's width W
    num_patches = int(grid[0] * grid[1]) if grid else None
    facts = {"num_patches": num_patches, "dim": clip.dim}
    if "grid" in columns:
        facts["grid_dim"] = int(width)
    if "attention" in columns and num_patches:
        facts["num_tokens"] = num_patches + 1
    return facts
