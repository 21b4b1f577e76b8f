"""Stage train@NAME: fit the captioner of method instance NAME (params.yaml methods.NAME) on cached artifacts."""
import sys

from pipeline import paths
from pipeline.methods import method_module
from pipeline.runtime import params, say, write_json


def main(name: str) -> None:
    p = params()
    cfg = p["methods"][name]
    out = paths.method_dir(name) / "model"
    report = method_module(cfg["method"]).train(name, cfg, p, out)
    write_json(out / "train_report.json", report)
    say(f"train@{name}: {report.get('summary', '')} -> {out}")


if __name__ == "__main__":
    main(sys.argv[1])
