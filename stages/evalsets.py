"""Stage evalsets: real images + reference captions of every eval set -> Parquet shards + a report each."""
import hashlib
import shutil

import pyarrow as pa

from pipeline import paths
from pipeline.data.evalsets import load_eval_images, read_references, resolve_dir
from pipeline.runtime import evalsets, params, say, write_json
from pipeline.data.shards import fingerprint, write_sharded

EVAL_SCHEMA = pa.schema([("image_id", pa.string()), ("image", pa.binary()), ("width", pa.int32()),
                         ("height", pa.int32()), ("references", pa.list_(pa.string()))])


def select_images(references: dict, cfg: dict) -> tuple[dict, dict]:
    """Drop the images of ``exclude_split_file`` (e.g. a corpus's train split) and, with
    ``only_images_in_folder``, references whose image is not in the folder (a folder holding a subset)."""
    counts = {"referenced": len(references)}
    if cfg.get("exclude_split_file"):
        excluded = {line.strip() for line in open(cfg["exclude_split_file"], encoding="utf-8") if line.strip()}
        references = {k: v for k, v in references.items() if k not in excluded}
        counts["excluded_by_split_file"] = counts["referenced"] - len(references)
    if cfg.get("only_images_in_folder"):
        present = {f.name for f in resolve_dir(cfg["images"]).iterdir()}
        before = len(references)
        references = {k: v for k, v in references.items() if k in present}
        counts["not_in_folder"] = before - len(references)
    return references, counts


def main() -> None:
    p = params()
    wanted = evalsets(p)
    for name, cfg in wanted.items():
        references = read_references(cfg["references"], cfg.get("format", "auto"), split_file=cfg.get("split_file"),
                                     splits=cfg.get("splits"))
        references, selection = select_images(references, cfg)
        rows, report = load_eval_images(cfg["images"], references, cfg.get("max_images"))
        report["selection"] = selection
        if not rows:
            raise SystemExit(f"evalsets: eval set {name!r} has no loadable image: {report}")

        def make_table(task, rows=rows):
            return pa.Table.from_pylist(rows[task.start:task.stop], schema=EVAL_SCHEMA)

        out = paths.EVALSETS / name
        write_sharded(out, len(rows), p["rows_per_shard"],
                      fingerprint("evalset", [(r["image_id"], r["references"], hashlib.sha256(r["image"]).hexdigest())
                                              for r in rows]),
                      make_table, {"model": None, "evalset": name}, desc=f"evalset {name}")
        write_json(out / "report.json", report)
        say(f"evalsets: {name}: {report['loaded']} of {report['requested']} images; skipped {report['skipped']}")
    for stale in paths.EVALSETS.iterdir():
        if stale.is_dir() and stale.name not in wanted:
            shutil.rmtree(stale)


if __name__ == "__main__":
    main()
