"""Stage modality_gap@NAME: Unsupervised-ClipCap's modality-gap analysis (Sec. 5): caption
normalize(lambda * t + (1 - lambda) * v) with the trained text-feature captioner NAME; writes
artifacts/methods/NAME/modality_gap.json and .png."""
import sys

from pipeline import paths
from pipeline.analysis.modality_gap import run_modality_gap
from pipeline.stage import run, say, start


def main(name: str) -> None:
    config = start("modality_gap", name)
    result = run_modality_gap(name, config, paths.method(name))
    shown = ", ".join(f"λ={r['lambda']:g}: CIDEr {r['CIDEr']:.3f}" for r in result["results"])
    say(f"modality_gap@{name} on {result['evalset']} ({result['images']} images): {shown}")


if __name__ == "__main__":
    run(main, sys.argv[1])
