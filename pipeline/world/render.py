"""Drawing a scene, in one of two styles that stand in for the real/synthetic domain gap.

- ``photo`` (the "real" domain: eval images, CLIP's and the detector's training images): a textured
  gradient background, shaded objects with jittered colours, slight blur, sensor noise and a JPEG round
  trip.
- ``synthetic`` (the text-to-image model's domain): a flat light canvas, flat palette colours with a
  dark outline, no noise.

The picture depends only on the scene and the style: the scene's ``background`` seeds every random
choice, so a scene always renders to the same bytes. Shapes are drawn at 4x and reduced (anti-aliasing).
``render_scenes`` renders many (in processes), ``draw_styles`` gives a model's training images their
styles (the world CLIP's and detector's synthetic share).
"""
from __future__ import annotations

import io
import logging
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pipeline.world.scenes import Scene, WorldObject

STYLES = ("photo", "synthetic")
PALETTE = {"red": (210, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 210), "yellow": (230, 210, 40),
           "purple": (130, 60, 180), "orange": (240, 130, 30), "white": (240, 240, 240)}
RADIUS = {"small": 0.09, "large": 0.14}       # of the image side
SUPERSAMPLE = 4


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Outline of ``shape`` centred at (cx, cy) with radius r (circles are drawn as ellipses)."""
    if shape == "square":
        h = 0.8 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + 0.15 * r + r * math.sin(a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        return [(cx + (r if k % 2 == 0 else 0.45 * r) * math.cos(-math.pi / 2 + k * math.pi / 5),
                 cy + (r if k % 2 == 0 else 0.45 * r) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    if shape == "heart":
        pts = []
        for k in range(40):
            t = 2 * math.pi * k / 40
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + r * x / 17, cy - r * (y + 2) / 17))
        return pts
    if shape == "cross":
        a, w = r, 0.32 * r
        return [(cx - w, cy - a), (cx + w, cy - a), (cx + w, cy - w), (cx + a, cy - w), (cx + a, cy + w),
                (cx + w, cy + w), (cx + w, cy + a), (cx - w, cy + a), (cx - w, cy + w), (cx - a, cy + w),
                (cx - a, cy - w), (cx - w, cy - w)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.65 * r, cy), (cx, cy + r), (cx - 0.65 * r, cy)]
    raise ValueError(f"unknown shape {shape!r}")


def _draw_shape(draw: ImageDraw.ImageDraw, o: WorldObject, side: int, fill, outline=None, width: int = 0):
    cx, cy, r = o.x * side, o.y * side, RADIUS[o.size] * side
    if o.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=outline, width=width)
    else:
        draw.polygon(_polygon(o.shape, cx, cy, r), fill=fill, outline=outline, width=width)


def object_box(o: WorldObject, size: int) -> list[float]:
    """[x0, y0, x1, y1] in pixels: the box a detector should find."""
    r = RADIUS[o.size] * size
    return [max(0.0, o.x * size - r), max(0.0, o.y * size - r), min(size, o.x * size + r), min(size, o.y * size + r)]


def render(scene: Scene, style: str = "photo", size: int = 64) -> Image.Image:
    """The scene as an RGB image of ``size`` x ``size`` pixels in ``style`` (module docstring)."""
    if style not in STYLES:
        raise ValueError(f"unknown style {style!r} (known: {', '.join(STYLES)})")
    rng = np.random.default_rng(scene.background)
    big = size * SUPERSAMPLE
    if style == "synthetic":
        canvas = Image.new("RGB", (big, big), (236, 234, 226))
        draw = ImageDraw.Draw(canvas)
        for o in scene.objects:
            _draw_shape(draw, o, big, PALETTE[o.colour], outline=(30, 30, 30), width=SUPERSAMPLE)
        return canvas.resize((size, size), Image.Resampling.LANCZOS)
    return _photo(scene, size, rng)


def _photo(scene: Scene, size: int, rng: np.random.Generator) -> Image.Image:
    big = size * SUPERSAMPLE
    # background: a gradient between two muted (greyish) colours, with a low-frequency texture
    c0, c1 = (rng.uniform(35, 115) + rng.uniform(-15, 15, 3) for _ in range(2))
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size] / size
    t = (np.cos(angle) * xx + np.sin(angle) * yy)
    t = (t - t.min()) / max(t.max() - t.min(), 1e-6)
    background = c0 * (1 - t[..., None]) + c1 * t[..., None]
    texture = np.asarray(Image.fromarray(rng.normal(0, 1, (8, 8)).astype(np.float32), mode="F")
                         .resize((size, size), Image.Resampling.BICUBIC))
    background = background + 12 * texture[..., None]
    image = np.asarray(Image.fromarray(np.clip(background, 0, 255).astype(np.uint8)).resize(
        (big, big), Image.Resampling.BILINEAR), np.float64)
    # objects: jittered colour, lit from the upper left; each blended within its own box only
    for o in scene.objects:
        mask_image = Image.new("L", (big, big), 0)
        _draw_shape(ImageDraw.Draw(mask_image), o, big, 255)
        colour = np.clip(np.asarray(PALETTE[o.colour], np.float32) + rng.normal(0, 10, 3), 0, 255)
        box = mask_image.getbbox()
        if box is None:
            continue
        rows, cols = slice(box[1], box[3]), slice(box[0], box[2])
        mask = np.asarray(mask_image.crop(box), np.float32)[..., None] / 255
        r = RADIUS[o.size] * big
        xx = np.arange(box[0], box[2], dtype=np.float32)[None, :]       # pixel coordinates within the box
        yy = np.arange(box[1], box[3], dtype=np.float32)[:, None]
        dist = np.hypot(xx - (o.x * big - 0.4 * r), yy - (o.y * big - 0.4 * r)) / (2 * r)
        shade = np.clip(1.15 - 0.45 * dist, 0.6, 1.15)[..., None]
        image[rows, cols] = image[rows, cols] * (1 - mask) + np.clip(colour * shade, 0, 255) * mask
    picture = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).resize((size, size), Image.Resampling.LANCZOS)
    picture = picture.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 0.7))))
    noisy = np.asarray(picture, np.float32) + rng.normal(0, 5, (size, size, 3))
    picture = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=int(rng.integers(75, 92)))
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def draw_styles(rng: np.random.Generator, n: int, synthetic_share: float, group: int = 1) -> list[str]:
    """The styles of ``n`` training images: each run of ``group`` images (e.g. a scene and its shape twin)
    is "synthetic" with probability ``synthetic_share`` (one draw of ``rng`` per run), else "photo"."""
    if not 0.0 <= synthetic_share <= 1.0:
        raise ValueError(f"synthetic_share is a share of the images, in [0, 1]; got {synthetic_share}")
    return [style for _ in range(n // group)
            for style in ["synthetic" if rng.random() < synthetic_share else "photo"] * group]


def _render(args: tuple[Scene, str, int]) -> np.ndarray:
    scene, style, size = args
    return np.asarray(render(scene, style, size))


def render_scenes(scenes: Sequence[Scene], size: int, workers: int = 1,
                  styles: Sequence[str] | None = None) -> list[Image.Image]:
    """The scenes in the photo style (or each in its own of ``styles``), rendered by ``workers`` processes
    (a scene always renders to the same bytes, so the result does not depend on ``workers``). The processes
    are spawned, never forked: the caller may have torch's OpenMP threads and a stage's orphan watch
    running, and a fork of a threaded process may hang its child. A spawned process imports the caller's
    main module; where that fails (a script with no `__main__` guard), the scenes are rendered here, with a
    warning."""
    if styles is not None and len(styles) != len(scenes):
        raise ValueError(f"{len(styles)} styles for {len(scenes)} scenes")
    jobs = [(s, "photo" if styles is None else styles[i], size) for i, s in enumerate(scenes)]
    arrays = None
    if workers > 1 and len(jobs) >= 64:
        try:
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                arrays = list(pool.map(_render, jobs, chunksize=max(1, len(jobs) // (8 * workers))))
        except BrokenProcessPool:
            # A spawned process imports the caller's main module: a script without an `if __name__ ==
            # "__main__":` guard kills it (every stage has the guard). The same bytes, in this process.
            logging.getLogger(__name__).warning(
                "render processes could not start (guard the calling script's entry point with "
                "`if __name__ == \"__main__\":`); rendering %d scenes in this process", len(jobs))
    if arrays is None:
        arrays = [_render(j) for j in jobs]
    return [Image.fromarray(a) for a in arrays]
