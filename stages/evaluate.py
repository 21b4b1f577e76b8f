"""Stage evaluate@NAME-EVALSET: COCO caption metrics (pycocoevalcap) and CLIPScore / RefCLIPScore of
instance NAME's captions of EVALSET, with the number of images evaluated and skipped."""
import sys

from pipeline import paths
from pipeline.evaluation.evaluate import evaluate_captions
from pipeline.stage import read_json, run, say, start, write_json


def main(name: str, evalset: str) -> None:
    config = start("evaluate", name, evalset)
    metrics, details = evaluate_captions(read_json(paths.captions(name, evalset)), evalset, config)
    write_json(paths.metrics(name, evalset), metrics)
    write_json(paths.evaluation(name, evalset), details)
    shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float))
    say(f"evaluate@{name}-{evalset}: {shown}")
    for metric, reason in details["skipped_metrics"].items():
        say(f"evaluate@{name}-{evalset}: {metric} skipped: {reason}")


if __name__ == "__main__":
    run(main, *sys.argv[1:])
