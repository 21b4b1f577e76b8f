"""Stage optimize: SynTIC feature optimisation (Eq. 2) of every synthetic image feature, shard by shard."""
import pyarrow as pa

from pipeline import paths
from pipeline.data.aligned import Column, aligned_shards
from pipeline.data.shards import ShardedArtifact, feature_array, require_same_model, write_sharded
from pipeline.methods.syntic import optimize_features
from pipeline.stage import base_fingerprint, say, shard_summary, start


def main() -> None:
    config = start("optimize")
    o = config.optimize
    images, texts = ShardedArtifact(paths.SYNTHETIC_FEATURES), ShardedArtifact(paths.TEXT_FEATURES)
    model = require_same_model(synthetic_images=images, corpus_texts=texts)

    def make_table(task):
        shard = next(aligned_shards("caption_id", [Column(images, "global"), Column(texts, "text_feature")],
                                    order=[task.index]))
        optimized = optimize_features(shard["global"], shard["text_feature"], tau=o.tau, lr=o.lr,
                                      steps=o.steps, batch_size=o.batch_size, seed=o.seed + task.index)
        return pa.table({"caption_id": shard["caption_id"], "global": feature_array(optimized, config.feature_dtype)})

    manifest = write_sharded(paths.OPTIMIZED, images.num_rows, config.rows_per_shard,
                             base_fingerprint("optimize", config, None, images.fingerprint, texts.fingerprint),
                             make_table, {"model": model, "optimize": {"tau": o.tau, "lr": o.lr, "steps": o.steps,
                                                                       "batch_size": o.batch_size}},
                             executor=config.executor, stage="optimize", desc="optimize (Eq. 2)")
    say(f"optimize: {manifest['num_rows']} features (tau={o.tau}, lr={o.lr}, {o.steps} Adam steps per mini-batch "
        f"of {o.batch_size}; {shard_summary(manifest)}) -> {paths.OPTIMIZED}")


if __name__ == "__main__":
    main()
