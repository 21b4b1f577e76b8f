"""The typed configuration: every section of ``params.yaml`` as a frozen dataclass, validated whole
before any stage does any work.

``load()`` reads ``params.yaml`` with the YAML rules DVC uses (YAML 1.2 through ruamel: ``1e-4`` is a
float, as DVC sees it), fills every documented default, and rejects, naming the key:
- an unknown key, with the nearest known one ("did you mean `pretrained`?");
- a value of the wrong type (``rows_per_shard: "64"``, ``lr: [1]``) or out of range
  (``feature_dtype: int8``, ``rows_per_shard: 0``);
- a real model architecture with no weights (``pretrained`` missing or null) unless the profile says
  ``random_init: true``: only the small models of ``pipeline/models/configs/`` are built from
  configuration by default.

Each section is a dataclass whose fields carry their documentation (``opt(default, doc)``). A field
marked ``speed_only`` changes how fast a stage runs, never its output bytes (batch sizes of frozen-model
inference, the executor); it is left out of DVC's params and of shard fingerprints, so changing it
reruns nothing.

Which stage reads which keys is declared once, in :data:`STAGE_PARAMS`; ``tests/test_config.py``
checks that ``dvc.yaml`` declares exactly these params for every stage, and a stage's shard
fingerprints hash exactly these values (:func:`stage_params`).
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

REPO = Path(__file__).resolve().parents[1]
PARAMS = REPO / "params.yaml"
MODEL_CONFIGS = Path(__file__).resolve().parent / "models" / "configs"
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")


class ConfigError(ValueError):
    """params.yaml (or a profile) has a key or value the pipeline cannot run with."""


# ---------------------------------------------------------------------------------------------
# Declaring fields
# ---------------------------------------------------------------------------------------------
def opt(default: Any = dataclasses.MISSING, doc: str = "", *, check=None, speed_only: bool = False):
    """A documented field. ``check(value) -> str | None`` returns what is wrong with a value;
    ``speed_only`` marks a setting that never changes output bytes."""
    kwargs = {"metadata": {"doc": doc, "check": check, "speed_only": speed_only}}
    if isinstance(default, (dict, list)) or dataclasses.is_dataclass(default):
        frozen = default
        kwargs["default_factory"] = lambda: _copy(frozen)
    elif default is not dataclasses.MISSING:
        kwargs["default"] = default
    return field(**kwargs)


def _copy(value):
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy(v) for v in value]
    return value


def at_least(low):
    return lambda v: None if v >= low else f"must be >= {low}"


def positive(v):
    return None if v > 0 else "must be > 0"


def in_unit_interval(v):
    return None if 0.0 <= v <= 1.0 else "must lie in [0, 1]"


def non_negative(v):
    return None if v >= 0 else "must be >= 0"


def dropout_rate(v):
    return None if 0.0 <= v < 1.0 else "must lie in [0, 1) (a dropout probability)"


def divides(divisor_key: str, dividend_key: str):
    """For ``__post_init__``: an error naming both keys unless the first divides the second (attention
    heads and the width they split). Raised as ValueError, which ``parse`` reports under the section."""
    def check(settings) -> None:
        d, n = getattr(settings, divisor_key), getattr(settings, dividend_key)
        if d is not None and n is not None and n % d:
            raise ValueError(f"`{divisor_key}` ({d}) must divide `{dividend_key}` ({n}): each attention head "
                             f"takes {dividend_key}/{divisor_key} dimensions")
    return check


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------
def parse(cls, data: Any, where: str):
    """``data`` (a mapping from YAML) as an instance of the dataclass ``cls``; ``where`` is the dotted
    key path used in error messages."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"`{where}` must be a mapping of keys to values, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        near = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
        hint = f" (did you mean `{near[0]}`?)" if near else f" (known keys: {', '.join(sorted(fields))})"
        raise ConfigError(f"unknown key `{_join(where, key)}`{hint}")
    values = {}
    for name, f in fields.items():
        key = _join(where, name)
        if name in data:
            value = coerce(hints[name], data[name], key)
        elif f.default is not dataclasses.MISSING:
            value = f.default
        elif f.default_factory is not dataclasses.MISSING:
            value = coerce(hints[name], f.default_factory(), key)
        else:
            raise ConfigError(f"missing key `{key}` ({f.metadata.get('doc') or hints[name]})")
        check = f.metadata.get("check")
        problem = check(value) if check and value is not None else None
        if problem:
            raise ConfigError(f"`{key}` {problem}, got {value!r}")
        values[name] = value
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(f"`{where}`: {err}") from err


def coerce(tp, value: Any, where: str):
    """``value`` checked against the type annotation ``tp`` (ints are accepted where floats are)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in options:
            try:
                return coerce(option, value, where)
            except ConfigError as err:
                errors.append(err)
        if len(options) == 1:
            raise errors[0]
        raise ConfigError(f"`{where}` must be {' or '.join(_describe(o) for o in args)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"`{where}` must be one of {', '.join(repr(a) for a in args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"`{where}` must be a list, got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"`{where}` must be a list of {len(args)} values, got {value!r}")
            return tuple(coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        out = [coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            raise ConfigError(f"`{where}` must be a mapping, got {type(value).__name__} {value!r}")
        item = args[1] if args else Any
        return {str(k): coerce(item, v, _join(where, k)) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        parser = getattr(tp, "parse", None)
        return parser(value, where) if parser else parse(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"`{where}` must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"`{where}` must be an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"`{where}` must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"`{where}` must be a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"config type {tp!r} of `{where}` is not supported")


def _describe(tp) -> str:
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _join(where: str, key) -> str:
    return f"{where}.{key}" if where else str(key)


def as_dict(obj) -> Any:
    """A config object back to plain JSON-able data (for fingerprints, checkpoints and reports)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: as_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: as_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [as_dict(v) for v in obj]
    return obj


def output_fields(obj) -> Any:
    """``as_dict`` without the ``speed_only`` fields: what a stage's output actually depends on."""
    if dataclasses.is_dataclass(obj):
        return {f.name: output_fields(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not f.metadata.get("speed_only")}
    if isinstance(obj, dict):
        return {k: output_fields(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [output_fields(v) for v in obj]
    return obj


def _name(value: str) -> str | None:
    return None if NAME_PATTERN.match(value) else "must be lower-case letters, digits, '-', '_' or '.'"


# ---------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------
PRECISIONS = Literal["fp32", "fp16", "bf16"]


def _small_model_names() -> set[str]:
    return {p.stem for p in MODEL_CONFIGS.glob("*.json")}


@dataclass(frozen=True, kw_only=True)
class ModelRef:
    """A model by name, as every loader takes it (pipeline/models)."""
    name: str = opt(doc="architecture: an open_clip model name, or a config in pipeline/models/configs/")
    pretrained: str | None = opt(None, "open_clip tag or local checkpoint; Hugging Face id or local folder; "
                                       "null = weights drawn from `seed`")
    seed: int = opt(0, "seed of the weights when pretrained is null")
    precision: PRECISIONS = opt("fp32", "fp32 | fp16 | bf16")
    random_init: bool = opt(False, "true: knowingly run a real architecture with random weights (timing runs)")
    files: str = opt("pipeline/models/configs", "the path DVC tracks as this model, a dependency of every stage "
                                                "that loads it: the folder of local weights that `pretrained` lies in "
                                                "(a world model's artifacts/world/NAME/clip); the default suits models "
                                                "built from configuration or named by a hub id or tag")

    @classmethod
    def parse(cls, data, where):
        ref = parse(cls, data, where)
        if ref.pretrained and ref.pretrained.startswith("artifacts/") and \
                not Path(ref.pretrained).is_relative_to(Path(ref.files)):
            raise ConfigError(f"`{where}.pretrained` ({ref.pretrained}) is a pipeline artifact outside `{where}.files` "
                              f"({ref.files}): set `{where}.files` to its folder, so that DVC reruns the stages that "
                              f"load it when it changes")
        if ref.pretrained is None and not ref.random_init and ref.name not in _small_model_names():
            raise ConfigError(
                f"`{where}.pretrained` is missing for the real architecture {ref.name!r}: it would run with "
                f"random weights. Set `{where}.pretrained` to its weights (a pretrained tag, Hugging Face id or "
                f"local path), or `{where}.random_init: true` if random weights are what you want. Small models "
                f"built from configuration: {', '.join(sorted(_small_model_names()))}")
        return ref


@dataclass(frozen=True, kw_only=True)
class Models:
    clip: ModelRef
    diffusion: ModelRef
    detector: ModelRef


@dataclass(frozen=True, kw_only=True)
class CaptionSource:
    """A caption file (or Flickr8k text folder) and which of its captions to keep."""
    path: str = opt(doc="caption file, or a Flickr8k text folder (a DVC dependency of the stage)")
    format: Literal["auto", "plain_text", "karpathy_list", "karpathy_dataset", "coco_annotations",
                    "flickr8k", "flickr8k_tokens"] = opt("auto", "caption format (auto = by content)")
    splits: list[str] | None = opt(None, "keep only these splits (formats that carry splits)")
    max_words: int | None = opt(None, "drop captions over this many words (null = no cap; SynTIC's SS1M: 15)",
                                check=at_least(1))
    deduplicate: bool = opt(False, "drop exact repeats of a caption")
    max_captions: int | None = opt(None, "keep only the first N cleaned captions (quick runs)", check=at_least(1))


@dataclass(frozen=True, kw_only=True)
class Corpus(CaptionSource):
    source: str | None = opt(None, "the dataset it is (coco, flickr30k, ...): the report compares a method trained "
                                   "on it with the papers' rows of the same dataset")


@dataclass(frozen=True, kw_only=True)
class EvalSet:
    images: str = opt(doc="folder of the real images (a DVC dependency of the eval set's stage)")
    references: str = opt(doc="reference captions: a caption file or Flickr8k text folder")
    format: Literal["auto", "karpathy_list", "karpathy_dataset", "coco_annotations", "flickr8k",
                    "flickr8k_tokens"] = opt("auto", "references format")
    splits: list[str] | None = opt(None, "keep only images of these splits")
    exclude_splits: list[str] | None = opt(None, "drop images of these splits (e.g. the corpus's train split)")
    only_images_in_folder: bool = opt(False, "keep only references whose image is in the folder")
    max_images: int | None = opt(None, "the first N images (sorted by name)", check=at_least(1))
    max_pixels: int = opt(89_478_485, "larger images are skipped, never decoded (decompression bombs)",
                          check=at_least(1))
    dataset: str | None = opt(None, "the dataset it is (coco, flickr30k, ...): the report puts the papers' numbers "
                                    "on it beside this run's")


@dataclass(frozen=True, kw_only=True)
class WorldCorpus:
    scenes: int = opt(1500, "scenes the corpus describes (no image of them exists)", check=at_least(1))
    captions_per_scene: int = opt(2, "phrasings of each scene (one group, as COCO's captions of one image)",
                                  check=at_least(1))


@dataclass(frozen=True, kw_only=True)
class WorldEval:
    images: int = opt(100, "photo-style eval images, each with its scene as ground truth", check=at_least(1))
    references: int = opt(5, "different reference captions per eval image", check=at_least(1))


@dataclass(frozen=True, kw_only=True)
class WorldClip:
    """The world's CLIP (architecture `models.clip.name`), trained contrastively on web pairs."""
    pairs: int = opt(12000, "web pairs (scenes apart from the corpus's and the eval set's)", check=at_least(1))
    epochs: int = opt(6, "passes over the pairs, each with fresh captions", check=at_least(1))
    batch_size: int = opt(64, "pairs per InfoNCE batch", check=at_least(2))
    lr: float = opt(1e-3, "AdamW peak learning rate (warm-up, cosine decay)", check=positive)
    heldout: int = opt(1000, "held-out pairs of the zero-shot retrieval report", check=at_least(10))
    shape_twins: bool = opt(False, "half the pairs are the other half's shape twins, each in its original's batch "
                                  "(hard negatives that colour cannot tell apart; pipeline/world/clip_training.py)")
    synthetic_share: float = opt(0.25, "share of the web pairs rendered in the synthetic style (web data holds "
                                      "renders beside photos; pipeline/world/clip_training.py)", check=in_unit_interval)
    threads: int = opt(2, "torch threads while training, and render processes; the weights depend on it (float sums "
                          "in another order), so it is a parameter", check=at_least(1))


@dataclass(frozen=True, kw_only=True)
class WorldDetector:
    """The world's shape detector, trained on photo-style images (and a share in the synthetic style)."""
    images: int = opt(1500, "training images", check=at_least(1))
    epochs: int = opt(8, "passes over the images", check=at_least(1))
    batch_size: int = opt(32, "images per step", check=at_least(1))
    lr: float = opt(3e-3, "AdamW peak learning rate (one-cycle)", check=positive)
    heldout: int = opt(300, "held-out images of the label precision/recall report", check=at_least(1))
    synthetic_share: float = opt(0.0, "share of the training images rendered in the synthetic style (a COCO detector "
                                      "still finds objects in Stable Diffusion images; pipeline/world/"
                                      "detector_training.py)", check=in_unit_interval)


@dataclass(frozen=True, kw_only=True)
class WorldMistakes:
    """How often the world's text-to-image model makes Stable Diffusion's known mistakes (each drawn
    independently per image; pipeline/world/text_to_image.py)."""
    binding: float = opt(0.15, "two objects swap colours", check=in_unit_interval)
    drop: float = opt(0.1, "an object of several is left out", check=in_unit_interval)
    count: float = opt(0.1, "a group gets one object more or fewer", check=in_unit_interval)
    extra: float = opt(0.1, "an object the caption does not name is added", check=in_unit_interval)


@dataclass(frozen=True, kw_only=True)
class World:
    """A world whose captions can be checked exactly (pipeline/world): its corpus, eval set and the
    stand-ins for the pretrained models, made by the stages world@NAME, world_clip@NAME,
    world_detector@NAME and world_t2i@NAME."""
    seed: int = opt(0, "seed of every scene stream and model")
    image_size: int = opt(64, "pixels of every world image", check=at_least(16))
    corpus: WorldCorpus = opt(WorldCorpus())
    eval: WorldEval = opt(WorldEval())
    clip: WorldClip = opt(WorldClip())
    detector: WorldDetector = opt(WorldDetector())
    text_to_image: WorldMistakes = opt(WorldMistakes())


@dataclass(frozen=True, kw_only=True)
class Generate:
    resolution: int | None = opt(None, "pixels; null = the model's own", check=at_least(8))
    steps: int = opt(20, "sampling steps", check=at_least(1))
    guidance_scale: float = opt(7.5, "classifier-free guidance", check=non_negative)
    batch_size: int = opt(16, "prompts per forward pass; a parameter: on some CPUs a batched UNet's float sums differ "
                              "in the last bit from one image's, moving a pixel by one level", check=at_least(1))
    seed: int = opt(0, "per-caption seed = hash(seed, caption_id)")
    image_format: Literal["png", "jpeg"] = opt("png", "png (lossless) | jpeg")


# The image feature columns the encode stages can cache (what each holds: pipeline/models/clip.py, which computes
# them; pipeline/methods/__init__.py, whose methods read them), named once here
IMAGE_COLUMNS = ("global", "patches", "grid", "cls_attention", "attention")
ImageColumn = Literal[IMAGE_COLUMNS]


@dataclass(frozen=True, kw_only=True)
class Encode:
    """Which image feature columns the encode stages cache (pipeline/methods/__init__.py ``image_columns``):
    exactly those the enabled method instances read, and ``global``. Both are derived from ``methods``
    (null: derive; `make profile` writes them out), so that DVC reruns encode_synthetic / encode_eval@
    exactly when they change; a list that differs from the derived one is an error naming both."""
    batch_size: int = opt(64, "images or texts per CLIP forward pass", check=at_least(1), speed_only=True)
    synthetic_columns: list[ImageColumn] | None = opt(
        None, "the synthetic images' columns: what the enabled instances read at training (derived from `methods`)")
    eval_columns: list[ImageColumn] | None = opt(
        None, "the eval images' columns: what the enabled instances read at captioning (derived from `methods`)")


@dataclass(frozen=True, kw_only=True)
class Tag:
    threshold: float = opt(0.9, "detector score threshold", check=in_unit_interval)
    max_tags: int = opt(5, "most confident distinct labels kept per image", check=at_least(0))
    batch_size: int = opt(32, "images per detector forward pass", check=at_least(1), speed_only=True)


@dataclass(frozen=True, kw_only=True)
class Optimize:
    """SynTIC Eq. 2 (the stage `optimize`)."""
    tau: float = opt(0.01, "Eq. 2 temperature", check=positive)
    lr: float = opt(1e-5, "Adam learning rate", check=positive)
    epochs: int = opt(100, "passes over the corpus, one Adam step per mini-batch (not given in the paper)",
                      check=at_least(0))
    batch_size: int = opt(64, "b, pairs per mini-batch, drawn corpus-wide each epoch (not given in the paper)",
                          check=at_least(1))
    seed: int = opt(0, "seed of the mini-batch draws")


@dataclass(frozen=True, kw_only=True)
class Refine:
    """SynC (the stage `refine`, pipeline/refine.py): re-pair each caption with the best-fitting synthetic image of
    the pool and drop the worst pairs. Defaults: the release (boreng0817/SynC main.py, src/dataset_builder.py)."""
    k: int = opt(15, "K, candidate images per caption by text->image similarity (release: --K 15)", check=at_least(1))
    kr: int = opt(2, "Kr, corpus captions each candidate retrieves by image->text similarity (release: --i2tK 2)",
                  check=at_least(1))
    tau: float = opt(0.9, "the fraction of pairs kept, the highest scores (release: image_counts ratio 0.9)",
                     check=in_unit_interval)
    retrieval_model: Literal["clip"] = opt("clip", "the model of both retrievals: clip = the pipeline's own CLIP "
                                                   "(models.clip, its cached features). A choice: the release's "
                                                   "default is SigLIP2 ViT-B/16 (hf-hub:timm/ViT-B-16-SigLIP2-256)")
    text_similarity: str = opt("clip", "the cycle score's text-text similarity: clip = the CLIP text features of "
                                       "the corpus (cached) | a sentence-transformers model id or local folder "
                                       "(release: sentence-transformers/paraphrase-multilingual-MiniLM-L12-v2)")
    index: str = opt("Flat", "FAISS index_factory string of both retrievals: Flat (exact top-k, as released) | "
                             "auto (IVF from 50k rows) | IVF1024,Flat ...")
    nprobe: int = opt(8, "IVF indexes: lists visited per query", check=at_least(1))
    batch_size: int = opt(4096, "captions per FAISS search (FAISS's threads work best on large batches)",
                          check=at_least(1), speed_only=True)


@dataclass(frozen=True, kw_only=True)
class Support:
    """The projection support set over the corpus text features (SynTIC Eq. 3)."""
    index: str = opt("Flat", "FAISS index_factory string: Flat (exact) | IVF1024,Flat | HNSW32 ...")
    nprobe: int = opt(8, "IVF indexes: lists visited per query", check=at_least(1))
    tau: float = opt(0.01, "Eq. 3 temperature of this support set's dataset (COCO 1/100, Flickr30k 1/80)",
                     check=positive)
    top_k: int | None = opt(64, "softmax over the top-k neighbours; null = exact over the whole set",
                            check=at_least(1))
    agreement_sample: int = opt(256, "queries on which the report compares top-k with the exact projection",
                                check=at_least(1))


@dataclass(frozen=True, kw_only=True)
class TargetSupport(CaptionSource):
    """A support set over another caption file, for cross-domain "-TT" captioning."""
    index: str = opt("Flat", "FAISS index_factory string")
    nprobe: int = opt(8, "IVF indexes: lists visited per query", check=at_least(1))
    tau: float = opt(0.01, "Eq. 3 temperature of this support set's dataset", check=positive)
    top_k: int | None = opt(64, "softmax over the top-k neighbours; null = exact", check=at_least(1))


@dataclass(frozen=True, kw_only=True)
class Concepts:
    """PCM-Net's concept vocabulary (Eq. 1's c_j) and the CLIP text feature of each concept."""
    source: Literal["corpus_nouns", "word_list"] = opt(
        "corpus_nouns", "corpus_nouns: the `size` most frequent nouns of the corpus (the paper, Sec. 3.2) | "
                        "word_list: the fixed `words` (the released code's list of COCO object words)")
    size: int = opt(1000, "corpus_nouns: concepts kept", check=at_least(1))
    min_count: int = opt(2, "corpus_nouns: a noun must occur at least this often", check=at_least(1))
    words: list[str] = opt([], "word_list: the concepts, in order (the profile names their source)")
    templates: list[str] = opt(["A photo of {}"], "the sentences encoded for a concept, {} standing for it; with "
                                                  "several, a prompt ensemble: the mean of their unit CLIP features, "
                                                  "renormalised (the paper: one, \"A photo of {c}\")")

    def __post_init__(self):
        if self.source == "word_list" and not self.words:
            raise ConfigError("`concepts.words` is empty: `concepts.source: word_list` needs the list of concepts")
        if self.source == "corpus_nouns" and self.words:
            raise ConfigError("`concepts.words` is read only with `concepts.source: word_list` (the source is "
                              "corpus_nouns): remove the words or set the source")
        repeated = sorted({w for w in self.words if self.words.count(w) > 1})
        if repeated or any(not w.strip() for w in self.words):
            raise ConfigError(f"`concepts.words` must hold distinct, non-empty words, got repeats {repeated}"
                              if repeated else "`concepts.words` holds an empty word")
        if not self.templates:
            raise ConfigError("`concepts.templates` is empty: give at least one sentence with {} for the concept")
        for template in self.templates:
            if template.count("{}") != 1 or template.count("{") != 1 or template.count("}") != 1:
                raise ConfigError(f"`concepts.templates`: each sentence holds {{}} once, where the concept goes, "
                                  f"and no other braces, got {template!r}")


@dataclass(frozen=True, kw_only=True)
class ModalityGap:
    """Unsupervised-ClipCap's modality-gap analysis: caption normalize(λ·t + (1−λ)·v)."""
    models: list[str] = opt([], "method instances to analyse (text-feature captioners)")
    evalset: str | None = opt(None, "the eval set it runs on")
    lambdas: list[float] = opt([0.0, 0.25, 0.5, 0.75, 1.0], "λ values, each in [0, 1]")

    def __post_init__(self):
        for lam in self.lambdas:
            if not 0.0 <= lam <= 1.0:
                raise ConfigError(f"`modality_gap.lambdas` must lie in [0, 1], got {lam}")


@dataclass(frozen=True, kw_only=True)
class ExternalResult:
    """A published result file of another system, scored by the stage score@NAME with the same
    protocol as the method instances and shown beside them in the report."""
    path: str = opt(doc="the predictions: COCO results [{image_id, caption}], Karpathy-style [{image_name, "
                        "prediction}] or JSON Lines from `synthcap caption` (a DVC dependency of the stage)")
    evalset: str = opt(doc="the eval set its captions are of")
    label: str | None = opt(None, "how the report names it (default: its key)")


@dataclass(frozen=True, kw_only=True)
class Evaluate:
    clipscore_w: float = opt(2.5, "CLIPScore weight w (Hessel et al. 2021)", check=positive)
    meteor: bool = opt(True, "score METEOR 1.5 (a Java process: some seconds per evaluation); false lists it "
                             "as skipped, as SPICE is without its jars")


@dataclass(frozen=True, kw_only=True)
class Report:
    gallery_size: int = opt(10, "eval images shown with their captions", check=at_least(0))


@dataclass(frozen=True, kw_only=True)
class MethodInstance:
    """One row of the comparison: ``method`` names the module (pipeline/methods/), ``train`` and
    ``caption`` are its typed settings (the module's ``Train`` and ``Caption`` dataclasses)."""
    method: str
    train: Any
    caption: Any

    @classmethod
    def parse(cls, data, where):
        from pipeline import methods
        if not isinstance(data, Mapping):
            raise ConfigError(f"`{where}` must be a mapping with `method`, `train` and `caption`, got {data!r}")
        unknown = [k for k in data if k not in ("method", "train", "caption")]
        if unknown:
            near = difflib.get_close_matches(str(unknown[0]), ["method", "train", "caption"], n=1)
            hint = f" (did you mean `{near[0]}`?)" if near else \
                " (an instance has `method`, `train` and `caption`; settings go under train/caption)"
            raise ConfigError(f"unknown key `{where}.{unknown[0]}`{hint}")
        name = data.get("method")
        if name not in methods.available():
            raise ConfigError(f"`{where}.method` must name a method module, one of "
                              f"{', '.join(methods.available())}; got {name!r}")
        module = methods.get(name)
        return cls(method=name, train=parse(module.Train, data.get("train"), f"{where}.train"),
                   caption=parse(module.Caption, data.get("caption"), f"{where}.caption"))


@dataclass(frozen=True, kw_only=True)
class RayTask:
    """What each Ray task of one shard stage asks for (``executor: ray``; docs/RAY.md)."""
    num_gpus: float | None = opt(None, "GPUs per shard task; null = 1 when `device` is cuda, else 0 (a fraction "
                                       "such as 0.5 lets two tasks share a GPU)", check=non_negative, speed_only=True)
    num_cpus: float | None = opt(None, "CPUs per shard task; null = `threads_per_task`", check=non_negative,
                                 speed_only=True)


@dataclass(frozen=True, kw_only=True)
class Ray:
    """How the shard stages run with ``executor: ray`` (pipeline/data/executors.py, docs/RAY.md). Speed
    only: none of it changes a byte, so none of it is a DVC param or in a fingerprint."""
    generate: RayTask = opt(RayTask(), "resources of a `generate` shard task", speed_only=True)
    encode: RayTask = opt(RayTask(), "resources of an `encode_*` shard task", speed_only=True)
    tag: RayTask = opt(RayTask(), "resources of a `tag_synthetic` / `tag_eval` shard task", speed_only=True)
    max_in_flight: int | None = opt(None, "shard tasks submitted at once: their inputs and results sit in Ray's "
                                          "object store; null = twice as many as the cluster can run at once",
                                    check=at_least(1), speed_only=True)
    max_retries: int = opt(3, "reruns of a shard task whose worker or node died (a failing input is not retried)",
                           check=non_negative, speed_only=True)


@dataclass(frozen=True, kw_only=True)
class Config:
    profile: str = opt(doc="the profile params.yaml was made from")
    executor: Literal["local", "ray"] = opt("local", "local | ray: where shard functions run (same bytes)",
                                            speed_only=True)
    threads_per_task: int = opt(1, "torch intra-op threads of one shard task, with either executor; a parameter "
                                   "of every shard stage (float sums split over more threads can differ in the "
                                   "last bit)", check=at_least(1))
    ray: Ray = opt(Ray(), "resources of the shard stages' Ray tasks (executor: ray)", speed_only=True)
    device: str = opt("cpu", "cpu | cuda | cuda:N")
    rows_per_shard: int = opt(2000, "rows per Parquet shard", check=at_least(1))
    feature_dtype: Literal["float16", "float32"] = opt("float16", "how features are stored")
    worlds: dict[str, World] = opt({}, "worlds with ground truth (pipeline/world), by name: their stages make the "
                                       "corpus, eval set and models a world profile points at")
    corpus: Corpus = opt(doc="the training caption corpus")
    evalsets: dict[str, EvalSet] = opt({}, "eval sets by name")
    models: Models = opt(doc="the frozen models")
    generate: Generate = opt(Generate())
    encode: Encode = opt(Encode())
    tag: Tag = opt(Tag())
    optimize: Optimize = opt(Optimize())
    refine: Refine = opt(Refine())
    support: Support = opt(Support())
    concepts: Concepts = opt(Concepts())
    target_supports: dict[str, TargetSupport] = opt({}, "support sets over other caption files (\"-TT\")")
    methods: dict[str, MethodInstance] = opt({}, "method instances by name")
    external_results: dict[str, ExternalResult] = opt({}, "other systems' result files, scored like the methods")
    modality_gap: ModalityGap = opt(ModalityGap())
    evaluate: Evaluate = opt(Evaluate())
    report: Report = opt(Report())

    def __post_init__(self):
        if not re.match(r"^(cpu|cuda(:\d+)?|mps)$", self.device):
            raise ConfigError(f"`device` must be cpu, cuda, cuda:N or mps, got {self.device!r}")
        for section, names in (("worlds", self.worlds), ("evalsets", self.evalsets), ("target_supports", self.target_supports),
                               ("methods", self.methods), ("external_results", self.external_results)):
            for name in names:
                problem = _name(name)
                if problem:
                    raise ConfigError(f"`{section}.{name}`: the name {problem} (it names folders and DVC stages)")
        if "corpus" in self.target_supports:
            raise ConfigError("`target_supports.corpus`: the name `corpus` is the corpus's own support set")
        for name, external in self.external_results.items():
            if name in self.methods:
                raise ConfigError(f"`external_results.{name}`: the name is a method instance's too (both write "
                                  f"artifacts/methods/{name})")
            if external.evalset not in self.evalsets:
                raise ConfigError(f"`external_results.{name}.evalset` must name an eval set ({', '.join(self.evalsets)}), "
                                  f"got {external.evalset!r}")
        for name in self.modality_gap.models:
            if name not in self.methods:
                raise ConfigError(f"`modality_gap.models` names {name!r}, which is not in `methods`")
        if self.modality_gap.models and self.modality_gap.evalset not in self.evalsets:
            raise ConfigError(f"`modality_gap.evalset` must name an eval set ({', '.join(self.evalsets)}), "
                              f"got {self.modality_gap.evalset!r}")
        self._derive_encode_columns()
        for name, instance in self.methods.items():
            support = getattr(instance.caption, "support", None)
            if support not in (None, "corpus") and support not in self.target_supports:
                raise ConfigError(f"`methods.{name}.caption.support` names {support!r}, which is neither "
                                  f"`corpus` nor one of `target_supports` ({', '.join(self.target_supports) or 'none'})")

    def _derive_encode_columns(self) -> None:
        """``encode.synthetic_columns`` / ``encode.eval_columns``: the columns the enabled instances read,
        filled in when null, checked when given."""
        from pipeline import methods
        derived = {"synthetic_columns": methods.image_columns(self.methods.values(), "synthetic"),
                   "eval_columns": methods.image_columns(self.methods.values(), "image")}
        for key, columns in derived.items():
            given = getattr(self.encode, key)
            if given is not None and set(given) != set(columns):
                raise ConfigError(f"`encode.{key}` is {list(given)} but the enabled method instances read "
                                  f"{list(columns)}: set it to that, or to null to derive it (`make profile` "
                                  f"writes it out)")
        object.__setattr__(self, "encode", dataclasses.replace(self.encode, **{k: list(v) for k, v in derived.items()}))


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------
def read_yaml(path: Path | str) -> dict:
    """A YAML file read as DVC reads params.yaml (ruamel, YAML 1.2: ``1e-4`` is a float)."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    path = Path(path)
    try:
        data = YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist (make one with `make profile NAME=offline`)") from None
    except YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    return data or {}


def from_dict(data: Mapping) -> Config:
    return parse(Config, data, "")


def load(path: Path | str = PARAMS) -> Config:
    """params.yaml, parsed and validated whole."""
    try:
        return from_dict(read_yaml(path))
    except ConfigError as err:
        raise ConfigError(f"{Path(path).name}: {err}") from None


# ---------------------------------------------------------------------------------------------
# Which stage reads which keys (dvc.yaml's `params:` must say the same; tests/test_config.py)
# ---------------------------------------------------------------------------------------------
# Keys a stage reads. "{name}" is the stage's foreach key (an eval set, a target support set, a method
# instance). A section stands for all its fields except the speed_only ones.
STAGE_PARAMS: dict[str, tuple[str, ...]] = {
    "world": ("worlds.{name}.seed", "worlds.{name}.image_size", "worlds.{name}.corpus", "worlds.{name}.eval"),
    "world_clip": ("worlds.{name}.seed", "worlds.{name}.image_size", "worlds.{name}.clip", "models.clip.name"),
    "world_detector": ("worlds.{name}.seed", "worlds.{name}.image_size", "worlds.{name}.detector"),
    "world_t2i": ("worlds.{name}.image_size", "worlds.{name}.text_to_image"),
    "corpus": ("corpus", "rows_per_shard"),
    "demo_photos": (),
    "evalset": ("evalsets.{name}", "rows_per_shard"),
    "generate": ("models.diffusion", "generate", "rows_per_shard", "device", "threads_per_task"),
    "encode_text": ("models.clip", "feature_dtype", "rows_per_shard", "device", "threads_per_task"),
    "encode_synthetic": ("models.clip", "encode.synthetic_columns", "feature_dtype", "rows_per_shard", "device",
                         "threads_per_task"),
    "encode_eval": ("models.clip", "encode.eval_columns", "feature_dtype", "rows_per_shard", "device",
                    "threads_per_task"),
    "tag_vocabulary": ("models.detector", "models.clip", "feature_dtype", "device"),
    "tag_synthetic": ("models.detector", "tag", "rows_per_shard", "device", "threads_per_task"),
    "tag_eval": ("models.detector", "tag", "rows_per_shard", "device", "threads_per_task"),
    "optimize": ("optimize", "feature_dtype", "rows_per_shard", "threads_per_task"),
    "refine": ("refine", "rows_per_shard", "device", "threads_per_task"),
    "optimize_refined": ("optimize", "feature_dtype", "rows_per_shard", "threads_per_task"),
    "support": ("support",),
    "support_agreement": ("support.agreement_sample",),
    "target_support": ("target_supports.{name}", "models.clip", "device"),
    "concepts": ("concepts", "models.clip", "feature_dtype", "device"),
    "train": ("methods.{name}.method", "methods.{name}.train", "device"),
    "evaluate": ("methods.{name}.method", "methods.{name}.caption", "evaluate", "models.clip", "device"),
    "score": ("external_results.{name}", "evaluate", "models.clip", "device"),
    "modality_gap": ("modality_gap.evalset", "modality_gap.lambdas", "methods.{name}", "evaluate.meteor", "models.clip",
                     "device"),
    "report": ("report", "methods", "evalsets", "external_results", "modality_gap.models", "profile", "models",
               "corpus.source", "worlds"),
}


def lookup(config: Config, dotted: str) -> Any:
    node: Any = config
    for key in dotted.split("."):
        node = node[key] if isinstance(node, dict) else getattr(node, key)
    return node


def dvc_params(stage: str, config: Config, name: str | None = None) -> list[str]:
    """The dotted keys DVC must track for ``stage``: sections expanded to their fields where a field
    is speed_only (so that changing it reruns nothing), else the section as a whole."""
    out = []
    for key in STAGE_PARAMS[stage]:
        key = key.format(name=name)
        value = lookup(config, key)
        if dataclasses.is_dataclass(value) and any(f.metadata.get("speed_only") for f in dataclasses.fields(value)):
            out += [f"{key}.{f.name}" for f in dataclasses.fields(value) if not f.metadata.get("speed_only")]
        else:
            out.append(key)
    return out


def stage_params(stage: str, config: Config, name: str | None = None) -> dict:
    """The values ``stage`` reads (speed_only fields left out): what its fingerprint hashes."""
    return {key.format(name=name): output_fields(lookup(config, key.format(name=name)))
            for key in STAGE_PARAMS[stage]}
