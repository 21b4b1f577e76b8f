"""The modality-gap analysis of Unsupervised-ClipCap (Sec. 5, Fig. 3): caption mix-up features.

For an eval image with CLIP image feature v and the CLIP text feature t of one of its reference
captions, the model captions

    m(lambda) = normalize( lambda * t + (1 - lambda) * v ),   lambda in params.yaml modality_gap.lambdas,

lambda = 0 is the image alone, lambda = 1 the text alone. Choices the paper leaves open:
- t is the feature of the image's FIRST reference caption (CLIP text encoder of the profile,
  ``models.clip``), and the caption is scored against ALL the
  image's references, that one included: at lambda = 1 (and increasingly towards it) the model is
  fed the feature of a caption it is then scored against, so those points measure how well the
  captioner reconstructs a caption from its own text feature, an upper bound rather than a fair
  captioning score.
- the mix is L2-normalised: the captioners are trained on unit-norm features, and the plain
  interpolation of two unit vectors at cosine c has norm sqrt(lambda^2 + (1-lambda)^2 +
  2 lambda (1-lambda) c) < 1 (about 0.8 at lambda = 0.5 for CLIP's typical image-text cosine),
  so without it the curve would also measure a norm shift the paper does not discuss.
- no correction is applied (no mean shift, no projection): the model's own inference path
  (``decode_features`` of its method module) on m(lambda) directly.
Scores: ``pipeline.evaluation.metrics.caption_metrics`` (BLEU-1..4, METEOR, ROUGE-L, CIDEr; SPICE when its
jars exist) per lambda.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from pipeline import methods, paths, runner
from pipeline.config import Config
from pipeline.data.aligned import Column, aligned_shards, check_dim
from pipeline.data.shards import ShardedArtifact, require_same_model
from pipeline.evaluation.metrics import caption_metrics
from pipeline.models.clip import clip_for
from pipeline.stage import write_json
from pipeline.vectors import l2_normalize

PLOTTED = ("CIDEr", "BLEU-4")


def mix_features(text: np.ndarray, image: np.ndarray, lam: float) -> np.ndarray:
    """normalize(lam * t + (1 - lam) * v), row-wise; t and v are normalised first."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must lie in [0, 1], got {lam}")
    t = l2_normalize(text).astype(np.float64)
    v = l2_normalize(image).astype(np.float64)
    if t.shape != v.shape:
        raise ValueError(f"text features {t.shape} and image features {v.shape} must have the same shape")
    return l2_normalize(lam * t + (1.0 - lam) * v)


def run_modality_gap(name: str, config: Config, out_dir: Path, progress: bool = True) -> dict:
    """Caption eval set ``config.modality_gap.evalset`` with the trained instance NAME at every lambda,
    score, and write ``modality_gap.json`` + ``modality_gap.png`` to out_dir. Streams the eval set
    shard by shard; holds only the captions and references."""
    instance = config.methods[name]
    module = methods.get(instance.method)
    if not hasattr(module, "decode_features"):
        raise ValueError(f"method {instance.method!r} (instance {name!r}) has no decode_features: the modality-gap "
                         f"analysis needs a captioner that decodes a single CLIP feature")
    g = config.modality_gap
    model, header = runner.load_checkpoint(paths.model(name) / runner.MODEL_FILE, config.device)
    images = ShardedArtifact(paths.evalset(g.evalset))
    features = ShardedArtifact(paths.eval_features(g.evalset))
    c = config.models.clip
    clip = clip_for(c.name, c.pretrained, c.seed, c.precision, config.device)
    require_same_model(model_training_features=header["clip_model"], eval_image_features=features,
                       text_encoder=clip.identity)

    predictions: dict[float, dict[str, str]] = {lam: {} for lam in g.lambdas}
    references: dict[str, list[str]] = {}
    shards = aligned_shards("image_id", [Column(features, "global"), Column(images, "references")])
    for shard in tqdm(shards, total=len(features.paths), desc=f"modality gap {name}", unit="shard",
                      disable=not progress):
        ids, refs = shard["image_id"], shard["references"]
        v = shard["global"]
        check_dim(v, clip.dim, f"eval image features of {g.evalset}")
        t = clip.encode_texts([r[0] for r in refs])            # the first reference of every image
        references.update(zip(ids, (list(r) for r in refs)))
        for lam in g.lambdas:
            captions = module.decode_features(model, mix_features(t, v, lam), instance.caption.beam_size,
                                              instance.caption.batch_size)
            predictions[lam].update(zip(ids, captions))

    rows, skipped = [], {}
    for lam in g.lambdas:
        scored = caption_metrics(predictions[lam], references, meteor=config.evaluate.meteor)
        rows.append({"lambda": lam, **{k: float(v) for k, v in scored["scores"].items()}})
        skipped.update(scored["skipped"])
    examples = {i: {str(lam): predictions[lam][i] for lam in g.lambdas} for i in sorted(references)[:5]}
    result = {"model": name, "method": instance.method, "variant": module.variant(instance.train, None),
              "evalset": g.evalset, "images": len(references), "lambdas": list(g.lambdas), "results": rows,
              "skipped": skipped, "examples": examples,
              "definition": "caption(normalize(lambda * t + (1 - lambda) * v)), v = CLIP image feature, "
                            "t = CLIP text feature of the image's first reference caption, no correction",
              "caveat": "scored against all references including the one t encodes: lambda = 1 feeds the "
                        "model a caption it is scored against (an upper bound, not a captioning score)"}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "modality_gap.json", result)
    plot_curve(rows, out_dir / "modality_gap.png", title=f"{name} ({result['variant']}) on {g.evalset}")
    return result


def plot_curve(rows: list[dict], path: Path, title: str = "") -> Path:
    """CIDEr and BLEU-4 against lambda, one panel each (a matplotlib Figure of its own: no pyplot, no
    backend to choose, no global state; imported here, so importing this module loads no matplotlib)."""
    from matplotlib.figure import Figure

    lams = [r["lambda"] for r in rows]
    fig = Figure(figsize=(4.2 * len(PLOTTED), 3.4), constrained_layout=True)
    axes = fig.subplots(1, len(PLOTTED))
    for ax, metric in zip(np.atleast_1d(axes), PLOTTED):
        values = [r.get(metric, float("nan")) for r in rows]
        ax.plot(lams, values, marker="o")
        finite = [v for v in values if np.isfinite(v)]
        ax.set_ylim(0, max(max(finite, default=0.0) * 1.15, 0.05))   # scores start at 0; no 1e-13 zoom
        ax.set_xlabel("λ (share of the text feature)")
        ax.set_ylabel(metric)
        ax.set_xlim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.set_title(metric)
    if title:
        fig.suptitle(title)
    fig.savefig(path, dpi=120)
    return Path(path)
