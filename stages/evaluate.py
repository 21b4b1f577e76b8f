"""Stage evaluate@NAME-EVALSET: caption eval set EVALSET's images with the trained instance NAME, then score
the captions: COCO caption metrics (pycocoevalcap), CLIPScore / RefCLIPScore and, on a world's eval set, the
exact metrics, with the number of images evaluated and skipped.

One process for both: the imports (about 4 s) are paid once, and METEOR's Java process (about 6 s to load
its paraphrase table) loads on one core while the captions are made on the other. The captions keep their own fingerprint
(runner.caption_into): a rerun caused by the scoring alone (params ``evaluate``, the metrics' code)
captions nothing."""
import sys

from pipeline import paths, runner
from pipeline.data.executors import torch_threads
from pipeline.evaluation.evaluate import evaluate_captions
from pipeline.evaluation.metrics import start_meteor
from pipeline.stage import run, say, start, write_json


def main(name: str, evalset: str) -> None:
    config = start("evaluate", name, evalset)
    for key, known, wanted in (("methods", config.methods, name), ("evalsets", config.evalsets, evalset)):
        if wanted not in known:
            raise SystemExit(f"evaluate: params.yaml `{key}` has no {wanted!r} (known: {', '.join(known)})")
    threads = None
    if config.evaluate.meteor:
        start_meteor()              # its Java process loads while the images are captioned,
        threads = 1                 # on the other core: two torch threads beside it ran 1.5x slower (README)
    with torch_threads(threads):
        captions, kept = runner.caption_into(paths.captions(name, evalset), name, config.methods[name], evalset,
                                             config.device)
    say(f"evaluate@{name}-{evalset}: {len(captions)} captions "
        f"{'kept (model, inputs, settings and code unchanged)' if kept else 'made'} -> {paths.captions(name, evalset)}")
    metrics, details = evaluate_captions(captions, evalset, config)
    write_json(paths.metrics(name, evalset), metrics)
    write_json(paths.evaluation(name, evalset), details)
    shown = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, float))
    say(f"evaluate@{name}-{evalset}: {shown}")
    for metric, reason in details["skipped_metrics"].items():
        say(f"evaluate@{name}-{evalset}: {metric} skipped: {reason}")


if __name__ == "__main__":
    run(main, *sys.argv[1:])
