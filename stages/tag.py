"""Stage tag: detector labels per synthetic and eval image, and CLIP text features of the tag vocabulary."""
from pipeline import paths
from pipeline.runtime import clip_model, detector_model, evalsets, params, say
from pipeline.data.shards import ShardedArtifact, fingerprint, write_sharded, write_table_atomic
from pipeline.extract.tag import tag_table, vocabulary_table


def tag_images(p: dict, source: ShardedArtifact, out, id_column: str, desc: str) -> dict:
    detector = detector_model(p)
    t = p["tag"]

    def make_table(task):
        from pipeline.runtime import detector_model
        images = source.read_shard(task.index, [id_column, "image"])
        return tag_table(images, detector_model(p), id_column, t["threshold"], t["max_tags"], t["batch_size"])

    return write_sharded(out, source.num_rows, p["rows_per_shard"],
                         fingerprint("tag", source.fingerprint, detector.identity, t["threshold"], t["max_tags"]),
                         make_table, {"model": detector.identity, "threshold": t["threshold"]},
                         executor=p["executor"], desc=desc)


def main() -> None:
    p = params()
    detector, clip = detector_model(p), clip_model(p)
    vocabulary = vocabulary_table(detector.vocabulary, clip, p["feature_dtype"])
    write_table_atomic(paths.TAG_VOCABULARY / "vocabulary.parquet", vocabulary,
                       {"model": clip.identity, "detector": detector.identity})
    counts = {}
    for name, source, out, id_column in [("synthetic", paths.SYNTHETIC_IMAGES, paths.SYNTHETIC_TAGS, "caption_id")] + [
            (n, paths.EVALSETS / n, paths.EVAL_TAGS / n, "image_id") for n in evalsets(p)]:
        artifact = ShardedArtifact(source)
        tag_images(p, artifact, out, id_column, f"tag {name}")
        labels = ShardedArtifact(out).read_column("labels").to_pylist()
        counts[name] = {"images": len(labels), "without_tags": sum(not l for l in labels),
                        "mean_tags": sum(map(len, labels)) / max(len(labels), 1)}
    say(f"tag: {detector.identity['name']} at threshold {p['tag']['threshold']}: {counts}")


if __name__ == "__main__":
    main()
