"""Stages tag_vocabulary, tag_synthetic and tag_eval@NAME: the CLIP text feature of every detector
label (SynTIC Eq. 4), and detector tags of the synthetic images and of eval set NAME's images.

    python -m stages.tag vocabulary | synthetic | eval NAME
"""
import sys

from pipeline import paths
from pipeline.data.executors import executor_for
from pipeline.data.shards import ShardedArtifact, write_sharded, write_table_atomic
from pipeline.extract.tag import tag_table, vocabulary_table
from pipeline.models.detector import detector_for
from pipeline.stage import base_fingerprint, run, say, shard_summary, start


def main(kind: str, name: str | None = None) -> None:
    stage = {"vocabulary": "tag_vocabulary", "synthetic": "tag_synthetic", "eval": "tag_eval"}[kind]
    config = start(stage, *([name] if name else []))
    d, t = config.models.detector, config.tag

    def detector():  # loaded in the process that runs the shard, once per process (lru_cache)
        return detector_for(d.name, d.pretrained, d.seed, config.device)

    if kind == "vocabulary":
        from pipeline.models.clip import clip_for  # only here: tagging images loads no CLIP
        c = config.models.clip
        clip = clip_for(c.name, c.pretrained, c.seed, c.precision, config.device)
        table = vocabulary_table(detector().vocabulary, clip, config.feature_dtype)
        write_table_atomic(paths.TAG_VOCABULARY, table, {"model": clip.identity, "detector": detector().identity})
        say(f"tag_vocabulary: {table.num_rows} labels of {d.name} encoded with {c.name} -> {paths.TAG_VOCABULARY}")
        return
    executor = executor_for(config, "tag")
    id_column = "caption_id" if kind == "synthetic" else "image_id"
    source = ShardedArtifact(paths.SYNTHETIC_IMAGES if kind == "synthetic" else paths.evalset(name))
    out = paths.SYNTHETIC_TAGS if kind == "synthetic" else paths.eval_tags(name)
    draft = detector().input_size

    def read_inputs(task):  # in the stage's process: workers get the images, never the files
        return source.read_shard(task.index, [id_column, "image"])

    def make_table(task, images):
        return tag_table(images, detector(), id_column, t.threshold, t.max_tags, t.batch_size, draft_size=draft)

    dvc_stage = stage if name is None else f"{stage}@{name}"
    identity = detector().identity
    manifest = write_sharded(out, source.num_rows, config.rows_per_shard,
                             base_fingerprint(stage, config, name, source.fingerprint, identity, module="stages.tag"),
                             make_table, {"model": identity, "threshold": t.threshold}, executor=executor,
                             stage=dvc_stage, desc=dvc_stage, read_inputs=read_inputs)
    labels = ShardedArtifact(out).read_column("labels").to_pylist()
    say(f"{dvc_stage}: {manifest['num_rows']} images, {sum(not x for x in labels)} without a tag, "
        f"{sum(map(len, labels)) / max(len(labels), 1):.2f} tags per image ({shard_summary(manifest)})")


if __name__ == "__main__":
    run(main, *sys.argv[1:])
