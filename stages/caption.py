"""Stage caption@NAME: caption every eval set's real images with the trained captioner NAME."""
import sys

from pipeline import paths
from pipeline.methods import method_module
from pipeline.runtime import params, say, write_json


def main(name: str) -> None:
    p = params()
    cfg = p["methods"][name]
    folder = paths.method_dir(name)
    captions = method_module(cfg["method"]).caption(name, cfg, p, folder / "model")
    for evalset, by_image in captions.items():
        write_json(folder / "captions" / f"{evalset}.json", by_image)
        say(f"caption@{name}: {len(by_image)} captions for {evalset}")


if __name__ == "__main__":
    main(sys.argv[1])
