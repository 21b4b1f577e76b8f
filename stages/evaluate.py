"""Stage evaluate@NAME: COCO caption metrics (pycocoevalcap) and CLIPScore / RefCLIPScore on every eval set."""
import json
import sys

import numpy as np

from pipeline import paths
from pipeline.data.aligned import check_dim
from pipeline.evaluation.metrics import caption_metrics, clip_score, ref_clip_score
from pipeline.runtime import clip_model, evalsets, params, say, write_json
from pipeline.data.shards import ShardedArtifact, feature_numpy, require_same_model

CLIPSCORE_PROMPT = "A photo depicts "  # Hessel et al. 2021 prefix every caption with it


def evaluate_evalset(p: dict, predictions: dict[str, str], evalset: str) -> tuple[dict, dict]:
    images = ShardedArtifact(paths.EVALSETS / evalset)
    features = ShardedArtifact(paths.EVAL_FEATURES / evalset)
    clip = clip_model(p)
    require_same_model(eval_image_features=features, clip_for_scoring=clip.identity)
    ids = images.read_column("image_id").to_pylist()
    references = dict(zip(ids, images.read_column("references").to_pylist()))
    coco = caption_metrics(predictions, references)

    image_features = np.concatenate([feature_numpy(b.column(0)) for b in features.iter_batches(["global"])])
    check_dim(image_features, clip.dim, f"eval image features of {evalset}")
    caption_features = clip.encode_texts([CLIPSCORE_PROMPT + predictions[i] for i in ids])
    flat = clip.encode_texts([CLIPSCORE_PROMPT + r for i in ids for r in references[i]])   # one batched pass
    bounds = np.cumsum([0] + [len(references[i]) for i in ids])
    reference_features = [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    w = p["evaluate"]["clipscore_w"]
    clip_s, clip_per_image = clip_score(image_features, caption_features, w=w)
    ref_s, ref_per_image = ref_clip_score(image_features, caption_features, reference_features, w=w)
    scores = {**coco["scores"], "CLIPScore": clip_s, "RefCLIPScore": ref_s}
    details = {"skipped": coco["skipped"], "clip_model": clip.identity["name"],
               "per_image": {i: {"CLIPScore": float(c), "RefCLIPScore": float(r)}
                             for i, c, r in zip(ids, clip_per_image, ref_per_image)}}
    return {k: float(v) for k, v in scores.items()}, details


def main(name: str) -> None:
    p = params()
    folder = paths.method_dir(name)
    metrics, details = {}, {}
    for evalset in evalsets(p):
        predictions = json.loads((folder / "captions" / f"{evalset}.json").read_text(encoding="utf-8"))
        metrics[evalset], details[evalset] = evaluate_evalset(p, predictions, evalset)
        shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics[evalset].items())
        say(f"evaluate@{name} on {evalset}: {shown}")
        for metric, reason in details[evalset]["skipped"].items():
            say(f"evaluate@{name}: {metric} skipped: {reason}")
    write_json(folder / "metrics.json", metrics)
    write_json(folder / "evaluation.json", details)


if __name__ == "__main__":
    main(sys.argv[1])
