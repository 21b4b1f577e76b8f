"""Stage train@NAME: fit method instance NAME (params.yaml methods.NAME) on the cached artifacts."""
import sys

from pipeline import paths, runner
from pipeline.stage import run, say, start, write_json


def main(name: str) -> None:
    config = start("train", name)
    if name not in config.methods:
        raise SystemExit(f"train: params.yaml has no method instance {name!r} (methods: {', '.join(config.methods)})")
    report = runner.train(name, config.methods[name], config.device)
    write_json(paths.train_curve(name), report["curve"])          # DVC plots data (dvc.yaml: plots)
    kept = " (kept: its settings, inputs and code are unchanged)" if report.get("kept_from_previous_run") else ""
    say(f"train@{name}: {report['summary']}{kept} -> {paths.model(name)}")


if __name__ == "__main__":
    run(main, sys.argv[1])
