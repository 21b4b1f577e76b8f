"""Stage report: one HTML page with every method instance's metrics on every eval set, the
modality-gap curves and a gallery of eval images with every method's caption. In a world run the page opens
with the world's images and every caption checked against them, then the exact metrics with their controls
and the world's own models (pipeline/evaluation/report.py)."""
from pipeline import paths
from pipeline.evaluation.report import build_report
from pipeline.stage import run, say, start


def main() -> None:
    config = start("report")
    rows, gallery = build_report(config, paths.REPORT / "index.html")
    say(f"report: {rows} result rows, {gallery} gallery images -> {paths.REPORT / 'index.html'}")


if __name__ == "__main__":
    run(main)
