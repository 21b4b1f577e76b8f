"""Stage refine: SynC's refined synthetic pairs (pipeline/refine.py). Per corpus caption, in shards aligned
with the corpus: the synthetic image row it is re-paired with, the cycle score, and whether the filter keeps
it; artifacts/metrics/refine.json gives the counts, the score distribution and, where the drawings are
known (the world), the fraction of pairs whose image shows its caption before and after refinement."""
import json
import time

import numpy as np
import pyarrow as pa

from pipeline import paths
from pipeline.data.shards import ShardedArtifact, require_same_model, write_sharded
from pipeline.refine import refine_pairs, score_summary
from pipeline.stage import base_fingerprint, run, say, shard_summary, start, write_json


def pair_audits(image_row: np.ndarray, kept: np.ndarray) -> dict | None:
    """The checker's audit (pipeline/world/checker.py) of the original pairs, the re-paired ones and the
    kept re-paired ones, when the text-to-image model recorded what it drew (the world); else None."""
    images = ShardedArtifact(paths.SYNTHETIC_IMAGES)
    if "scene" not in images.columns:
        return None
    from pipeline.world.checker import pair_audit
    from pipeline.world.scenes import Scene
    captions = images.read_column("text").to_pylist()
    scenes = [Scene.from_dict(json.loads(s)) for s in images.read_column("scene").to_pylist()]
    repaired = [scenes[j] for j in image_row]
    audits = {"original": pair_audit(captions, scenes), "re-paired": pair_audit(captions, repaired),
              "refined": pair_audit([c for c, k in zip(captions, kept) if k], [s for s, k in zip(repaired, kept) if k])}
    return {name: {k: a[k] for k in ("pairs", "exact_matches", "exact_match_fraction", "metrics")}
            for name, a in audits.items()}


def main() -> None:
    config = start("refine")
    r = config.refine
    texts, images = ShardedArtifact(paths.TEXT_FEATURES), ShardedArtifact(paths.SYNTHETIC_FEATURES)
    model = require_same_model(corpus_texts=texts, synthetic_images=images)
    ids = texts.read_column("caption_id").to_pylist()
    if images.read_column("caption_id").to_pylist() != ids:
        raise ValueError(f"{paths.SYNTHETIC_FEATURES} and {paths.TEXT_FEATURES} hold other captions: rerun the pipeline")
    began = time.perf_counter()
    text, image = texts.read_features("text_feature"), images.read_features("global")
    if r.text_similarity == "clip":       # the world and offline profiles: CLIP's text features, cached
        sentence, sentence_model = text, model
    else:                                 # SynC's sentence embedding (pipeline/models/sentence.py)
        from pipeline.models.sentence import sentence_encoder_for
        encode, sentence_model = sentence_encoder_for(r.text_similarity, config.device)
        corpus = ShardedArtifact(paths.CORPUS)
        if corpus.read_column("caption_id").to_pylist() != ids:
            raise ValueError(f"{paths.CORPUS} and {paths.TEXT_FEATURES} hold other captions: rerun the pipeline")
        sentence = encode(corpus.read_column("text").to_pylist())
    refined = refine_pairs(text, image, sentence, k=r.k, kr=r.kr, tau=r.tau, index=r.index, nprobe=r.nprobe,
                           batch_size=r.batch_size, device=config.device,
                           threads=config.threads_per_task, progress=True)
    seconds = time.perf_counter() - began

    def make_table(task):
        rows = slice(task.start, task.stop)
        return pa.table({"caption_id": ids[rows], "image_row": pa.array(refined.image_row[rows], pa.int64()),
                         "image_caption_id": [ids[j] for j in refined.image_row[rows]],
                         "score": pa.array(refined.score[rows], pa.float32()),
                         "kept": pa.array(refined.kept[rows], pa.bool_())})

    manifest = write_sharded(paths.REFINED, len(ids), config.rows_per_shard,
                             base_fingerprint("refine", config, None, texts.fingerprint, images.fingerprint,
                                              sentence_model),
                             make_table, {"model": model, "text_similarity_model": sentence_model,
                                          "refine": {"k": r.k, "kr": r.kr, "tau": r.tau, "index": r.index}},
                             stage="refine", desc="refine")
    report = {**score_summary(refined.score, refined.kept), "k": r.k, "kr": r.kr, "tau": r.tau,
              "retrieval_model": r.retrieval_model, "text_similarity": r.text_similarity, "index": r.index,
              "re-paired_to_another_image": int((refined.image_row != np.arange(len(ids))).sum()),
              "images_used": int(np.unique(refined.image_row[refined.kept]).size), "seconds": round(seconds, 2)}
    audit = pair_audits(refined.image_row, refined.kept)
    if audit is not None:
        report["pair_audit"] = audit
    write_json(paths.REFINE_REPORT, report)
    shown = "" if audit is None else (
        f"; pairs whose image shows its caption (the checker): {audit['original']['exact_match_fraction']:.3f} "
        f"original -> {audit['re-paired']['exact_match_fraction']:.3f} re-paired -> "
        f"{audit['refined']['exact_match_fraction']:.3f} refined (kept)")
    say(f"refine: {report['kept']} of {report['captions']} pairs kept (K={r.k}, Kr={r.kr}, tau={r.tau}), "
        f"{report['re-paired_to_another_image']} re-paired to another image, in {seconds:.1f}s{shown} "
        f"({shard_summary(manifest)}) -> {paths.REFINED}")


if __name__ == "__main__":
    run(main)
