"""Stage score@NAME: another system's published result file (params.yaml external_results.NAME),
scored with the same protocol as the method instances; the report shows it beside them."""
import sys

from pipeline import paths
from pipeline.data.shards import ShardedArtifact
from pipeline.evaluation.evaluate import evaluate_captions
from pipeline.evaluation.results import match, read_predictions
from pipeline.stage import run, say, start, write_json


def main(name: str) -> None:
    config = start("score", name)
    if name not in config.external_results:
        raise SystemExit(f"score: params.yaml has no external result {name!r}")
    external = config.external_results[name]
    ids = ShardedArtifact(paths.evalset(external.evalset)).read_column("image_id").to_pylist()
    matched, missing, extra = match(read_predictions(external.path), ids)
    metrics, details = evaluate_captions(matched, external.evalset, config)
    details.update(source=external.path, label=external.label or name, unmatched_results=extra[:20],
                   images_without_a_caption=missing[:20])
    write_json(paths.captions(name, external.evalset), matched)
    write_json(paths.metrics(name, external.evalset), {**metrics, "results_unmatched": len(extra)})
    write_json(paths.evaluation(name, external.evalset), details)
    say(f"score@{name}: {len(matched)} images matched, {len(missing)} missing, {len(extra)} results matching no "
        f"image; CIDEr {metrics['CIDEr']:.3f}")


if __name__ == "__main__":
    run(main, sys.argv[1])
