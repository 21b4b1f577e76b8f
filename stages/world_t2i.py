"""Stage world_t2i@NAME: world NAME's text-to-image model, a caption parser with a renderer that makes
Stable Diffusion's known mistakes at the rates of `worlds.NAME.text_to_image` (pipeline/world/text_to_image.py):
its folder holds the config that `models.diffusion.pretrained` loads."""
import sys

from pipeline import paths
from pipeline.stage import run, say, start, world_config
from pipeline.world.text_to_image import Mistakes, write_model


def main(name: str) -> None:
    world = world_config(start("world_t2i", name), "world_t2i", name)
    m = world.text_to_image
    folder = paths.world(name) / "text_to_image"
    config = write_model(folder, Mistakes(m.binding, m.drop, m.count, m.extra), world.image_size)
    say(f"world_t2i@{name}: mistake rates {config['mistakes']} -> {folder}")


if __name__ == "__main__":
    run(main, sys.argv[1])
