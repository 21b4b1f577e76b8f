"""Encode throughput: the pipeline's image and text paths vs the bare batched forward and a one-item loop.

    .venv/bin/python -m bench.encode [--device cpu] [--quick]

Images: real Flickr8k JPEGs (../shared/data) through ``encode_image_table`` (decode, CLIP's transform,
the columns of a synthetic image) vs (a) ``model.encode_image`` on pre-decoded batches, the ceiling, and
(b) one image at a time (decode, transform, forward), what the reference repositories do. Texts: real
captions through ``encode_text_table`` vs (a) ``model.encode_text`` on pre-tokenised batches and (b) one
caption at a time. The one-item loops run at torch's thread count and at one thread; the faster is the
baseline. Also measured: decoding on a thread beside CLIP (the thread budget split) and the cost of the
attention columns real images get. The CLIP is the ``ViT-B-32`` architecture with random weights (speed
does not depend on the weights; ``--quick``: the tiny CLIP).
"""
from __future__ import annotations

import pyarrow as pa
import torch

from bench.common import PHOTOS, Figure, best_time, main, real_captions
from pipeline.data.images import decode_image
from pipeline.extract.encode import _decode, encode_image_table, encode_text_table, overlap_pays
from pipeline.models.clip import load_clip

# The columns the offline profile's instances read (encode.synthetic_columns / encode.eval_columns): the
# synthetic images' (global + patches) and the real images' (MacCap's attention columns too)
SYNTHETIC_COLUMNS = ("global", "patches")
REAL_IMAGE_COLUMNS = ("global", "patches", "cls_attention", "attention")


def at_threads(n: int, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


def run(device: str = "cpu", quick: bool = False) -> list[Figure]:
    arch = "synthcap-tiny-vit" if quick else "ViT-B-32"
    n_img, n_txt, loop_img, loop_txt, batch = (16, 32, 4, 4, 8) if quick else (128, 128, 24, 16, 32)
    clip = load_clip(arch, seed=0, device=device)
    threads = torch.get_num_threads()
    where = f"{arch} (random weights) on {device}, {threads} torch threads"
    figures = []
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    # ---- images ------------------------------------------------------------------------------
    files = sorted(PHOTOS.glob("*.jpg"))[:n_img]
    if len(files) < n_img:
        raise FileNotFoundError(f"need {n_img} Flickr8k photos in {PHOTOS}")
    images = pa.table({"image_id": [f.name for f in files], "image": [f.read_bytes() for f in files]})
    blobs = images.column("image").to_pylist()

    def pipeline(overlap=None, columns=SYNTHETIC_COLUMNS):
        encode_image_table(images, clip, "image_id", batch, "float16", columns, overlap=overlap)
        sync()

    ids = images.column("image_id").to_pylist()
    pixels = _decode(clip, blobs, ids).to(device)
    t_decode = best_time(lambda: _decode(clip, blobs, ids), 1)             # decode + transform alone, on the CPU

    @torch.no_grad()
    def bare():
        for s in range(0, n_img, batch):
            clip.model.encode_image(pixels[s:s + batch])
        sync()

    @torch.no_grad()
    def loop():
        for blob in blobs[:loop_img]:
            clip.model.encode_image(clip.preprocess(decode_image(blob))[None].to(device))
        sync()

    encode_image_table(images.slice(0, batch), clip, "image_id", batch, "float16", SYNTHETIC_COLUMNS)   # warm up
    t_pipe, t_bare = best_time(pipeline), best_time(bare)
    t_loop = min(best_time(loop, 1), at_threads(1, lambda: best_time(loop, 1)))
    rate, ceiling, per_item = n_img / t_pipe, n_img / t_bare, loop_img / t_loop
    cond = f"{n_img} Flickr8k JPEGs, batch {batch}, {where}; decode+transform alone {1000 * t_decode / n_img:.1f} ms/img"
    figures.append(Figure("encode images: pipeline vs bare batched forward", rate, ceiling, rate / ceiling, "img/s",
                          cond + "; bare = encode_image on pre-decoded pixels", "≥ 0.85×", rate / ceiling >= 0.85))
    figures.append(Figure("encode images: pipeline vs one-image loop", rate, per_item, rate / per_item, "img/s",
                          cond + f"; loop = decode+transform+forward per image ({loop_img} images, best of "
                          f"{threads} and 1 thread)", "≥ 5×", rate / per_item >= 5))

    # decode thread: the rule's choice vs the other, and torch one thread short with a decode thread
    chosen = overlap_pays(clip)
    t_other = best_time(lambda: pipeline(overlap=not chosen), 1)
    options = {f"{'thread' if chosen else 'inline'} decode, {threads} torch threads": t_pipe,
               f"{'inline' if chosen else 'thread'} decode, {threads} torch threads": t_other}
    if threads > 1 and not device.startswith("cuda"):
        options[f"thread decode, {threads - 1} torch threads"] = at_threads(
            threads - 1, lambda: best_time(lambda: pipeline(overlap=True), 1))
    best_other = min(t for k, t in options.items() if k != next(iter(options)))
    figures.append(Figure("decode overlap: the rule's choice vs the best other split", n_img / t_pipe,
                          n_img / best_other, best_other / t_pipe, "img/s",
                          "; ".join(f"{k}: {n_img / t:.1f} img/s" for k, t in options.items()), "≥ 0.95×",
                          best_other / t_pipe >= 0.95))

    @torch.no_grad()
    def columns(cols):
        for s in range(0, n_img, batch):
            clip.encode_pixels(pixels[s:s + batch], cols)
        sync()

    t_real, t_syn = best_time(lambda: columns(REAL_IMAGE_COLUMNS), 1), best_time(lambda: columns(SYNTHETIC_COLUMNS), 1)
    figures.append(Figure("attention columns: real-image vs synthetic-image columns", n_img / t_real, n_img / t_syn,
                          t_syn / t_real, "img/s", f"pre-decoded pixels, {where}; the CLS attention and attention "
                          "map cost one extra pass of the last block, for real (eval) images only", ""))

    # ---- texts -------------------------------------------------------------------------------
    texts = real_captions(n_txt)
    captions = pa.table({"caption_id": [str(i) for i in range(n_txt)], "text": texts})
    tokens = clip.tokenizer(texts).to(device)

    @torch.no_grad()
    def bare_text():
        for s in range(0, n_txt, batch):
            clip.model.encode_text(tokens[s:s + batch])
        sync()

    @torch.no_grad()
    def loop_text():
        for text in texts[:loop_txt]:
            clip.model.encode_text(clip.tokenizer([text]).to(device))
        sync()

    def pipeline_text():
        encode_text_table(captions, clip, batch, "float16")
        sync()

    encode_text_table(captions.slice(0, batch), clip, batch, "float16")                        # warm up
    t_pipe, t_bare = best_time(pipeline_text), best_time(bare_text)
    t_loop = min(best_time(loop_text, 1), at_threads(1, lambda: best_time(loop_text, 1)))
    rate, ceiling, per_item = n_txt / t_pipe, n_txt / t_bare, loop_txt / t_loop
    cond = f"{n_txt} real captions, batch {batch}, {where}"
    figures.append(Figure("encode texts: pipeline vs bare batched forward", rate, ceiling, rate / ceiling, "cap/s",
                          cond + "; bare = encode_text on pre-tokenised 77-token batches", "≥ 0.85×",
                          rate / ceiling >= 0.85))
    figures.append(Figure("encode texts: pipeline vs one-caption loop", rate, per_item, rate / per_item, "cap/s",
                          cond + f"; loop = tokenise+forward per caption ({loop_txt} captions, best of {threads} "
                          "and 1 thread)", "≥ 5×", rate / per_item >= 5))
    return figures


if __name__ == "__main__":
    main(run, __doc__)
