"""Stages support and target_support@NAME: Eq. 3 support sets (FAISS) over the corpus's text features,
and over another caption file's captions for cross-domain "-TT" captioning; each carries its own tau
and top-k, and its report states how close the top-k projection stays to the exact one on synthetic
image features. Stage support_agreement@EVALSET measures the same on an eval set's real image features,
the queries the corpus set projects at inference: a stage of its own, so that editing an eval set
reruns this measurement only, never the index build.

    python -m stages.support corpus | target NAME | agreement EVALSET
"""
import sys

import numpy as np

from pipeline import paths
from pipeline.data.captions import clean_captions, read_captions
from pipeline.data.shards import ShardedArtifact, feature_numpy, require_same_model
from pipeline.stage import run, say, start, write_json
from pipeline.support import SupportSet


def sample_features(artifact: ShardedArtifact, column: str, n: int) -> np.ndarray:
    """The first ``n`` rows' features (shards are in corpus order: no need to read them all)."""
    parts, have = [], 0
    for batch in artifact.iter_batches([column], batch_size=max(n, 1)):
        parts.append(feature_numpy(batch.column(0)))
        have += batch.num_rows
        if have >= n:
            break
    return np.concatenate(parts)[:n]


def agreement(support: SupportSet, queries: dict[str, np.ndarray]) -> dict:
    if support.top_k is None:
        return {name: "exact projection" for name in queries}
    return {name: support.projection_agreement(q, support.tau, support.top_k) for name, q in queries.items()}


def corpus_support() -> None:
    config = start("support")
    s = config.support
    texts, images = ShardedArtifact(paths.TEXT_FEATURES), ShardedArtifact(paths.SYNTHETIC_FEATURES)
    model = require_same_model(corpus_texts=texts, synthetic_images=images)
    features = texts.read_features("text_feature")
    support = SupportSet.build(features, index=s.index, nprobe=s.nprobe, tau=s.tau, top_k=s.top_k, model=model)
    out = paths.support("corpus")
    support.save(out)
    queries = {"synthetic images": sample_features(images, "global", s.agreement_sample)}
    report = {"support_size": support.n, "index": s.index, "tau": s.tau, "top_k": s.top_k,
              "top_k_vs_exact_cosine": agreement(support, queries)}
    write_json(out / "report.json", report)
    say(f"support: {support.n} corpus text features in a FAISS {s.index} index (tau {s.tau}, top-k {s.top_k}); "
        f"top-k vs exact: {report['top_k_vs_exact_cosine']}")


def eval_agreement(evalset: str) -> None:
    config = start("support_agreement", evalset)
    if evalset not in config.evalsets:
        raise SystemExit(f"support_agreement: params.yaml has no eval set {evalset!r}")
    support, images = SupportSet.load(paths.support("corpus")), ShardedArtifact(paths.eval_features(evalset))
    require_same_model(corpus_support_set=support.model, eval_images=images)
    queries = {f"eval images ({evalset})": sample_features(images, "global", config.support.agreement_sample)}
    report = {"support_size": support.n, "index": support.index_factory, "tau": support.tau, "top_k": support.top_k,
              "top_k_vs_exact_cosine": agreement(support, queries)}
    write_json(paths.support_agreement(evalset), report)
    say(f"support_agreement@{evalset}: top-k vs exact on real image features: {report['top_k_vs_exact_cosine']}")


def target_support(name: str) -> None:
    config = start("target_support", name)
    if name not in config.target_supports:
        raise SystemExit(f"target_support: params.yaml has no target support set {name!r}")
    t, c = config.target_supports[name], config.models.clip
    read = read_captions(t.path, t.format, splits=t.splits)
    kept, cleaning = clean_captions(read, max_words=t.max_words, deduplicate=t.deduplicate)
    texts = [k.text for k in kept][:t.max_captions]
    from pipeline.models.clip import clip_for  # only here: the corpus support set reuses cached features
    clip = clip_for(c.name, c.pretrained, c.seed, c.precision, config.device)
    support = SupportSet.build(clip.encode_texts(texts, config.encode.batch_size), index=t.index, nprobe=t.nprobe,
                               tau=t.tau, top_k=t.top_k, model=clip.identity)
    out = paths.support(name)
    support.save(out)
    write_json(out / "report.json", {"support_size": support.n, "source": str(t.path), "cleaning": cleaning,
                                     "tau": t.tau, "top_k": t.top_k, "index": t.index})
    say(f"target_support@{name}: {support.n} captions of {t.path} (tau {t.tau}, top-k {t.top_k})")


if __name__ == "__main__":
    if sys.argv[1] == "corpus":
        run(corpus_support)
    else:
        run({"target": target_support, "agreement": eval_agreement}[sys.argv[1]], sys.argv[2])
