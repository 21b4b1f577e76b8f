"""Stage world_detector@NAME: world NAME's shape detector, trained on photo-style images (a share
synthetic: worlds.NAME.detector.synthetic_share); its label
precision and recall on held-out images are the stage's metrics (pipeline/world/detector_training.py)."""
import sys

from pipeline import paths
from pipeline.stage import run, say, start, world_config, write_json
from pipeline.world.detector_training import train_world_detector


def main(name: str) -> None:
    world = world_config(start("world_detector", name), "world_detector", name)
    d = world.detector
    report = train_world_detector(paths.world(name) / "detector", seed=world.seed, images=d.images, epochs=d.epochs,
                                  batch_size=d.batch_size, lr=d.lr, heldout=d.heldout, image_size=world.image_size,
                                  synthetic_share=d.synthetic_share)
    write_json(paths.world_metrics(name, "detector"), report)
    say(f"world_detector@{name}: {report}")


if __name__ == "__main__":
    run(main, sys.argv[1])
