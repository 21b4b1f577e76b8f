"""The ``synthcap`` command: what a user does with a trained pipeline besides ``dvc repro``.

    synthcap status                                   what is trained, on which models, with which metrics
    synthcap score RESULTS --evalset NAME             anyone's captions scored exactly as evaluate@ scores ours
    synthcap score RESULTS --references FILE          the COCO metrics against a references file
"""
from __future__ import annotations

import argparse
import json
import sys

from pipeline import config as cfg
from pipeline import methods, paths
from pipeline.data.evalsets import read_references
from pipeline.data.shards import ShardedArtifact, describe_model
from pipeline.evaluation.evaluate import evaluate_captions
from pipeline.evaluation.metrics import caption_metrics
from pipeline.evaluation.results import match, read_predictions

SHOWN = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE", "CLIPScore", "RefCLIPScore")


def status(args) -> int:
    """Every method instance of params.yaml: trained or not (and on which CLIP), and its metrics."""
    config = cfg.load()
    print(f"Profile {config.profile}: CLIP {describe_model(vars(config.models.clip))}, "
          f"detector {config.models.detector.name}, text-to-image {config.models.diffusion.name}")
    for name, instance in config.methods.items():
        variant = methods.get(instance.method).variant(instance.train, instance.caption)
        report_file = paths.model(name) / "train_report.json"
        if not report_file.is_file():
            print(f"  {name} ({instance.method}, {variant}): not trained — `dvc repro train@{name}`")
            continue
        report = json.loads(report_file.read_text())
        print(f"  {name} ({instance.method}, {variant}): trained on features of "
              f"{describe_model(report['clip_model'])}; {report['summary']}")
        for evalset in config.evalsets:
            metrics_file = paths.metrics(name, evalset)
            if not metrics_file.is_file():
                print(f"    {evalset}: not evaluated — `dvc repro evaluate@{name}-{evalset}`")
                continue
            m = json.loads(metrics_file.read_text())
            scores = "  ".join(f"{k} {m[k]:.3f}" for k in SHOWN if k in m)
            print(f"    {evalset} ({m.get('images_evaluated', '?')} images, {m.get('images_skipped', 0)} skipped): "
                  f"{scores}")
    report = paths.REPORT / "index.html"
    print(f"Report: {report.relative_to(paths.REPO) if report.is_file() else 'not written yet (dvc repro report)'}")
    return 0


def score(args) -> int:
    """Score a result file (COCO results, Karpathy-style or `synthcap caption` JSON Lines) with the
    evaluate stage's protocol; say how many images matched, which are missing and which results match
    no image."""
    predictions = read_predictions(args.results, args.method)
    if args.evalset:
        config = cfg.load()
        if args.evalset not in config.evalsets:
            raise ValueError(f"params.yaml has no eval set {args.evalset!r} (evalsets: {', '.join(config.evalsets)})")
        ids = ShardedArtifact(paths.evalset(args.evalset)).read_column("image_id").to_pylist()
        matched, missing, extra = match(predictions, ids)
        metrics, details = evaluate_captions(matched, args.evalset, config)
        skipped = details["skipped_metrics"]
    else:
        references = read_references(args.references, args.format)
        matched, missing, extra = match(predictions, list(references))
        if not matched:
            raise ValueError(f"no result of {args.results} matches an image of {args.references}")
        result = caption_metrics(matched, {i: references[i] for i in matched})
        metrics, skipped = result["scores"], dict(result["skipped"])
        skipped["CLIPScore"] = skipped["RefCLIPScore"] = ("needs the eval set's cached image features: "
                                                          "score with --evalset NAME")
    print(f"{len(matched)} images matched, {len(missing)} missing, {len(extra)} results matching no image")
    for name, shown in (("missing", missing), ("matching no image", extra)):
        if shown:
            print(f"  {name}: {', '.join(map(str, shown[:10]))}" + (f" ... ({len(shown) - 10} more)" if len(shown) > 10 else ""))
    for key, value in metrics.items():
        print(f"{key}\t{value:.6f}" if isinstance(value, float) else f"{key}\t{value}")
    for key, reason in skipped.items():
        print(f"{key}\tskipped: {reason}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="synthcap", description="Text-only image captioning from synthetic "
                                     "image-text pairs: status of the pipeline's trained captioners.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("status", help="what is trained, on which models, with which metrics")
    p.set_defaults(run=status)
    p = sub.add_parser("score", help="score a result file with the same protocol as evaluate@")
    p.add_argument("results", help="COCO results [{image_id, caption}], Karpathy-style [{image_name, prediction}] "
                                   "or JSON Lines from `synthcap caption`")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--evalset", help="an eval set of params.yaml: its references and cached image features "
                                         "(every metric, CLIPScore included)")
    where.add_argument("--references", help="a references file (any caption format; COCO metrics only)")
    p.add_argument("--format", default="auto", help="the references file's format (default: by content)")
    p.add_argument("--method", help="the method whose lines to score, in a JSON Lines file of several")
    p.set_defaults(run=score)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (cfg.ConfigError, FileNotFoundError, ValueError) as err:
        print(f"synthcap {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
