"""Synthetic images: one text-to-image sample per corpus caption, stored as encoded bytes in shards.
A model that records the scene it drew (the world's, ``image.info["scene"]``) adds a ``scene`` column:
the ground truth of each image, which the checker compares with its caption.

Image i depends only on (caption i, its seed), where the seed is a hash of the run's base seed and the
caption id, so sharding, crashes and the executor never change a pixel. The batch size can, by one level:
on some CPUs a batched UNet's float sums differ in the last bit from one image's, so
``generate.batch_size`` is a parameter of the stage, not a speed-only setting.
"""
from __future__ import annotations

import hashlib
import io

import pyarrow as pa
from PIL import Image
from tqdm.auto import tqdm

from pipeline.models.diffusion import TextToImage

IMAGE_SCHEMA = pa.schema([("caption_id", pa.string()), ("text", pa.string()), ("seed", pa.int64()),
                          ("image", pa.binary()), ("width", pa.int32()), ("height", pa.int32())])


def caption_seed(base_seed: int, caption_id: str) -> int:
    """A 63-bit seed that belongs to one caption."""
    digest = hashlib.sha256(f"{base_seed}:{caption_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def encode_image(image: Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    if image_format == "png":
        image.save(buffer, format="PNG", optimize=False)
    elif image_format == "jpeg":
        image.convert("RGB").save(buffer, format="JPEG", quality=95)
    else:
        raise ValueError(f"image_format must be png or jpeg, got {image_format!r}")
    return buffer.getvalue()


def generate_table(captions: pa.Table, model: TextToImage, steps: int, guidance_scale: float,
                   batch_size: int, base_seed: int, image_format: str) -> pa.Table:
    """captions (caption_id, text) -> one row per caption with its generated image."""
    ids = captions.column("caption_id").to_pylist()
    texts = captions.column("text").to_pylist()
    seeds = [caption_seed(base_seed, cid) for cid in ids]
    images: list[bytes] = []
    sizes: list[tuple[int, int]] = []
    scenes: list[str | None] = []
    for start in tqdm(range(0, len(ids), batch_size), desc="  images", unit="batch", leave=False):
        batch = model.generate(texts[start:start + batch_size], seeds[start:start + batch_size], steps, guidance_scale)
        images += [encode_image(im, image_format) for im in batch]
        sizes += [im.size for im in batch]
        scenes += [im.info.get("scene") for im in batch]
    columns = {"caption_id": ids, "text": texts, "seed": seeds, "image": images,
               "width": [w for w, _ in sizes], "height": [h for _, h in sizes]}
    if any(s is not None for s in scenes):     # a model that knows what it drew (the world's): keep it
        return pa.table({**columns, "scene": scenes}, schema=IMAGE_SCHEMA.append(pa.field("scene", pa.string())))
    return pa.table(columns, schema=IMAGE_SCHEMA)
