"""Stage optimize: SynTIC feature optimisation (Eq. 2) of every synthetic image feature, over
corpus-wide mini-batches reshuffled each epoch; reports how far the features moved."""
import numpy as np
import pyarrow as pa

from pipeline import paths
from pipeline.data.aligned import Column, aligned_shards
from pipeline.data.executors import torch_threads
from pipeline.data.shards import ShardedArtifact, feature_array, require_same_model, write_sharded
from pipeline.methods.syntic import optimize_features
from pipeline.stage import base_fingerprint, run, say, shard_summary, start, write_json


def main() -> None:
    config = start("optimize")
    o = config.optimize
    images, texts = ShardedArtifact(paths.SYNTHETIC_FEATURES), ShardedArtifact(paths.TEXT_FEATURES)
    model = require_same_model(synthetic_images=images, corpus_texts=texts)
    shards = list(aligned_shards("caption_id", [Column(images, "global"), Column(texts, "text_feature")]))
    ids = [i for shard in shards for i in shard["caption_id"]]
    with torch_threads(config.threads_per_task):  # a parameter: float sums depend on the thread count
        optimized, report = optimize_features(np.concatenate([s["global"] for s in shards]),
                                              np.concatenate([s["text_feature"] for s in shards]), tau=o.tau,
                                              lr=o.lr, epochs=o.epochs, batch_size=o.batch_size, seed=o.seed,
                                              progress=True)

    def make_table(task):
        return pa.table({"caption_id": ids[task.start:task.stop],
                         "global": feature_array(optimized[task.start:task.stop], config.feature_dtype)})

    manifest = write_sharded(paths.OPTIMIZED, images.num_rows, config.rows_per_shard,
                             base_fingerprint("optimize", config, None, images.fingerprint, texts.fingerprint),
                             make_table, {"model": model, "optimize": {"tau": o.tau, "lr": o.lr, "epochs": o.epochs,
                                                                       "batch_size": o.batch_size}},
                             stage="optimize", desc="optimize (Eq. 2)")
    write_json(paths.OPTIMIZE_REPORT, report)
    say(f"optimize: {manifest['num_rows']} features (tau={o.tau}, lr={o.lr}, {o.epochs} epochs of mini-batches of "
        f"{o.batch_size}): mean move {report['mean_move']:.4f}, cosine to the own caption "
        f"{report['mean_cosine_to_own_caption_before']:.4f} -> {report['mean_cosine_to_own_caption_after']:.4f} "
        f"({shard_summary(manifest)}) -> {paths.OPTIMIZED}")


if __name__ == "__main__":
    run(main)
