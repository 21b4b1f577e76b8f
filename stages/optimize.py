"""Stages optimize and optimize_refined: SynTIC feature optimisation (Eq. 2) over corpus-wide mini-batches
reshuffled each epoch; reports how far the features moved.

    python -m stages.optimize            the original pairs: every caption's own synthetic image
    python -m stages.optimize refined    SynC's refined pairs (stage refine): the image feature of each kept
                                         caption's re-paired image, optimised against that caption over the
                                         kept rows only; a filtered caption's row holds its re-paired feature
                                         as it is (no training reads it)

Both outputs are aligned with the corpus (one row per caption), so a SynTIC instance reads either one the
same way; the second is its own stage so that changing `refine` reruns it and not the first.
"""
import sys

import numpy as np
import pyarrow as pa

from pipeline import paths
from pipeline.data.aligned import Column, aligned_shards, read_refined_pairs
from pipeline.data.executors import torch_threads
from pipeline.data.shards import ShardedArtifact, feature_array, require_same_model, write_sharded
from pipeline.methods import PAIRS
from pipeline.methods.syntic import optimize_features
from pipeline.stage import base_fingerprint, run, say, shard_summary, start, write_json


def main(pairs: str = "original") -> None:
    if pairs not in PAIRS:
        raise SystemExit(f"optimize: pairs must be one of {', '.join(PAIRS)}, got {pairs!r}")
    stage = "optimize" if pairs == "original" else "optimize_refined"
    config = start(stage)
    o = config.optimize
    images, texts = ShardedArtifact(paths.SYNTHETIC_FEATURES), ShardedArtifact(paths.TEXT_FEATURES)
    model = require_same_model(synthetic_images=images, corpus_texts=texts)
    shards = list(aligned_shards("caption_id", [Column(images, "global"), Column(texts, "text_feature")]))
    ids = [i for shard in shards for i in shard["caption_id"]]
    image, text = np.concatenate([s["global"] for s in shards]), np.concatenate([s["text_feature"] for s in shards])
    inputs, rows = [images.fingerprint, texts.fingerprint], np.arange(len(ids))
    if pairs == "refined":
        refined = ShardedArtifact(paths.REFINED)
        require_same_model(synthetic_images=images, refined_pairs=refined)
        image_row, kept = read_refined_pairs(refined, ids)
        image, rows = image[image_row], np.flatnonzero(kept)                          # re-paired, kept
        inputs.append(refined.fingerprint)
    with torch_threads(config.threads_per_task):  # a parameter: float sums depend on the thread count
        optimized, report = optimize_features(image[rows], text[rows], tau=o.tau, lr=o.lr, epochs=o.epochs,
                                              batch_size=o.batch_size, seed=o.seed, progress=True)
    out = image.copy()
    out[rows] = optimized
    folder = paths.OPTIMIZED if pairs == "original" else paths.OPTIMIZED_REFINED

    def make_table(task):
        return pa.table({"caption_id": ids[task.start:task.stop],
                         "global": feature_array(out[task.start:task.stop], config.feature_dtype)})

    manifest = write_sharded(folder, images.num_rows, config.rows_per_shard,
                             base_fingerprint(stage, config, None, *inputs, module="stages.optimize"),
                             make_table, {"model": model, **({"pairs": pairs} if pairs == "refined" else {}),
                                          "optimize": {"tau": o.tau, "lr": o.lr, "epochs": o.epochs,
                                                       "batch_size": o.batch_size}},
                             stage=stage, desc=f"{stage} (Eq. 2)")
    write_json(paths.OPTIMIZE_REPORT if pairs == "original" else paths.OPTIMIZE_REFINED_REPORT, report)
    say(f"{stage}: {len(rows)} features of {pairs} pairs (tau={o.tau}, lr={o.lr}, {o.epochs} epochs of mini-batches "
        f"of {o.batch_size}): mean move {report['mean_move']:.4f}, cosine to the own caption "
        f"{report['mean_cosine_to_own_caption_before']:.4f} -> {report['mean_cosine_to_own_caption_after']:.4f} "
        f"({shard_summary(manifest)}) -> {folder}")


if __name__ == "__main__":
    run(main, *sys.argv[1:])
