"""Stages encode_text, encode_synthetic and encode_eval@NAME: CLIP features of the corpus captions,
of their synthetic images, and of eval set NAME's real images.

    python -m stages.encode text | synthetic | eval NAME

Per image, exactly the columns the enabled method instances read (pipeline/methods/__init__.py
``image_columns``), and ``global``: ``encode.synthetic_columns`` / ``encode.eval_columns`` in params.yaml,
derived from ``methods`` (pipeline/config.py), so that enabling an instance that reads another column
reruns these stages and nothing else does. A ResNet CLIP needing only ``global`` never builds patches.
"""
import sys

from pipeline import paths
from pipeline.data.executors import executor_for
from pipeline.data.shards import ShardedArtifact, write_sharded
from pipeline.extract.encode import encode_image_table, encode_text_table, patch_grid
from pipeline.models.clip import clip_for
from pipeline.stage import base_fingerprint, run, say, shard_summary, start


def main(kind: str, name: str | None = None) -> None:
    stage = {"text": "encode_text", "synthetic": "encode_synthetic", "eval": "encode_eval"}[kind]
    config = start(stage, *([name] if name else []))
    executor = executor_for(config, "encode")
    c, batch, dtype = config.models.clip, config.encode.batch_size, config.feature_dtype

    def clip():  # loaded in the process that runs the shard, once per process (lru_cache)
        return clip_for(c.name, c.pretrained, c.seed, c.precision, config.device)

    if kind == "text":
        source, out, meta, columns = ShardedArtifact(paths.CORPUS), paths.TEXT_FEATURES, {}, ("text_feature",)

        inputs = ["caption_id", "text"]

        def make_table(task, rows):
            return encode_text_table(rows, clip(), batch, dtype)
    else:
        id_column = "caption_id" if kind == "synthetic" else "image_id"
        source = ShardedArtifact(paths.SYNTHETIC_IMAGES if kind == "synthetic" else paths.evalset(name))
        out = paths.SYNTHETIC_FEATURES if kind == "synthetic" else paths.eval_features(name)
        columns = tuple(config.encode.synthetic_columns if kind == "synthetic" else config.encode.eval_columns)
        meta = patch_grid(clip(), columns)

        inputs = [id_column, "image"]

        def make_table(task, rows):
            return encode_image_table(rows, clip(), id_column, batch, dtype, columns)

    def read_inputs(task):  # in the stage's process: workers get the rows, never the files
        return source.read_shard(task.index, inputs)

    identity = clip().identity
    dvc_stage = stage if name is None else f"{stage}@{name}"
    manifest = write_sharded(out, source.num_rows, config.rows_per_shard,
                  base_fingerprint(stage, config, name, source.fingerprint, identity, list(columns),
                                   module="stages.encode"),
                  make_table, {"model": identity, "dtype": dtype, **meta}, executor=executor,
                  stage=dvc_stage, desc=dvc_stage, read_inputs=read_inputs)
    say(f"{dvc_stage}: {source.num_rows} rows with {identity['name']} ({shard_summary(manifest)}) -> {out}")


if __name__ == "__main__":
    run(main, *sys.argv[1:])
