"""Stages encode_text, encode_synthetic and encode_eval@NAME: CLIP features of the corpus captions,
of their synthetic images, and of eval set NAME's real images.

    python -m stages.encode text | synthetic | eval NAME
"""
import sys

from pipeline import paths
from pipeline.data.shards import ShardedArtifact, write_sharded
from pipeline.extract.encode import encode_image_table, encode_text_table, patch_grid
from pipeline.models.clip import clip_for
from pipeline.stage import base_fingerprint, say, shard_summary, start


def main(kind: str, name: str | None = None) -> None:
    stage = {"text": "encode_text", "synthetic": "encode_synthetic", "eval": "encode_eval"}[kind]
    config = start(stage)
    c, batch, dtype = config.models.clip, config.encode.batch_size, config.feature_dtype

    def clip():  # resolved in the process that runs the shard (a Ray worker loads it once)
        return clip_for(c.name, c.pretrained, c.seed, c.precision, config.device)

    if kind == "text":
        source, out, meta = ShardedArtifact(paths.CORPUS), paths.TEXT_FEATURES, {}

        def make_table(task):
            return encode_text_table(source.read_shard(task.index, ["caption_id", "text"]), clip(), batch, dtype)
    else:
        id_column = "caption_id" if kind == "synthetic" else "image_id"
        source = ShardedArtifact(paths.SYNTHETIC_IMAGES if kind == "synthetic" else paths.evalset(name))
        out = paths.SYNTHETIC_FEATURES if kind == "synthetic" else paths.eval_features(name)
        meta = patch_grid(clip())

        def make_table(task):
            return encode_image_table(source.read_shard(task.index, [id_column, "image"]), clip(), id_column,
                                      batch, dtype)

    identity = clip().identity
    dvc_stage = stage if name is None else f"{stage}@{name}"
    manifest = write_sharded(out, source.num_rows, config.rows_per_shard,
                  base_fingerprint(stage, config, name, source.fingerprint, identity, module="stages.encode"),
                  make_table, {"model": identity, "dtype": dtype, **meta}, executor=config.executor,
                  stage=dvc_stage, desc=dvc_stage)
    say(f"{dvc_stage}: {source.num_rows} rows with {identity['name']} ({shard_summary(manifest)}) -> {out}")


if __name__ == "__main__":
    main(*sys.argv[1:])
