"""The world's caption grammar: one vocabulary that both writes captions and reads them back.

Writing (:func:`describe`): a scene's objects are grouped by kind (colour, shape); each group becomes a
noun phrase ("a small red ball", "two blue boxes"), and two single objects may be joined by the
relation that dominates between them ("a red ball to the left of a blue box"). Phrasings, synonyms
(circle / ball / disc, square / box / block, ...), size words and the order of the groups vary, so the
captions of one scene differ as human ones do.

Reading (:func:`parse`): every shape word is a mention; the colour, size and count words since the
previous mention are its attributes, and a relation word between two consecutive mentions relates them.
Words the grammar does not know are skipped, and a mention missing its colour is still a mention: the
reader is tolerant of missing and extra words, as the checker needs for captions a model wrote.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from pipeline.world.scenes import Scene, WorldObject, dominant_relation

SHAPE_WORDS = {"circle": ("circle", "ball", "disc"), "square": ("square", "box", "block"),
               "triangle": ("triangle", "wedge"), "star": ("star",), "heart": ("heart",),
               "cross": ("cross",), "diamond": ("diamond", "rhombus")}
PLURAL = {"circle": "circles", "ball": "balls", "disc": "discs", "square": "squares", "box": "boxes",
          "block": "blocks", "triangle": "triangles", "wedge": "wedges", "star": "stars", "heart": "hearts",
          "cross": "crosses", "diamond": "diamonds", "rhombus": "rhombuses"}
COLOUR_WORDS = {"red": ("red",), "green": ("green",), "blue": ("blue",), "yellow": ("yellow",),
                "purple": ("purple", "violet"), "orange": ("orange",), "white": ("white",)}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
RELATION_PHRASES = {"left": ("to the left of", "left of", "on the left of"),
                    "right": ("to the right of", "right of", "on the right of"),
                    "above": ("above", "over", "on top of"),
                    "below": ("below", "under", "beneath")}
NUMBERS = {1: ("one",), 2: ("two", "a pair of"), 3: ("three",)}

SINGLE = ("{a}", "a picture of {a}", "there is {a}", "{a} in the picture", "an image of {a}",
          "{a} on its own")
RELATED = ("{a} {rel} {b}", "{a} is {rel} {b}", "there is {a} {rel} {b}", "a picture of {a} {rel} {b}",
           "{a} placed {rel} {b}")
LISTED = ("{a} and {b}", "{a} next to {b}", "{a} with {b}", "a picture of {a} and {b}",
          "there are {a} and {b}")
THREE_RELATED = ("{a} {rel} {b} and {c}", "{a} {rel} {b}, and {c}", "there is {a} {rel} {b} and {c}")
THREE_LISTED = ("{a}, {b} and {c}", "{a} with {b} and {c}", "a picture of {a}, {b} and {c}")

# reading: every word the grammar writes, mapped back to its meaning
_SHAPE_OF = {w: (shape, False) for shape, words in SHAPE_WORDS.items() for w in words}
_SHAPE_OF.update({PLURAL[w]: (shape, True) for shape, words in SHAPE_WORDS.items() for w in words})
_COLOUR_OF = {w: colour for colour, words in COLOUR_WORDS.items() for w in words}
_SIZE_OF = {w: size for size, words in SIZE_WORDS.items() for w in words}
_COUNT_OF = {"a": 1, "an": 1, "one": 1, "single": 1, "two": 2, "pair": 2, "three": 3}
_RELATION_OF = {"left": "left", "right": "right", "above": "above", "over": "above", "top": "above",
                "below": "below", "under": "below", "beneath": "below", "underneath": "below"}
_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class Mention:
    """One noun phrase read from a caption. ``count`` is None for a plural without a number."""
    shape: str
    colour: str | None
    size: str | None
    count: int | None

    @property
    def kind(self) -> tuple[str | None, str]:
        return self.colour, self.shape


@dataclass(frozen=True)
class Reading:
    mentions: tuple[Mention, ...]
    relations: tuple[tuple[int, str, int], ...]      # (mention index, relation, mention index)


def parse(caption: str) -> Reading:
    """The objects and relations a caption states (module docstring)."""
    mentions: list[Mention] = []
    relations: list[tuple[int, str, int]] = []
    colour = size = count = relation = None
    for word in _WORD.findall(caption.lower()):
        if word in _SHAPE_OF:
            shape, plural = _SHAPE_OF[word]
            n = count if count is not None and (count > 1) == plural else (None if plural else 1)
            mentions.append(Mention(shape, colour, size, n))
            if relation is not None and len(mentions) > 1:
                relations.append((len(mentions) - 2, relation, len(mentions) - 1))
            colour = size = count = relation = None
        elif word in _COLOUR_OF:
            colour = _COLOUR_OF[word]
        elif word in _SIZE_OF:
            size = _SIZE_OF[word]
        elif word in _COUNT_OF:
            count = _COUNT_OF[word]
        elif word in _RELATION_OF and mentions:
            relation = _RELATION_OF[word]
    return Reading(tuple(mentions), tuple(relations))


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def noun_phrase(group: list[WorldObject], rng: np.random.Generator, size_rate: float = 0.5) -> str:
    """"a small red ball", "two blue boxes": one group of objects of one kind."""
    first = group[0]
    shape = _pick(rng, SHAPE_WORDS[first.shape])
    colour = _pick(rng, COLOUR_WORDS[first.colour])
    same_size = all(o.size == first.size for o in group)
    size = _pick(rng, SIZE_WORDS[first.size]) + " " if same_size and rng.random() < size_rate else ""
    if len(group) == 1:
        return _article(f"{size}{colour} {shape}") if rng.random() < 0.9 else f"one {size}{colour} {shape}"
    return f"{_pick(rng, NUMBERS[len(group)])} {size}{colour} {PLURAL[shape]}"


def describe(scene: Scene, rng: np.random.Generator, relation_rate: float = 0.7) -> str:
    """One caption of ``scene``: its groups in a random order, related where two single objects are."""
    groups: dict[tuple[str, str], list[WorldObject]] = {}
    for o in scene.objects:
        groups.setdefault(o.kind, []).append(o)
    order = [groups[k] for k in sorted(groups)]
    order = [order[i] for i in rng.permutation(len(order))]
    phrases = [noun_phrase(g, rng) for g in order]
    related = len(order) >= 2 and len(order[0]) == 1 and len(order[1]) == 1 and rng.random() < relation_rate
    rel = _pick(rng, RELATION_PHRASES[dominant_relation(order[0][0], order[1][0])]) if related else None
    if len(phrases) == 1:
        text = _pick(rng, SINGLE).format(a=phrases[0])
    elif len(phrases) == 2:
        text = (_pick(rng, RELATED) if related else _pick(rng, LISTED)).format(a=phrases[0], b=phrases[1], rel=rel)
    else:
        text = (_pick(rng, THREE_RELATED) if related else _pick(rng, THREE_LISTED)).format(
            a=phrases[0], b=phrases[1], c=phrases[2], rel=rel)
    return text


def references(scene: Scene, rng: np.random.Generator, n: int = 5, tries: int = 200) -> list[str]:
    """``n`` different captions of one scene (fewer only if the grammar cannot phrase it ``n`` ways)."""
    out: list[str] = []
    for _ in range(tries):
        text = describe(scene, rng)
        if text not in out:
            out.append(text)
            if len(out) == n:
                break
    return out
