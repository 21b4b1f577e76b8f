"""Captioning methods: one module per paper, holding its model and equations and nothing else.

A method module is handed its inputs ready (the shared runner, pipeline/runner.py, opens the
artifacts, checks that every feature comes from one CLIP model, loops over epochs, shards and eval
sets, and saves checkpoints). It defines:

``Train``, ``Caption``
    frozen dataclasses of its settings: ``methods.NAME.train`` and ``methods.NAME.caption`` in
    params.yaml (typed, defaults documented with ``pipeline.config.opt``). ``Train`` has at least
    ``epochs``, ``batch_size``, ``seed`` and ``optim`` (pipeline.nn.schedules.Optim); ``Caption`` at
    least ``batch_size``.
``needs(train, caption=None) -> Needs``
    what training reads (caption None) or what captioning reads.
``facts(train, data) -> dict``
    JSON-able facts about the data the model's shape depends on (dimensions, the decoder
    vocabulary); saved in the checkpoint so the model can be rebuilt without the data.
``create(train, facts, data=None) -> nn.Module``
    the model; with ``data`` (at training) it may copy data into buffers. ``model.loss(batch)``
    returns the training loss (or ``(loss, {name: float})`` to log more); a ``width`` attribute
    gives the Noam schedule's width.
``batch(model, rows, idx, train, data, step) -> dict``
    rows ``idx`` of one shard (a dict of columns, see Needs) as a training batch.
``caption(model, rows, idx, train, caption, data) -> list[str]``
    captions for rows ``idx`` of one eval shard.
``variant(train, caption) -> str``
    the ablation row this instance is, for the report.
Optional: ``prepare(rows, train, data, step) -> rows`` runs once per shard before batching (e.g. a
projection of the whole shard); ``step`` is None when captioning.

Multi-phase training (optional): a module that defines ``phases(train) -> list[Phase]`` is trained phase
after phase instead of by one optimiser over ``train.epochs``. Each :class:`Phase` has a ``name``, its
``epochs`` (0: skipped), its ``optim`` (pipeline.nn.schedules.Optim: the runner builds that phase's own
optimiser and schedule, over the phase's steps), ``trains`` (the submodule names whose parameters that
optimiser updates and whose gradients are clipped; empty = every trainable parameter) and an optional
``setup(model, total_steps)`` the runner calls once as the phase begins (e.g. to create an optimiser the
method itself holds and steps inside ``model.loss``, as CMSA's discriminator in its RL phase). The runner
seeds once before the first phase; epochs are numbered across phases (the data order of every epoch is
new); ``step.phase`` is the phase's name, so ``batch`` can tell the model's ``loss`` which phase it is in
(e.g. ``batch["phase"]``). ``train.epochs`` is then not read by the runner (a method may define it as a
property: the sum of its phases' epochs). The training report lists each phase's epochs, steps, losses
and logs (``phases``); ``epoch_loss`` and ``logs`` run over all phases in order. A module without
``phases`` trains exactly as before: one phase of ``train.epochs`` with ``train.optim`` over the whole
model.

Frozen pretrained submodules (optional): a model whose ``frozen_pretrained`` attribute maps submodule
names (their state-dict prefixes, e.g. ``"lm"``) to the identity of the pretrained model each holds
(a dict with at least ``name``, ``pretrained`` and ``weights_sha256``, as the loaders in
pipeline/models record it) is saved WITHOUT those submodules' tensors: the checkpoint header records
the identities instead (``frozen``), ``create`` loads the submodules again from their identity (the
training settings name them), and the runner refuses a checkpoint whose reloaded submodule has other
weights (sha256) than the one it was trained with, naming both. The runner also checks, when saving,
that training left each such submodule bit-for-bit unchanged. A model without the attribute (or with
an empty mapping, e.g. an LM that is fine-tuned) is saved whole.

docs/ADDING_A_METHOD.md walks through a complete toy method.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from types import ModuleType
from typing import Callable, Literal

from pipeline.config import IMAGE_COLUMNS, opt

REQUIRED = ("Train", "Caption", "needs", "facts", "create", "batch", "caption", "variant")

# The per-row columns a method may ask for, by source. Training reads the corpus side (one row per
# corpus caption: shard k of each covers the same captions); captioning reads the eval side (one
# row per image).
# The image feature columns (pipeline/models/clip.py): ``global`` is the projected CLS token (L2-normalised),
# ``patches`` the patch tokens projected by CLIP's own head (not normalised), ``grid`` the same tokens raw, in
# the vision tower's width, before that head (PCM-Net's encoder input), ``cls_attention`` the last layer's
# CLS->patch attention and ``attention`` its whole map over the N_p + 1 tokens, CLS first (both averaged over
# heads). The encode stages cache only what the enabled instances read (``image_columns``).
IMAGE_FEATURES = IMAGE_COLUMNS
TRAIN_SOURCES = {
    "corpus": ("caption_id", "group_id", "text"),
    "text": ("text_feature",),                                   # CLIP text feature of the caption
    "synthetic": IMAGE_FEATURES,                                 # CLIP features of its synthetic image
    "synthetic_tags": ("labels", "scores", "boxes"),             # detector tags of its synthetic image
    "optimized": ("global",),                                    # SynTIC Eq. 2 features
}
# The sources that are per synthetic image: with ``Needs.pairs == "refined"`` the runner reads, for each caption
# the refine stage keeps, the row of the image it was re-paired with, and drops the filtered captions; ``optimized``
# is then SynTIC's Eq. 2 over the refined pairs (stage optimize_refined). Text-side sources are the caption's own.
PAIRED_SOURCES = ("synthetic", "synthetic_tags")
PAIRS = ("original", "refined")
Pairs = Literal[PAIRS]


def pairs_option():
    """The ``train.pairs`` setting of a method that reads synthetic images (SynTIC, PCM-Net, CMSA)."""
    return opt("original", "training pairs: original (each caption with its own synthetic image) | refined "
                           "(SynC: stage refine's pairs)")


def pairs_mark(pairs: str) -> str:
    """What a variant name adds for an instance trained on SynC's refined pairs."""
    return "+SynC" if pairs == "refined" else ""
CAPTION_SOURCES = {
    "image": ("image_id", *IMAGE_FEATURES),                      # the real image: its id, CLIP features
    "image_tags": ("labels", "scores", "boxes"),                 # detector tags of the real image
}


@dataclass(frozen=True)
class Needs:
    """What a method reads. ``rows`` maps the name the method uses to ``"source.column"`` (see
    TRAIN_SOURCES / CAPTION_SOURCES); feature columns arrive as float32 arrays [n, D] (``patches``
    as [n, N_p, D], ``grid`` as [n, N_p, W], ``cls_attention`` as [n, N_p], ``attention`` as [n, N_p + 1, N_p + 1]), others
    (ids, texts, tags) as lists."""
    rows: dict[str, str]
    corpus: tuple[str, ...] = ()          # corpus columns held whole (e.g. texts for a vocabulary)
    support: str | None = None            # a projection support set: "corpus" or a target support name
    tag_vocabulary: bool = False          # CLIP text features of the detector's labels
    concepts: bool = False                # PCM-Net's concept vocabulary
    means: tuple[str, ...] = ()           # mean feature directions: "text", "synthetic", "eval"
    text_encoder: bool = False            # the pipeline's CLIP text encoder (caption-time re-ranking)
    pairs: str = "original"               # training pairs: original (caption i, image i) | refined (SynC, stage
                                          # refine: each kept caption with its re-paired image; see PAIRED_SOURCES)


@dataclass
class Step:
    """Where training is: epoch (counted across phases), shard index, the shard's first corpus row, the
    run's seed, and the phase's name (None for a method without ``phases``)."""
    epoch: int
    shard: int
    offset: int
    seed: int
    phase: str | None = None


@dataclass(frozen=True)
class Phase:
    """One phase of a multi-phase training (a method's optional ``phases(train)``, see above)."""
    name: str
    epochs: int
    optim: object                                  # pipeline.nn.schedules.Optim: this phase's optimiser and schedule
    trains: tuple[str, ...] = ()                   # submodules whose parameters it updates (empty: all trainable)
    setup: Callable[[object, int], None] | None = None   # setup(model, total_steps), once as the phase begins


@dataclass
class Data:
    """Everything a method is handed besides per-row columns, checked to come from one CLIP model."""
    clip: dict                                   # identity of the CLIP model of every feature
    feature_dim: int
    num_patches: int | None = None               # N_p, when patches are read
    grid_dim: int | None = None                  # W, the raw grid's width, when the grid is read
    num_tokens: int | None = None                # N_p + 1 (CLS first), when the attention map is read
    device: str = "cpu"
    corpus: dict[str, list] = field(default_factory=dict)
    support: object | None = None                # pipeline.support.SupportSet (its own tau and top_k)
    tag_vocabulary: object | None = None         # pipeline.extract.tag.TagVocabulary
    concepts: tuple[list[str], object] | None = None   # (words, features [N_c, D])
    means: dict[str, object] = field(default_factory=dict)
    text_encoder: object | None = None           # texts -> L2-normalised CLIP features [n, D]
    memo: dict = field(default_factory=dict)     # scratch space for values a method derives once per run


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get(method: str) -> ModuleType:
    """The method module ``pipeline/methods/<method>.py``, checked to define the contract."""
    if method not in available():
        raise ValueError(f"unknown method {method!r} (available: {', '.join(available())})")
    module = importlib.import_module(f"{__name__}.{method}")
    return check(module)


def check(module: ModuleType) -> ModuleType:
    missing = [name for name in REQUIRED if not hasattr(module, name)]
    if missing:
        raise TypeError(f"{module.__name__} lacks {', '.join(missing)} (see pipeline/methods/__init__.py)")
    return module


def image_columns(instances, source: str) -> tuple[str, ...]:
    """The image feature columns the encode stage caches for ``source`` ("synthetic": the synthetic images,
    read at training; "image": the real eval images, read at captioning), in ``IMAGE_FEATURES`` order:
    ``global`` always (support sets, SynTIC's Eq. 2, evaluation and the modality-gap analysis read it) and
    every column an instance's ``needs`` name there. ``instances``: objects with ``method``, ``train``
    and ``caption`` (pipeline.config.MethodInstance)."""
    if source not in ("synthetic", "image"):
        raise ValueError(f"image columns are of 'synthetic' or 'image', not {source!r}")
    wanted = {"global"}
    for instance in instances:
        module = get(instance.method)
        needs = module.needs(instance.train) if source == "synthetic" else module.needs(instance.train, instance.caption)
        wanted |= {spec.partition(".")[2] for spec in needs.rows.values() if spec.partition(".")[0] == source}
    return tuple(c for c in IMAGE_FEATURES if c in wanted)
