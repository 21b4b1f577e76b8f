"""Stage support: FAISS index over the corpus text features (SynTIC Eq. 3) and how close top-k stays to exact."""
import numpy as np

from pipeline import paths
from pipeline.runtime import evalsets, params, say, write_json
from pipeline.data.shards import ShardedArtifact, feature_numpy, require_same_model
from pipeline.support import SupportSet


def sample_features(artifact: ShardedArtifact, column: str, n: int) -> np.ndarray:
    """The first ``n`` rows' features (shards are already in corpus order: no need to read them all)."""
    parts, have = [], 0
    for batch in artifact.iter_batches([column], batch_size=max(n, 1)):
        parts.append(feature_numpy(batch.column(0)))
        have += batch.num_rows
        if have >= n:
            break
    return np.concatenate(parts)[:n]


def main() -> None:
    p = params()
    s = p["support"]
    texts = ShardedArtifact(paths.TEXT_FEATURES)
    model = require_same_model(corpus_texts=texts, optimized=ShardedArtifact(paths.OPTIMIZED))
    features = np.concatenate([feature_numpy(b.column(0)) for b in texts.iter_batches(["text_feature"])])
    support = SupportSet.build(features, index=s["index"], nprobe=s["nprobe"] if "IVF" in s["index"] else None)
    support.save(paths.SUPPORT)

    queries = {"synthetic (optimised)": sample_features(ShardedArtifact(paths.OPTIMIZED), "global", s["agreement_sample"])}
    for name in evalsets(p):
        queries[f"eval {name}"] = sample_features(ShardedArtifact(paths.EVAL_FEATURES / name), "global",
                                                  s["agreement_sample"])
    agreement = {name: (support.projection_agreement(q, s["tau"], s["top_k"]) if s["top_k"] else "exact projection")
                 for name, q in queries.items()}
    write_json(paths.SUPPORT / "report.json", {"model": model, "support_size": support.n, "index": s["index"],
                                               "tau": s["tau"], "top_k": s["top_k"],
                                               "top_k_vs_exact_cosine": agreement})
    say(f"support: {support.n} text features in a FAISS {s['index']} index; top-{s['top_k']} vs exact Eq. 3 "
        f"projection: " + ", ".join(f"{k}: mean cos {v['mean_cosine']:.4f}" if isinstance(v, dict) else f"{k}: {v}"
                                    for k, v in agreement.items()))


if __name__ == "__main__":
    main()
