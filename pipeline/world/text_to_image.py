"""The world's text-to-image model: a caption parser with a renderer, in the synthetic style, making
Stable Diffusion's known mistakes at set rates.

It reads a caption with the world's grammar (``grammar.parse``), lays the named objects out so that the
stated relations hold, then, each with its own probability, makes the mistakes text-to-image models are
known for, and draws the result in the ``synthetic`` style:
- ``binding``: two objects of different colours swap colours (a colour bound to the wrong object);
- ``drop``: one object of several is left out;
- ``count``: a group of identical objects gets one more or one fewer, or a single object a twin;
- ``extra``: an object the caption does not name is added.
A caption the grammar cannot read (no shape word) is drawn as a random scene, as a diffusion model draws
something for any prompt. Every choice is drawn from the per-image seed, so image i depends only on
(caption i, seed i).

Why not a small diffusion model trained on world images: on 2 CPU cores it would not learn to bind
colours to shapes and place relations in the minutes the demo has, and its mistakes could neither be
set nor counted. Here the rates are parameters, and each image records the scene it shows (the
``scene`` entry of its ``info``), so ``generate`` reports exactly how many images match their caption.

The model is a folder (``config.json`` with ``model_type: synthcap-world-t2i``), written by the stage
``world_t2i@NAME`` and loaded by ``pipeline.models.diffusion.load_text_to_image`` from that path.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from pipeline.world.grammar import parse
from pipeline.world.render import render
from pipeline.world.scenes import COLOURS, GRID, SHAPES, SIZES, Scene, WorldObject, cell_centre, holds, sample_scene

MODEL_TYPE = "synthcap-world-t2i"
MISTAKES = ("binding", "drop", "count", "extra")


@dataclass(frozen=True)
class Mistakes:
    binding: float = 0.15
    drop: float = 0.1
    count: float = 0.1
    extra: float = 0.1


def layout(caption: str, rng: np.random.Generator) -> Scene:
    """The scene a caption asks for: its mentions as objects (unnamed colours and sizes drawn at random),
    placed in distinct cells so that every stated relation holds (up to 50 tries, then as they fall)."""
    reading = parse(caption)
    if not reading.mentions:
        return sample_scene(rng)
    objects: list[dict] = []
    owner: list[int] = []                   # which mention each object comes from
    for index, m in enumerate(reading.mentions):
        colour = m.colour or str(rng.choice(COLOURS))
        size = m.size or str(rng.choice(SIZES))
        for _ in range(min(m.count or 2, 3)):
            objects.append({"shape": m.shape, "colour": colour, "size": size})
            owner.append(index)
    objects = objects[:GRID * GRID]
    placed: list[WorldObject] = []
    for _ in range(50):
        cells = rng.choice(GRID * GRID, size=len(objects), replace=False)
        placed = [WorldObject(x=x, y=y, **o) for o, (x, y) in zip(objects, (cell_centre(int(c), rng) for c in cells))]
        first = {i: placed[owner.index(i)] for i in set(owner)}
        if all(holds(first[i], rel, first[j]) for i, rel, j in reading.relations if i in first and j in first):
            break
    return Scene(tuple(placed), background=int(rng.integers(1 << 31)))


def _free_cell(objects: list[WorldObject], rng: np.random.Generator) -> tuple[float, float]:
    """A jittered position in a layout cell that no object occupies (any cell when all are taken)."""
    centres = [((c % GRID + 0.5) / GRID, (c // GRID + 0.5) / GRID) for c in range(GRID * GRID)]
    free = [c for c, (x, y) in enumerate(centres) if all(abs(x - o.x) + abs(y - o.y) > 0.2 for o in objects)]
    return cell_centre(int(rng.choice(free or list(range(GRID * GRID)))), rng)


def make_mistakes(scene: Scene, rates: Mistakes, rng: np.random.Generator) -> Scene:
    """``scene`` with each mistake made with its probability (module docstring); the ones made are
    listed in ``scene.extra["mistakes"]``."""
    objects = list(scene.objects)
    made: list[str] = []
    if rng.random() < rates.binding:
        pairs = [(i, j) for i in range(len(objects)) for j in range(i + 1, len(objects))
                 if objects[i].colour != objects[j].colour]
        if pairs:
            i, j = pairs[int(rng.integers(len(pairs)))]
            a, b = objects[i], objects[j]
            objects[i] = WorldObject(a.shape, b.colour, a.size, a.x, a.y)
            objects[j] = WorldObject(b.shape, a.colour, b.size, b.x, b.y)
            made.append("binding")
    if rng.random() < rates.drop and len(objects) > 1:
        objects.pop(int(rng.integers(len(objects))))
        made.append("drop")
    if rng.random() < rates.count and objects:
        kinds = sorted({o.kind for o in objects})
        kind = kinds[int(rng.integers(len(kinds)))]
        group = [i for i, o in enumerate(objects) if o.kind == kind]
        if len(group) > 1 and rng.random() < 0.5:
            objects.pop(group[-1])
        else:
            twin = objects[group[0]]
            x, y = _free_cell(objects, rng)
            objects.append(WorldObject(twin.shape, twin.colour, twin.size, x, y))
        made.append("count")
    if rng.random() < rates.extra:
        x, y = _free_cell(objects, rng)
        objects.append(WorldObject(str(rng.choice(SHAPES)), str(rng.choice(COLOURS)), str(rng.choice(SIZES)), x, y))
        made.append("extra")
    return Scene(tuple(objects), scene.background, {"mistakes": made})


class WorldTextToImage:
    """The ``TextToImage`` interface of pipeline/models/diffusion.py: ``identity``, ``resolution``,
    ``generate(prompts, seeds, steps, guidance_scale)`` (steps and guidance are a diffusion model's;
    they change nothing here)."""

    def __init__(self, config: dict, name: str, pretrained: str | None):
        self.config = config
        self.rates = Mistakes(**config["mistakes"])
        self.style = config["style"]
        self.resolution = int(config["resolution"])
        digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
        self.identity = {"kind": "text_to_image", "name": name, "pretrained": pretrained, "seed": None,
                         "weights_sha256": digest, "scheduler": None, "image_size": [self.resolution] * 2,
                         "dtype": "fp32"}

    def draw(self, caption: str, seed: int) -> Scene:
        rng = np.random.default_rng(int(seed))
        return make_mistakes(layout(caption, rng), self.rates, rng)

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], steps: int = 1,
                 guidance_scale: float = 0.0) -> list[Image.Image]:
        images = []
        for prompt, seed in zip(prompts, seeds):
            scene = self.draw(prompt, seed)
            image = render(scene, self.style, self.resolution)
            image.info["scene"] = json.dumps(scene.to_dict(), sort_keys=True)
            images.append(image)
        return images


def write_model(folder: Path, mistakes: Mistakes, resolution: int, style: str = "synthetic") -> dict:
    """The model's folder: its config.json (what ``load_world_text_to_image`` reads)."""
    config = {"model_type": MODEL_TYPE, "style": style, "resolution": int(resolution), "mistakes": asdict(mistakes)}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1, sort_keys=True) + "\n")
    return config


def load_world_text_to_image(name: str, pretrained: str) -> WorldTextToImage:
    config = json.loads((Path(pretrained) / "config.json").read_text())
    unknown = set(config.get("mistakes", {})) - set(MISTAKES)
    if unknown:
        raise ValueError(f"{pretrained}/config.json: unknown mistakes {sorted(unknown)} (known: {', '.join(MISTAKES)})")
    return WorldTextToImage(config, name, pretrained)
