"""Stage generate: one synthetic image per corpus caption (text-to-image), in shards aligned with the corpus."""
import json

from pipeline import paths
from pipeline.data.executors import executor_for
from pipeline.data.shards import ShardedArtifact, write_sharded
from pipeline.extract.generate import generate_table
from pipeline.models.diffusion import text_to_image_for
from pipeline.stage import base_fingerprint, run, say, shard_summary, start, write_json


def main() -> None:
    config = start("generate")
    executor = executor_for(config, "generate")
    g, m = config.generate, config.models.diffusion
    corpus = ShardedArtifact(paths.CORPUS)

    def model():  # loaded in the process that runs the shard, once per process (lru_cache)
        return text_to_image_for(m.name, m.pretrained, m.seed, m.precision, config.device, g.resolution)

    def read_inputs(task):  # in the stage's process: workers get the rows, never the files
        return corpus.read_shard(task.index, ["caption_id", "text"])

    def make_table(task, captions):
        return generate_table(captions, model(), g.steps, g.guidance_scale, g.batch_size, g.seed, g.image_format)

    identity = model().identity
    manifest = write_sharded(paths.SYNTHETIC_IMAGES, corpus.num_rows, config.rows_per_shard,
                             base_fingerprint("generate", config, None, corpus.fingerprint, identity),
                             make_table, {"model": identity}, executor=executor, stage="generate",
                             desc="generate", read_inputs=read_inputs)
    say(f"generate: {manifest['num_rows']} images ({shard_summary(manifest)}) -> {paths.SYNTHETIC_IMAGES}")
    images = ShardedArtifact(paths.SYNTHETIC_IMAGES)
    if "scene" in images.columns:     # a model that records what it drew: check every image against its caption
        from pipeline.world.checker import pair_audit
        from pipeline.world.scenes import Scene
        audit = pair_audit(images.read_column("text").to_pylist(),
                           [Scene.from_dict(json.loads(s)) for s in images.read_column("scene").to_pylist()])
        write_json(paths.SYNTHETIC_IMAGES / "report.json", audit)
        say(f"generate: {audit['exact_matches']} of {audit['pairs']} images show exactly what their caption says "
            f"(the checker); mistakes made: {audit['mistakes_made']}")


if __name__ == "__main__":
    run(main)
