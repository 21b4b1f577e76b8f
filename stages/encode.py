"""Stage encode: CLIP features of the corpus texts, the synthetic images and every eval set's images."""
from pipeline import paths
from pipeline.extract.encode import encode_image_table, encode_text_table, patch_grid
from pipeline.runtime import clip_model, evalsets, params, say
from pipeline.data.shards import ShardedArtifact, fingerprint, write_sharded


def encode_images(p: dict, source: ShardedArtifact, out, id_column: str, desc: str) -> dict:
    clip = clip_model(p)
    dtype, batch = p["feature_dtype"], p["encode"]["batch_size"]

    def make_table(task):
        from pipeline.runtime import clip_model
        images = source.read_shard(task.index, [id_column, "image"])
        return encode_image_table(images, clip_model(p), id_column, batch, dtype)

    return write_sharded(out, source.num_rows, p["rows_per_shard"],
                         fingerprint("encode-images", source.fingerprint, clip.identity, dtype),
                         make_table, {"model": clip.identity, "dtype": dtype, **patch_grid(clip)},
                         executor=p["executor"], desc=desc)


def main() -> None:
    p = params()
    clip = clip_model(p)
    dtype, batch = p["feature_dtype"], p["encode"]["batch_size"]
    corpus = ShardedArtifact(paths.CORPUS)

    def text_table(task):
        from pipeline.runtime import clip_model
        return encode_text_table(corpus.read_shard(task.index, ["caption_id", "text"]), clip_model(p), batch, dtype)

    write_sharded(paths.TEXT_FEATURES, corpus.num_rows, p["rows_per_shard"],
                  fingerprint("encode-text", corpus.fingerprint, clip.identity, dtype),
                  text_table, {"model": clip.identity, "dtype": dtype}, executor=p["executor"], desc="encode texts")
    encode_images(p, ShardedArtifact(paths.SYNTHETIC_IMAGES), paths.SYNTHETIC_FEATURES, "caption_id",
                  "encode synthetic images")
    for name in evalsets(p):
        encode_images(p, ShardedArtifact(paths.EVALSETS / name), paths.EVAL_FEATURES / name, "image_id",
                      f"encode eval images ({name})")
    say(f"encode: features of {corpus.num_rows} captions, their synthetic images and "
        f"{len(evalsets(p))} eval set(s) with {clip.identity['name']} -> {paths.FEATURES}")


if __name__ == "__main__":
    main()
