"""Stage concepts: PCM-Net's concept vocabulary (frequent corpus nouns) and the CLIP text feature of
"A photo of {c}" for each concept (PCM-Net Eq. 1)."""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Iterable

import numpy as np
import pyarrow as pa

from pipeline import paths
from pipeline.extract.concepts import PROMPT_TEMPLATE, concept_prompt, noun_counts, ranked_concepts
from pipeline.runtime import clip_model, params, say
from pipeline.data.shards import ShardedArtifact, feature_array, write_table_atomic

OUTPUT = "concepts.parquet"


def corpus_texts(corpus: ShardedArtifact) -> Iterable[str]:
    """The corpus captions, streamed shard by shard."""
    for batch in corpus.iter_batches(["text"]):
        yield from batch.column(0).to_pylist()


def concept_table(counts: Counter, clip, size: int, min_count: int, dtype: str,
                  batch_size: int = 256) -> pa.Table:
    """concept (str), count (int64), text_feature (CLIP feature of "A photo of {c}")."""
    ranked = ranked_concepts(counts, size, min_count)
    if not ranked:
        raise ValueError(f"no noun occurs at least {min_count} times in the corpus: the concept vocabulary "
                         f"would be empty (lower concepts.min_count or use a larger corpus)")
    words = [w for w, _ in ranked]
    prompts = [concept_prompt(w) for w in words]
    features = np.concatenate([clip.encode_texts(prompts[s:s + batch_size])
                               for s in range(0, len(prompts), batch_size)])
    return pa.table({"concept": pa.array(words, pa.string()),
                     "count": pa.array([c for _, c in ranked], pa.int64()),
                     "text_feature": feature_array(features, dtype)})


def build(p: dict, out: Path | None = None) -> pa.Table:
    """Read the corpus artifact, build the vocabulary, encode it, write concepts.parquet."""
    c = p["concepts"]
    clip = clip_model(p)
    counts = noun_counts(corpus_texts(ShardedArtifact(paths.CORPUS)))
    table = concept_table(counts, clip, int(c["size"]), int(c.get("min_count", 2)), p["feature_dtype"])
    out = Path(out) if out is not None else paths.CONCEPTS / OUTPUT
    write_table_atomic(out, table, {"model": clip.identity, "template": PROMPT_TEMPLATE,
                                    "size": int(c["size"]), "min_count": int(c.get("min_count", 2)),
                                    "distinct_nouns": len(counts)})
    return table


def main() -> None:
    p = params()
    table = build(p)
    words = table.column("concept").to_pylist()
    say(f"concepts: {len(words)} concepts (most frequent: {', '.join(words[:8])}) "
        f"-> {paths.CONCEPTS / OUTPUT}")


if __name__ == "__main__":
    main()
