"""The ``synthcap`` command: what a user does with a trained pipeline besides ``dvc repro``.

    synthcap status            what is trained, on which models, with which metrics
"""
from __future__ import annotations

import argparse
import json
import sys

from pipeline import config as cfg
from pipeline import methods, paths
from pipeline.data.shards import describe_model

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="synthcap", description="Text-only image captioning from synthetic "
                                     "image-text pairs: status of the pipeline's trained captioners.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("status", help="what is trained, on which models, with which metrics")
    p.set_defaults(run=status)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (cfg.ConfigError, FileNotFoundError, ValueError) as err:
        print(f"synthcap {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
