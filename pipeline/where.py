"""Print where the demo's metrics and report are, with the metrics as a small table (`make demo` ends with it)."""
import json

from pipeline import paths
from pipeline.params import load_params


def main() -> None:
    p = load_params()
    print("\nMetrics (DVC metrics; also `dvc metrics show`):")
    for name in p["methods"]:
        path = paths.method_dir(name) / "metrics.json"
        if not path.is_file():
            print(f"  {name}: not computed yet ({path})")
            continue
        for evalset, scores in json.loads(path.read_text()).items():
            shown = "  ".join(f"{k} {v:.3f}" for k, v in scores.items() if k in
                              ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE", "CLIPScore", "RefCLIPScore"))
            print(f"  {name} on {evalset}: {shown}")
            print(f"    {path.relative_to(paths.REPO)}")
    print(f"Report: {(paths.REPORT / 'index.html').relative_to(paths.REPO)}")


if __name__ == "__main__":
    main()
