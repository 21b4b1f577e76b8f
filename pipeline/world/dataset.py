"""The world's data, written as the pipeline's ordinary inputs: a caption corpus and an eval set.

- The corpus: a Karpathy-style caption list (``corpus.json``), ``captions_per_scene`` phrasings of each
  of ``scenes`` independently drawn scenes (a group = one scene, as COCO's five captions of one image).
  It holds captions only: no image of these scenes exists anywhere.
- The eval set: ``images`` scenes drawn from their own stream, each rendered in the photo style
  (``images/NNNNN.png``), with ``references`` different captions and its scene as ground truth, in a
  Karpathy-style list (``references.json``; the ``scene`` entry of each image is what the checker
  compares captions with; the ``evalset`` stage keeps it beside the image).
- A control: the corpus's most frequent caption given to every eval image (``frequent_caption.json``,
  a result file the ``score`` stage scores like a method's captions). A method must beat it.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from tqdm.auto import tqdm

from pipeline.world.grammar import references
from pipeline.world.render import render
from pipeline.world.scenes import sample_scene, world_rng


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    tmp.replace(path)


def write_corpus(path: Path, seed: int, scenes: int, captions_per_scene: int) -> dict:
    rng = world_rng(seed, "corpus")
    items = []
    for k in range(scenes):
        scene = sample_scene(rng)
        items.append({"split": "train", "image_name": f"scene-{k:06d}",
                      "captions": references(scene, rng, captions_per_scene)})
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_json(path, items)
    return {"scenes": scenes, "captions": sum(len(i["captions"]) for i in items)}


def write_frequent_caption(path: Path, corpus: Path, eval_references: Path) -> dict:
    """The control row: the most frequent corpus caption (ties: the first) for every eval image."""
    counts = Counter(c for item in json.loads(corpus.read_text()) for c in item["captions"])
    caption, count = counts.most_common(1)[0]
    results = [{"image_name": item["image_name"], "prediction": caption}
               for item in json.loads(eval_references.read_text())]
    _write_json(path, results)
    return {"caption": caption, "count": count}


def write_eval_set(folder: Path, seed: int, images: int, references_per_image: int, image_size: int) -> dict:
    rng = world_rng(seed, "eval")
    image_dir = folder / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    items = []
    for k in tqdm(range(images), desc="world eval images", unit="image", leave=False):
        scene = sample_scene(rng)
        name = f"{k:05d}.png"
        render(scene, "photo", image_size).save(image_dir / name, format="PNG")
        items.append({"split": "test", "image_name": name, "file_path": name,
                      "captions": references(scene, rng, references_per_image), "scene": scene.to_dict()})
    _write_json(folder / "references.json", items)
    return {"images": images, "references": sum(len(i["captions"]) for i in items)}

