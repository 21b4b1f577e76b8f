"""Encode throughput: decoding on a background thread (the pipeline) vs decode-then-encode in one thread.

    .venv/bin/python bench/encode_overlap.py [--images 256] [--batch 32]

Uses real Flickr8k photos from ../shared/data and the offline profile's CLIP; prints both timings and
their ratio (baseline / pipeline; > 1 means the overlap pays).
"""
import argparse
import time
from pathlib import Path

import pyarrow as pa
import torch

from pipeline.extract.encode import _decode, encode_image_table
from pipeline.models.clip import load_clip

PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k" / "images"


def sequential(images: pa.Table, clip, batch: int) -> None:
    blobs, ids = images.column("image").to_pylist(), images.column("image_id").to_pylist()
    for s in range(0, len(blobs), batch):
        clip.encode_pixels(_decode(clip, blobs[s:s + batch], ids[s:s + batch]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--clip", default="synthcap-tiny-vit")
    args = ap.parse_args()
    files = sorted(PHOTOS.glob("*.jpg"))[:args.images]
    images = pa.table({"image_id": [f.name for f in files], "image": [f.read_bytes() for f in files]})
    clip = load_clip(args.clip, seed=0)
    torch.set_num_threads(max(1, torch.get_num_threads() - 1))  # leave a core to the decoder thread
    sequential(images.slice(0, args.batch), clip, args.batch)  # warm up
    t0 = time.perf_counter(); sequential(images, clip, args.batch); base = time.perf_counter() - t0
    t0 = time.perf_counter(); encode_image_table(images, clip, "image_id", args.batch, "float16")
    piped = time.perf_counter() - t0
    print(f"{len(files)} photos, batch {args.batch}, CLIP {args.clip}")
    print(f"  baseline (decode, then encode, one thread): {base:.2f} s  ({len(files) / base:.1f} img/s)")
    print(f"  pipeline (decode overlapped with encode):   {piped:.2f} s  ({len(files) / piped:.1f} img/s)")
    print(f"  speed-up: {base / piped:.2f}x")


if __name__ == "__main__":
    main()
