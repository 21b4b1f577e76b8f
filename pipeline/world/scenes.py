"""Scenes of the world: 1-3 objects on a background, each a shape, a colour, a size and a position.

A scene is plain data (``Scene.to_dict`` / ``Scene.from_dict`` round-trip through JSON), so it travels
in shards and reports as the ground truth of its image. Positions are the object's centre in [0, 1]
(x to the right, y downwards). Relations are read off positions: ``holds(a, "left", b)`` is true when a's
centre lies left of b's by at least ``RELATION_MARGIN`` (a diagonal pair may be both "left of" and
"above"); :func:`dominant_relation` is the one a caption states.
"""
from __future__ import annotations

import zlib
from collections import Counter
from dataclasses import asdict, dataclass, field, replace

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "diamond")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white")
SIZES = ("small", "large")
RELATIONS = ("left", "right", "above", "below")
INVERSE = {"left": "right", "right": "left", "above": "below", "below": "above"}
RELATION_MARGIN = 0.08      # of the image width: closer centres are in no relation on that axis
GRID = 3                    # objects sit in distinct cells of a GRID x GRID layout, jittered


@dataclass(frozen=True)
class WorldObject:
    shape: str
    colour: str
    size: str
    x: float
    y: float

    @property
    def kind(self) -> tuple[str, str]:
        """(colour, shape): what object precision and recall compare."""
        return self.colour, self.shape


@dataclass(frozen=True)
class Scene:
    objects: tuple[WorldObject, ...]
    background: int = 0             # which background the renderer draws (a seed, not a meaning)
    extra: dict = field(default_factory=dict, compare=False)   # e.g. the mistakes a drawing made

    def kinds(self) -> Counter:
        """(colour, shape) -> how many objects of that kind."""
        return Counter(o.kind for o in self.objects)

    def shapes(self) -> set[str]:
        return {o.shape for o in self.objects}

    def to_dict(self) -> dict:
        out = {"objects": [asdict(o) for o in self.objects], "background": self.background}
        if self.extra:
            out["extra"] = self.extra
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "Scene":
        return cls(tuple(WorldObject(**o) for o in data["objects"]), int(data.get("background", 0)),
                   dict(data.get("extra") or {}))


def world_rng(seed: int, purpose: str) -> np.random.Generator:
    """The random stream of one purpose ("corpus", "eval", "clip", "clip-heldout", "detector", ...):
    streams of different purposes never share scenes by construction of their seeds, as real CLIP's web
    data is apart from COCO."""
    return np.random.default_rng([int(seed), zlib.crc32(purpose.encode())])


def holds(a: WorldObject, relation: str, b: WorldObject, margin: float = RELATION_MARGIN) -> bool:
    """Is ``a`` <relation> ``b`` (left of, right of, above, below) in the picture?"""
    if relation == "left":
        return b.x - a.x >= margin
    if relation == "right":
        return a.x - b.x >= margin
    if relation == "above":
        return b.y - a.y >= margin
    if relation == "below":
        return a.y - b.y >= margin
    raise ValueError(f"unknown relation {relation!r} (known: {', '.join(RELATIONS)})")


def dominant_relation(a: WorldObject, b: WorldObject) -> str:
    """The relation of ``a`` to ``b`` along the axis on which they lie further apart."""
    dx, dy = b.x - a.x, b.y - a.y
    if abs(dx) >= abs(dy):
        return "left" if dx > 0 else "right"
    return "above" if dy > 0 else "below"


def cell_centre(cell: int, rng: np.random.Generator, jitter: float = 0.04) -> tuple[float, float]:
    """The jittered centre of layout cell ``cell`` (row-major in a GRID x GRID grid)."""
    row, col = divmod(cell, GRID)
    x = (col + 0.5) / GRID + rng.uniform(-jitter, jitter)
    y = (row + 0.5) / GRID + rng.uniform(-jitter, jitter)
    return float(np.clip(x, 0.12, 0.88)), float(np.clip(y, 0.12, 0.88))


def sample_scene(rng: np.random.Generator, max_objects: int = 3, duplicate_rate: float = 0.3,
                 object_weights: tuple[float, ...] = (0.3, 0.4, 0.3)) -> Scene:
    """A random scene: 1..max_objects objects in distinct layout cells; with ``duplicate_rate`` a
    second object repeats the first one's colour and shape (so captions count: "two red circles")."""
    weights = np.asarray(object_weights[:max_objects], float)
    n = int(rng.choice(np.arange(1, len(weights) + 1), p=weights / weights.sum()))
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    objects = []
    for i, cell in enumerate(cells):
        if i == 1 and rng.random() < duplicate_rate:
            shape, colour = objects[0].shape, objects[0].colour
        else:
            shape, colour = str(rng.choice(SHAPES)), str(rng.choice(COLOURS))
        x, y = cell_centre(int(cell), rng)
        objects.append(WorldObject(shape, colour, str(rng.choice(SIZES)), x, y))
    return Scene(tuple(objects), background=int(rng.integers(1 << 31)))


def shape_twin(scene: Scene, rng: np.random.Generator) -> Scene:
    """``scene`` with every shape replaced by another (one shape always by the same one, so a pair of
    red circles stays a pair); colours, sizes, positions and background stay: the two differ in shape only."""
    new = {}
    for o in scene.objects:
        if o.shape not in new:
            new[o.shape] = str(rng.choice([s for s in SHAPES if s != o.shape]))
    return Scene(tuple(replace(o, shape=new[o.shape]) for o in scene.objects), background=scene.background)


def binding_twin(scene: Scene, rng: np.random.Generator) -> Scene | None:
    """``scene`` with its colours moved to other objects (each colour to another, one colour always to the
    same one: a pair of red circles stays a pair), or None when it has fewer than two colours; shapes,
    sizes, positions and background stay: the two differ in which colour goes with which shape only
    (NegCLIP's swapped-attribute negatives), which a bag of colours and shapes cannot tell apart."""
    colours = sorted({o.colour for o in scene.objects})
    if len(colours) < 2:
        return None
    shift = int(rng.integers(1, len(colours)))          # a cyclic shift: no colour stays where it was
    new = {c: colours[(i + shift) % len(colours)] for i, c in enumerate(colours)}
    return Scene(tuple(replace(o, colour=new[o.colour]) for o in scene.objects), background=scene.background)
