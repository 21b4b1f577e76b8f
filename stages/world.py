"""Stage world@NAME: world NAME's caption corpus (corpus.json: captions only, no image of those scenes exists)
and eval set (eval/: photo-style images, five references each, and the scene of each image as ground truth),
as the ordinary inputs of the corpus and evalset stages, and the control result file frequent_caption.json
(pipeline/world/dataset.py)."""
import sys

from pipeline import paths
from pipeline.stage import run, say, start, world_config, write_json
from pipeline.world.dataset import write_corpus, write_eval_set, write_frequent_caption


def main(name: str) -> None:
    world = world_config(start("world", name), "world", name)
    out = paths.world(name)
    report = {"corpus": write_corpus(out / "corpus.json", world.seed, world.corpus.scenes, world.corpus.captions_per_scene),
              "eval": write_eval_set(out / "eval", world.seed, world.eval.images, world.eval.references,
                                     world.image_size)}
    report["frequent_caption"] = write_frequent_caption(out / "frequent_caption.json", out / "corpus.json",
                                                        out / "eval" / "references.json")
    write_json(paths.world_metrics(name, "data"), report)
    say(f"world@{name}: {report['corpus']['captions']} corpus captions of {report['corpus']['scenes']} scenes; "
        f"{report['eval']['images']} eval images -> {out}")


if __name__ == "__main__":
    run(main, sys.argv[1])
