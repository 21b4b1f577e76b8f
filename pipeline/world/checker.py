"""The exact checker: a caption read back with the world's grammar, compared with its image's scene.

Per caption (:func:`check`), counts that add up over an eval set (:func:`summarize`, micro-averaged):
- objects: the kinds (colour + shape) the caption names against the kinds in the scene: true
  positives, false positives (named, not there, or named without a colour), false negatives (there,
  not named). Object precision, recall and F1 come from their sums.
- binding: mentions whose colour and shape both occur in the scene; correct when some object has that
  colour *and* that shape ("a red square" beside a red circle and a blue square is wrong).
- hallucination: mentions whose shape is in no object of the scene (CHAIR's object hallucination).
- counts: mentions of a kind in the scene; correct when the number said ("two", plural without a number
  counts as "more than one", a singular as one) is the number of objects of that kind.
- relations: stated relations between two mentions that each name exactly one object of the scene;
  correct when the relation holds between those objects' positions (``scenes.holds``).
- exact: everything named is there with the right count, nothing is missing, every relation holds.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from pipeline.world.grammar import Reading, parse
from pipeline.world.scenes import Scene, holds

COUNT_KEYS = ("objects_tp", "objects_fp", "objects_fn", "mentions", "binding_total", "binding_correct",
              "hallucinated", "count_total", "count_correct", "relation_total", "relation_correct", "exact")


def check(caption: str, scene: Scene, reading: Reading | None = None) -> dict:
    """What ``caption`` gets right and wrong about ``scene``: the counts of ``COUNT_KEYS``, plus the
    kinds it names that are not there (``wrong``) and the kinds it leaves out (``missing``)."""
    reading = reading or parse(caption)
    truth = scene.kinds()
    colours = {c for c, _ in truth}
    shapes = scene.shapes()
    named = Counter(m.kind for m in reading.mentions)
    named_kinds = set(named)
    tp = len(named_kinds & set(truth))
    fp = len(named_kinds - set(truth))
    fn = len(set(truth) - named_kinds)
    binding_total = binding_correct = hallucinated = count_total = count_correct = 0
    for m in reading.mentions:
        if m.shape not in shapes:
            hallucinated += 1
        if m.colour in colours and m.shape in shapes:
            binding_total += 1
            binding_correct += m.kind in truth
        if m.kind in truth:
            count_total += 1
            n = truth[m.kind]
            count_correct += (n > 1) if m.count is None else (m.count == n)
    relation_total = relation_correct = 0
    for i, relation, j in reading.relations:
        a, b = reading.mentions[i], reading.mentions[j]
        if truth.get(a.kind) == 1 and truth.get(b.kind) == 1 and a.kind != b.kind:
            first = next(o for o in scene.objects if o.kind == a.kind)
            second = next(o for o in scene.objects if o.kind == b.kind)
            relation_total += 1
            relation_correct += holds(first, relation, second)
    exact = (fp == 0 and fn == 0 and count_correct == count_total == len(reading.mentions)
             and relation_correct == relation_total)
    return {"objects_tp": tp, "objects_fp": fp, "objects_fn": fn, "mentions": len(reading.mentions),
            "binding_total": binding_total, "binding_correct": int(binding_correct),
            "hallucinated": hallucinated, "count_total": count_total, "count_correct": int(count_correct),
            "relation_total": relation_total, "relation_correct": int(relation_correct), "exact": int(exact),
            "wrong": sorted(" ".join(k for k in kind if k) for kind in named_kinds - set(truth)),
            "missing": sorted(" ".join(kind) for kind in set(truth) - named_kinds)}


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


def summarize(results: list[dict]) -> dict:
    """The world's metrics over an eval set's per-caption ``check`` results (micro-averaged)."""
    total = {k: sum(r[k] for r in results) for k in COUNT_KEYS}
    precision = _ratio(total["objects_tp"], total["objects_tp"] + total["objects_fp"])
    recall = _ratio(total["objects_tp"], total["objects_tp"] + total["objects_fn"])
    f1 = (2 * precision * recall / (precision + recall)) if precision and recall else 0.0
    return {
        "object_precision": precision or 0.0, "object_recall": recall or 0.0, "object_f1": f1,
        "binding_accuracy": _ratio(total["binding_correct"], total["binding_total"]),
        "hallucination_rate": _ratio(total["hallucinated"], total["mentions"]),
        "count_accuracy": _ratio(total["count_correct"], total["count_total"]),
        "relation_accuracy": _ratio(total["relation_correct"], total["relation_total"]),
        "exact_match": _ratio(total["exact"], len(results)),
        "captions": len(results),
    }


def derangement(n: int, seed: int = 0) -> np.ndarray:
    """A fixed permutation of range(n) that moves every index (n >= 2): image i is given image p[i]'s caption."""
    if n < 2:
        raise ValueError(f"a shuffled control needs at least 2 images, got {n}")
    rng = np.random.default_rng(seed)
    while True:
        p = rng.permutation(n)
        if not np.any(p == np.arange(n)):
            return p


def exact_metrics(captions: list[str], scenes: list[Scene], seed: int = 0) -> tuple[dict, dict, list[dict]]:
    """(metrics of the captions against their own images' scenes, the same metrics of the shuffled
    control -- each image given the caption of another, a fixed derangement --, per-caption checks).

    The control equals captioning with the eval features shuffled across images whenever a method
    captions each image from that image's features alone, as every method here does: what the method
    says of the wrong image is scored against the right one. Its distance to the real row is what the
    method learned from the image."""
    checks = [check(c, s) for c, s in zip(captions, scenes)]
    p = derangement(len(captions), seed)
    shuffled = [check(captions[p[i]], scenes[i]) for i in range(len(captions))]
    return summarize(checks), summarize(shuffled), checks


def pair_audit(captions: list[str], scenes: list[Scene]) -> dict:
    """How many (caption, image) pairs show what their caption says, exactly, with the checker's
    metrics of the captions against their images and the mistakes the drawings record."""
    checks = [check(c, s) for c, s in zip(captions, scenes)]
    mistakes = Counter(m for s in scenes for m in s.extra.get("mistakes", []))
    exact = sum(c["exact"] for c in checks)
    return {"pairs": len(checks), "exact_matches": exact, "exact_match_fraction": exact / len(checks) if checks else None,
            "mistakes_made": dict(sorted(mistakes.items())), "metrics": summarize(checks)}
