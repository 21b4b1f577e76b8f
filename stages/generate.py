"""Stage generate: one synthetic image per corpus caption (text-to-image), in shards aligned with the corpus."""
from pipeline import paths
from pipeline.data.shards import ShardedArtifact, write_sharded
from pipeline.extract.generate import generate_table
from pipeline.models.diffusion import text_to_image_for
from pipeline.stage import base_fingerprint, say, shard_summary, start


def main() -> None:
    config = start("generate")
    g, m = config.generate, config.models.diffusion
    corpus = ShardedArtifact(paths.CORPUS)

    def model():  # resolved in the process that runs the shard (a Ray worker loads it once)
        return text_to_image_for(m.name, m.pretrained, m.seed, m.precision, config.device, g.resolution)

    def make_table(task):
        captions = corpus.read_shard(task.index, ["caption_id", "text"])
        return generate_table(captions, model(), g.steps, g.guidance_scale, g.batch_size, g.seed, g.image_format)

    identity = model().identity
    manifest = write_sharded(paths.SYNTHETIC_IMAGES, corpus.num_rows, config.rows_per_shard,
                             base_fingerprint("generate", config, None, corpus.fingerprint, identity),
                             make_table, {"model": identity}, executor=config.executor, stage="generate",
                             desc="generate")
    say(f"generate: {manifest['num_rows']} images ({shard_summary(manifest)}) -> {paths.SYNTHETIC_IMAGES}")


if __name__ == "__main__":
    main()
