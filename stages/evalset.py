"""Stage evalset@NAME: the real images and reference captions of eval set NAME -> Parquet shards +
a report naming every skipped image and why."""
import sys

import pyarrow as pa

from pipeline import paths
from pipeline.data.evalsets import eval_rows, eval_schema, rows_fingerprint
from pipeline.data.shards import write_sharded
from pipeline.stage import base_fingerprint, run, say, start, write_json


def main(name: str) -> None:
    config = start("evalset", name)
    if name not in config.evalsets:
        raise SystemExit(f"evalset: params.yaml has no eval set {name!r} (evalsets: {', '.join(config.evalsets)})")
    rows, report = eval_rows(config.evalsets[name])
    if not rows:
        raise SystemExit(f"evalset: eval set {name!r} has no loadable image: {report}")

    schema = eval_schema(rows)

    def make_table(task):
        return pa.Table.from_pylist(rows[task.start:task.stop], schema=schema)

    out = paths.evalset(name)
    write_sharded(out, len(rows), config.rows_per_shard, base_fingerprint("evalset", config, name, rows_fingerprint(rows)),
                  make_table, {"model": None, "evalset": name}, stage=f"evalset@{name}", desc=f"evalset {name}")
    write_json(out / "report.json", report)
    say(f"evalset@{name}: {report['loaded']} of {report['requested']} images; skipped {report['skipped_counts']}")


if __name__ == "__main__":
    run(main, sys.argv[1])
