"""Stage generate: one synthetic image per corpus caption (text-to-image), in shards aligned with the corpus."""
from pipeline import paths
from pipeline.extract.generate import generate_table
from pipeline.runtime import diffusion_model, params, say
from pipeline.data.shards import ShardedArtifact, fingerprint, write_sharded


def main() -> None:
    p = params()
    g = p["generate"]
    corpus = ShardedArtifact(paths.CORPUS)
    model = diffusion_model(p)
    recipe = {k: g[k] for k in ("steps", "guidance_scale", "seed", "image_format")}  # batch size changes no pixel

    def make_table(task):
        from pipeline.runtime import diffusion_model  # resolved in the worker process (Ray)
        captions = corpus.read_shard(task.index, ["caption_id", "text"])
        return generate_table(captions, diffusion_model(p), g["steps"], g["guidance_scale"], g["batch_size"],
                              g["seed"], g["image_format"])

    manifest = write_sharded(paths.SYNTHETIC_IMAGES, corpus.num_rows, p["rows_per_shard"],
                             fingerprint("generate", corpus.fingerprint, model.identity, recipe),
                             make_table, {"model": model.identity, "recipe": recipe},
                             executor=p["executor"], desc="generate")
    say(f"generate: {manifest['num_rows']} images in {len(manifest['shards'])} shards "
        f"({manifest['kept_from_previous_run']} shards kept from a previous run) -> {paths.SYNTHETIC_IMAGES}")


if __name__ == "__main__":
    main()
