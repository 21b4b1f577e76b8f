"""Scoring one method's captions of one eval set: the COCO caption metrics (pycocoevalcap) and
CLIPScore / RefCLIPScore from the eval set's cached CLIP image features, with the number of images
evaluated and skipped (and why) beside the numbers."""
from __future__ import annotations

import json

import numpy as np

from pipeline import paths
from pipeline.config import Config
from pipeline.data.aligned import check_dim
from pipeline.data.shards import ShardedArtifact, require_same_model
from pipeline.evaluation.metrics import caption_metrics, clip_score, ref_clip_score, start_meteor
from pipeline.stage import read_json

CLIPSCORE_PROMPT = "A photo depicts "  # Hessel et al. 2021 prefix every caption with it


def evaluate_captions(predictions: dict[str, str], evalset: str, config: Config) -> tuple[dict, dict]:
    """-> (metrics: {metric: float, images_evaluated, images_skipped, images_missing}, details:
    per-image scores, skipped images and metrics with reasons). ``predictions`` maps eval image ids to
    captions; images without one (a result file that misses some) are left out and counted."""
    if config.evaluate.meteor:
        start_meteor()              # its Java process loads while CLIP is imported, loaded and run below
    from pipeline.models.clip import clip_for      # open_clip: seconds to import
    images = ShardedArtifact(paths.evalset(evalset))
    features = ShardedArtifact(paths.eval_features(evalset))
    c = config.models.clip
    clip = clip_for(c.name, c.pretrained, c.seed, c.precision, config.device)
    require_same_model(eval_image_features=features, clip_for_scoring=clip.identity)
    all_ids = images.read_column("image_id").to_pylist()
    unknown = sorted(set(predictions) - set(all_ids))
    if unknown:
        raise ValueError(f"captions of {len(unknown)} image(s) that eval set {evalset} does not hold, e.g. {unknown[:3]}")
    keep = np.array([i in predictions for i in all_ids])
    ids = [i for i in all_ids if i in predictions]
    if not ids:
        raise ValueError(f"no caption of any image of eval set {evalset}")
    references = dict(zip(all_ids, images.read_column("references").to_pylist()))
    references = {i: references[i] for i in ids}

    image_features = features.read_features("global")[keep]
    check_dim(image_features, clip.dim, f"eval image features of {evalset}")
    caption_features = clip.encode_texts([CLIPSCORE_PROMPT + predictions[i] for i in ids])
    flat = clip.encode_texts([CLIPSCORE_PROMPT + r for i in ids for r in references[i]])   # one batched pass
    bounds = np.cumsum([0] + [len(references[i]) for i in ids])
    reference_features = [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    w = config.evaluate.clipscore_w
    clip_s, clip_per_image = clip_score(image_features, caption_features, w=w)
    ref_s, ref_per_image = ref_clip_score(image_features, caption_features, reference_features, w=w)
    coco = caption_metrics({i: predictions[i] for i in ids}, references, meteor=config.evaluate.meteor)
    skipped_images = read_json(paths.evalset(evalset) / "report.json")["skipped"]
    metrics = {**{k: float(v) for k, v in coco["scores"].items()}, "CLIPScore": float(clip_s),
               "RefCLIPScore": float(ref_s), "images_evaluated": len(ids), "images_skipped": len(skipped_images),
               "images_missing": len(all_ids) - len(ids)}
    details = {"skipped_metrics": coco["skipped"], "skipped_images": skipped_images, "clip_model": clip.identity["name"],
               "per_image": {i: {"CLIPScore": float(s), "RefCLIPScore": float(r)}
                             for i, s, r in zip(ids, clip_per_image, ref_per_image)}}
    if "scene" in images.columns:        # a world's eval set: every caption checked against its image's scene
        from pipeline.world.checker import exact_metrics
        from pipeline.world.scenes import Scene
        scenes = dict(zip(all_ids, images.read_column("scene").to_pylist()))
        exact, shuffled, checks = exact_metrics([predictions[i] for i in ids],
                                                [Scene.from_dict(json.loads(scenes[i])) for i in ids])
        metrics.update({k: v for k, v in exact.items() if k != "captions"})
        metrics["shuffled_control"] = {k: v for k, v in shuffled.items() if k != "captions"}
        for i, c in zip(ids, checks):
            details["per_image"][i].update(wrong=c["wrong"], missing=c["missing"], exact=bool(c["exact"]))
    return metrics, details
