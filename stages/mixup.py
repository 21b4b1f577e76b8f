"""Stage mixup@NAME: Unsupervised-ClipCap's modality-gap analysis (Sec. 5): caption mix-ups of image
and text features, lambda * t + (1 - lambda) * v, with the trained captioner NAME; writes
artifacts/methods/NAME/mixup.json and mixup.png."""
import sys

from pipeline.analysis.modality_gap import run_mixup
from pipeline.runtime import params, say


def main(name: str) -> None:
    p = params()
    result = run_mixup(name, p)
    shown = ", ".join(f"λ={r['lambda']:g}: CIDEr {r['CIDEr']:.3f} BLEU-4 {r['BLEU-4']:.3f}" for r in result["results"])
    say(f"mixup@{name} on {result['evalset']} ({result['images']} images): {shown}")


if __name__ == "__main__":
    main(sys.argv[1])
