"""Stage world_clip@NAME: world NAME's CLIP (architecture `models.clip.name`), trained contrastively on
web pairs (photo style, a share in the synthetic style) apart from the corpus and the eval set; its
zero-shot retrieval on held-out pairs is the stage's metrics (pipeline/world/clip_training.py)."""
import sys

from pipeline import paths
from pipeline.stage import run, say, start, world_config, write_json
from pipeline.world.clip_training import train_world_clip


def main(name: str) -> None:
    config = start("world_clip", name)
    world = world_config(config, "world_clip", name)
    c = world.clip
    report = train_world_clip(config.models.clip.name, paths.world(name) / "clip", seed=world.seed, pairs=c.pairs,
                              epochs=c.epochs, batch_size=c.batch_size, lr=c.lr, heldout=c.heldout,
                              shape_twins=c.shape_twins, synthetic_share=c.synthetic_share,
                              image_size=world.image_size, threads=c.threads)
    write_json(paths.world_metrics(name, "clip"), report)
    say(f"world_clip@{name}: {report}")


if __name__ == "__main__":
    run(main, sys.argv[1])
