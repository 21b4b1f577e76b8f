"""Stage concepts: PCM-Net's concept vocabulary (frequent corpus nouns, or a fixed word list) and the
CLIP text feature of each concept's template sentence(s) (PCM-Net Eq. 1)."""
from pipeline import paths
from pipeline.data.shards import ShardedArtifact, write_table_atomic
from pipeline.extract.concepts import concept_table, noun_counts
from pipeline.models.clip import clip_for
from pipeline.stage import run, say, start


def main() -> None:
    config = start("concepts")
    k, c = config.concepts, config.models.clip
    clip = clip_for(c.name, c.pretrained, c.seed, c.precision, config.device)
    corpus = ShardedArtifact(paths.CORPUS)
    counts = noun_counts(text for batch in corpus.iter_batches(["text"]) for text in batch.column(0).to_pylist())
    words = list(k.words) if k.source == "word_list" else None
    table = concept_table(counts, clip, k.size, k.min_count, config.feature_dtype, templates=list(k.templates),
                          words=words)
    write_table_atomic(paths.CONCEPTS, table, {"model": clip.identity, "source": k.source,
                                               "templates": list(k.templates), "size": k.size,
                                               "min_count": k.min_count, "distinct_nouns": len(counts)})
    words = table.column("concept").to_pylist()
    first = "most frequent" if k.source == "corpus_nouns" else "first of the list"
    say(f"concepts: {len(words)} concepts ({first}: {', '.join(words[:8])}; {len(k.templates)} template(s)) "
        f"-> {paths.CONCEPTS}")


if __name__ == "__main__":
    run(main)
