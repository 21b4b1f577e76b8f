"""Stage demo_photos: the offline profile's ten eval photos, copied from the installed scikit-image
package (its version is pinned by the lock file) so that the eval set's images are a folder DVC tracks."""
from pipeline import paths
from pipeline.data.evalsets import copy_package_files
from pipeline.stage import run, say, start

PHOTOS = ("astronaut.png", "camera.png", "chelsea.png", "coffee.png", "horse.png", "rocket.jpg", "coins.png",
          "motorcycle_left.png", "moon.png", "hubble_deep_field.jpg")


def main() -> None:
    start("demo_photos")
    copied = copy_package_files("skimage.data", PHOTOS, paths.DEMO_PHOTOS)
    say(f"demo_photos: {len(copied)} scikit-image sample photos -> {paths.DEMO_PHOTOS}")


if __name__ == "__main__":
    run(main)
