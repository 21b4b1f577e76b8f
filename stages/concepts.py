"""Stage concepts: PCM-Net's concept vocabulary (frequent corpus nouns) and the CLIP text feature of
"A photo of {c}" for each concept (PCM-Net Eq. 1)."""
from pipeline import paths
from pipeline.data.shards import ShardedArtifact, write_table_atomic
from pipeline.extract.concepts import PROMPT_TEMPLATE, concept_table, noun_counts
from pipeline.models.clip import clip_for
from pipeline.stage import run, say, start


def main() -> None:
    config = start("concepts")
    k, c = config.concepts, config.models.clip
    clip = clip_for(c.name, c.pretrained, c.seed, c.precision, config.device)
    corpus = ShardedArtifact(paths.CORPUS)
    counts = noun_counts(text for batch in corpus.iter_batches(["text"]) for text in batch.column(0).to_pylist())
    table = concept_table(counts, clip, k.size, k.min_count, config.feature_dtype)
    write_table_atomic(paths.CONCEPTS, table, {"model": clip.identity, "template": PROMPT_TEMPLATE, "size": k.size,
                                               "min_count": k.min_count, "distinct_nouns": len(counts)})
    words = table.column("concept").to_pylist()
    say(f"concepts: {len(words)} concepts (most frequent: {', '.join(words[:8])}) -> {paths.CONCEPTS}")


if __name__ == "__main__":
    run(main)
