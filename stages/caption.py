"""Stage caption@NAME-EVALSET: caption eval set EVALSET's real images with the trained instance NAME."""
import sys

from pipeline import paths, runner
from pipeline.stage import run, say, start, write_json


def main(name: str, evalset: str) -> None:
    config = start("caption", name, evalset)
    for key, known in (("methods", config.methods), ("evalsets", config.evalsets)):
        if (name if key == "methods" else evalset) not in known:
            raise SystemExit(f"caption: params.yaml `{key}` has no {name if key == 'methods' else evalset!r}")
    captions = runner.caption(name, config.methods[name], evalset, config.device)
    write_json(paths.captions(name, evalset), captions)
    say(f"caption@{name}-{evalset}: {len(captions)} captions -> {paths.captions(name, evalset)}")


if __name__ == "__main__":
    run(main, *sys.argv[1:])
