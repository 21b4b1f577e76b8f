"""Caption metrics: the COCO caption suite (via pycocoevalcap) and CLIPScore / RefCLIPScore.

Scales (as the underlying definitions give them; papers usually print the COCO metrics ×100):

- BLEU-1..4, METEOR, ROUGE-L, SPICE: fractions in [0, 1]. BLEU is corpus-level (clipped n-gram
  counts and the brevity penalty are summed over all images, "closest" reference length).
- CIDEr: pycocoevalcap's ``Cider``, i.e. CIDEr-D as computed by the COCO evaluation server,
  unscaled (0 to 10; about 1.0 for a good captioner). Its IDF weights come from the references
  being scored, so it needs a corpus of several images: with a single image it is always 0.
- CLIP-S and RefCLIP-S: 0 to w (= 2.5) and 0 to about 1.4 respectively.

The COCO metrics need Java: the PTB tokenizer, METEOR and SPICE are Java programs. METEOR is
started once per Python process and reused by later calls (it takes seconds to start).
"""
from __future__ import annotations

import atexit
import shutil
import threading
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice import spice as pycocoevalcap_spice
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

SPICE_CORENLP_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
CORENLP_DOWNLOAD = "https://nlp.stanford.edu/software/stanford-corenlp-full-2015-12-09.zip"
CLIP_SCORE_WEIGHT = 2.5
MAX_IDS_SHOWN = 5


# --- COCO caption metrics -----------------------------------------------------------------------

def caption_metrics(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    *,
    meteor: bool = True,
) -> dict:
    """Score one caption per image against its references with the COCO caption metrics.

    Both sides are lower-cased and tokenised with pycocoevalcap's PTB tokenizer (punctuation
    removed) before scoring, as on the COCO server. An empty prediction is scored as is.

    Returns ``{"scores": {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"
    [, "SPICE"]: float}, "skipped": {metric: reason}}``. BLEU, METEOR, ROUGE-L and SPICE are
    fractions in [0, 1]; CIDEr (CIDEr-D) is unscaled. SPICE runs only when the Stanford CoreNLP
    jars it needs are installed (see :func:`missing_spice_jars`); otherwise it is listed in
    ``skipped`` with the reason, and ``skipped`` is empty when every metric ran. ``meteor=False``
    skips METEOR (params ``evaluate.meteor``: it starts a Java process of some seconds per call),
    listed in ``skipped`` the same way.

    Raises ValueError / TypeError on malformed input (naming the offending image ids) and
    RuntimeError when Java is not installed.
    """
    _check_caption_inputs(predictions, references)
    _require_java()
    predicted_tokens, reference_tokens = _tokenize(predictions, references)

    scores = _coco_scores(predicted_tokens, reference_tokens, meteor)
    skipped = {} if meteor else {"METEOR": "evaluate.meteor is false in params.yaml (set it true to score METEOR)"}
    missing_jars = missing_spice_jars()
    if missing_jars:
        skipped["SPICE"] = _spice_skip_reason(missing_jars)
    else:
        scores["SPICE"] = _spice_score(predicted_tokens, reference_tokens)
    return {"scores": scores, "skipped": skipped}


def spice_lib_dir() -> Path:
    """The folder where pycocoevalcap's SPICE looks for the Stanford CoreNLP jars."""
    return Path(pycocoevalcap_spice.__file__).resolve().parent / "lib"


def missing_spice_jars(lib_dir: Path | None = None) -> list[Path]:
    """The Stanford CoreNLP jars SPICE needs that are not installed (empty when SPICE can run).

    pycocoevalcap would download them on first use; this module never lets it, so that scoring
    behaves the same on machines without network access.
    """
    lib_dir = spice_lib_dir() if lib_dir is None else Path(lib_dir)
    return [lib_dir / name for name in SPICE_CORENLP_JARS if not (lib_dir / name).is_file()]


def _spice_skip_reason(missing_jars: list[Path]) -> str:
    listed = ", ".join(str(path) for path in missing_jars)
    return (
        f"SPICE needs the Stanford CoreNLP 3.6.0 jars, which are missing: {listed}. "
        f"To enable it, download {CORENLP_DOWNLOAD} on a machine with network access and copy "
        f"{' and '.join(SPICE_CORENLP_JARS)} from it into {missing_jars[0].parent}."
    )


def _check_caption_inputs(predictions: Mapping, references: Mapping) -> None:
    """Raise a precise error for anything pycocoevalcap would reject or silently misscore."""
    if not predictions and not references:
        raise ValueError("no captions to score: predictions and references are empty")
    _check_same_ids(predictions, references)
    for image_id, caption in predictions.items():
        if not isinstance(caption, str):
            raise TypeError(
                f"prediction for image {image_id!r} must be a string, "
                f"got {type(caption).__name__}"
            )
    for image_id, captions in references.items():
        _check_references(image_id, captions)


def _check_references(image_id: Hashable, captions: object) -> None:
    if isinstance(captions, str) or not isinstance(captions, Sequence):
        raise TypeError(
            f"references for image {image_id!r} must be a list of strings, "
            f"got {type(captions).__name__}"
        )
    if len(captions) == 0:
        raise ValueError(f"image {image_id!r} has no reference captions (needs at least one)")
    for caption in captions:
        if not isinstance(caption, str):
            raise TypeError(
                f"a reference for image {image_id!r} is not a string: {type(caption).__name__}"
            )


def _check_same_ids(predictions: Mapping, references: Mapping) -> None:
    without_prediction = set(references) - set(predictions)
    without_references = set(predictions) - set(references)
    problems = []
    if without_prediction:
        problems.append(f"no prediction for {_some_ids(without_prediction)}")
    if without_references:
        problems.append(f"no references for {_some_ids(without_references)}")
    if problems:
        raise ValueError(
            "predictions and references must have the same image ids: " + "; ".join(problems)
        )


def _some_ids(ids: set) -> str:
    """How many ids there are and the first few, e.g. ``7 image id(s): 'a', 'b', ... (2 more)``."""
    ordered = sorted(ids, key=str)
    shown = ", ".join(repr(image_id) for image_id in ordered[:MAX_IDS_SHOWN])
    more = f", ... ({len(ordered) - MAX_IDS_SHOWN} more)" if len(ordered) > MAX_IDS_SHOWN else ""
    return f"{len(ordered)} image id(s): {shown}{more}"


def _require_java() -> None:
    if shutil.which("java") is None:
        raise RuntimeError(
            "Java was not found on PATH: it is needed by the PTB tokenizer and METEOR "
            "(pycocoevalcap runs them as Java programs). Install a Java runtime (8 or newer) "
            "and make sure `java` is on PATH."
        )


def _tokenize(
    predictions: Mapping, references: Mapping
) -> tuple[dict[Hashable, list[str]], dict[Hashable, list[str]]]:
    """PTB-tokenise both sides into pycocoevalcap's ``{image_id: [tokenised caption, ...]}``."""
    tokenizer = PTBTokenizer()
    image_ids = list(predictions)
    predicted = _tokenize_checked(tokenizer, {i: [predictions[i]] for i in image_ids})
    referenced = _tokenize_checked(tokenizer, {i: list(references[i]) for i in image_ids})
    return predicted, referenced


def _tokenize_checked(tokenizer, captions: dict[Hashable, list[str]]) -> dict:
    """Tokenise, guarding against the tokenizer's line-based protocol losing captions.

    The tokenizer sends one caption a line to Java, so every run of whitespace (including line
    and paragraph separators Java would break on) is collapsed to one space first.
    """
    one_line = {
        image_id: [{"caption": " ".join(text.split())} for text in texts]
        for image_id, texts in captions.items()
    }
    tokenized = tokenizer.tokenize(one_line)
    for image_id, texts in captions.items():
        if len(tokenized.get(image_id, ())) != len(texts):
            raise RuntimeError(
                f"the PTB tokenizer returned {len(tokenized.get(image_id, ()))} caption(s) "
                f"for image {image_id!r}, expected {len(texts)}"
            )
    return tokenized


def _coco_scores(predicted: dict, referenced: dict, meteor: bool = True) -> dict[str, float]:
    """BLEU-1..4, METEOR (unless ``meteor`` is false), ROUGE-L and CIDEr-D over the whole corpus."""
    bleu, _ = Bleu(4).compute_score(referenced, predicted, verbose=0)
    scores = {f"BLEU-{n}": float(value) for n, value in enumerate(bleu, start=1)}
    if meteor:
        scores["METEOR"] = _meteor_score(referenced, predicted)
    scores["ROUGE-L"] = float(Rouge().compute_score(referenced, predicted)[0])
    scores["CIDEr"] = float(Cider().compute_score(referenced, predicted)[0])
    return scores


def start_meteor() -> None:
    """Start METEOR's Java process now, if Java is installed: it loads its paraphrase tables for about
    5 s and scores in well under one, so a caller that starts it before other work (loading CLIP,
    CLIPScore) overlaps the two; :func:`caption_metrics` then reuses the running process."""
    if shutil.which("java") is not None:
        _METEOR.scorer()


def _meteor_score(referenced: dict, predicted: dict) -> float:
    """METEOR 1.5 through the process-wide METEOR scorer."""
    scorer = _METEOR.scorer()
    try:
        return float(scorer.compute_score(referenced, predicted)[0])
    except BaseException:
        _METEOR.stop()  # its protocol state is unknown now: the next call starts a fresh one
        raise


class _MeteorProcess:
    """One long-lived pycocoevalcap Meteor scorer (a Java process) shared by all calls.

    Starting METEOR (loading its paraphrase tables) takes several seconds while scoring a few
    thousand captions takes well under one, so a stage scoring many methods starts it once.
    It is stopped at interpreter exit or by :meth:`stop`.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._meteor = None

    def scorer(self):
        """The running scorer, started (or restarted, if its process died) on demand."""
        with self._lock:
            if self._meteor is None or self._meteor.meteor_p.poll() is not None:
                self._meteor = Meteor()
            return self._meteor

    def stop(self) -> None:
        """Stop the Java process now rather than at garbage collection."""
        with self._lock:
            meteor, self._meteor = self._meteor, None
        if meteor is None:
            return
        # Meteor holds its own lock while scoring and its __del__ (which kills the process and
        # is safe to run twice) waits for it: after a failure mid-score it must be released.
        if meteor.lock.locked():
            meteor.lock.release()
        meteor.__del__()


_METEOR = _MeteorProcess()
atexit.register(_METEOR.stop)


def _spice_score(predicted: dict, referenced: dict) -> float:
    return float(pycocoevalcap_spice.Spice().compute_score(referenced, predicted)[0])


# --- CLIPScore ----------------------------------------------------------------------------------

def clip_score(
    image_features: np.ndarray,
    caption_features: np.ndarray,
    w: float = CLIP_SCORE_WEIGHT,
) -> tuple[float, np.ndarray]:
    """CLIP-S of each caption for its image, from CLIP embeddings of both.

    Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation Metric for Image Captioning":
    CLIP-S(c, v) = w * max(cos(c, v), 0). Row i of ``caption_features`` is scored against row i
    of ``image_features`` (both [N, D], need not be normalised). Returns ``(mean, per_item [N])``,
    each in [0, w].

    The paper reports CLIP-S with CLIP ViT-B/32 and w = 2.5, encoding each caption with the
    prefix "A photo depicts"; scores depend on the CLIP model (and prompt) used, so compare only
    scores computed with the same one.
    """
    images = _unit_rows(image_features, "image_features")
    captions = _unit_rows(caption_features, "caption_features")
    _check_same_shape(images, captions, "image_features", "caption_features")
    per_item = _clip_s(captions, images, w)
    return float(per_item.mean()), per_item


def ref_clip_score(
    image_features: np.ndarray,
    caption_features: np.ndarray,
    reference_features: Sequence[np.ndarray],
    w: float = CLIP_SCORE_WEIGHT,
) -> tuple[float, np.ndarray]:
    """RefCLIP-S of each caption, given its image and the CLIP text embeddings of its references.

    Hessel et al. 2021: RefCLIP-S(c, R, v) = H-Mean(CLIP-S(c, v), max(max_{r in R}
    cos(c, r), 0)); the reference term carries no w. ``reference_features[i]`` is an [R_i, D]
    array with the references of image i. The harmonic mean of 0 and anything is 0. Returns
    ``(mean, per_item [N])``. Same model caveats as :func:`clip_score`.
    """
    images = _unit_rows(image_features, "image_features")
    captions = _unit_rows(caption_features, "caption_features")
    _check_same_shape(images, captions, "image_features", "caption_features")
    if len(reference_features) != len(captions):
        raise ValueError(
            f"reference_features has {len(reference_features)} entries, "
            f"expected one [R, D] array per caption ({len(captions)})"
        )
    image_term = _clip_s(captions, images, w)
    reference_term = np.array([
        _best_reference_cosine(caption, references, index)
        for index, (caption, references) in enumerate(zip(captions, reference_features))
    ])
    per_item = _harmonic_mean(image_term, reference_term)
    return float(per_item.mean()), per_item


def _clip_s(unit_captions: np.ndarray, unit_images: np.ndarray, w: float) -> np.ndarray:
    """w * max(cos, 0) row by row."""
    cosines = np.einsum("nd,nd->n", unit_captions, unit_images)
    return w * np.clip(cosines, 0.0, None)


def _best_reference_cosine(unit_caption: np.ndarray, references: np.ndarray, index: int) -> float:
    """max(max_r cos(c, r), 0) for one caption."""
    name = f"reference_features[{index}]"
    unit_references = _unit_rows(references, name)
    if unit_references.shape[1] != unit_caption.shape[0]:
        raise ValueError(
            f"{name} has shape {unit_references.shape} but caption features have dimension "
            f"{unit_caption.shape[0]}"
        )
    return max(float((unit_references @ unit_caption).max()), 0.0)


def _harmonic_mean(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise 2ab / (a + b), defined as 0 where either is 0 (both are >= 0 here)."""
    total = a + b
    safe_total = np.where(total > 0, total, 1.0)
    return np.where(total > 0, 2 * a * b / safe_total, 0.0)


def _unit_rows(features: np.ndarray, name: str) -> np.ndarray:
    """A float64 copy of a non-empty [N, D] array with every row scaled to unit length."""
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D [N, D] array, got shape {array.shape}")
    norms = np.linalg.norm(array, axis=1, keepdims=True)
    bad_rows = np.flatnonzero(~np.isfinite(norms[:, 0]) | (norms[:, 0] == 0))
    if bad_rows.size:
        raise ValueError(
            f"{name} rows {bad_rows[:MAX_IDS_SHOWN].tolist()} have zero or non-finite norm: "
            "cosine similarity is undefined for them"
        )
    return array / norms


def _check_same_shape(a: np.ndarray, b: np.ndarray, a_name: str, b_name: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{a_name} and {b_name} must have the same [N, D] shape, "
            f"got {a.shape} and {b.shape}"
        )
