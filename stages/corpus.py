"""Stage corpus: a caption file (any supported format) -> cleaned captions in Parquet shards + a report."""
from pathlib import Path

import pyarrow as pa

from pipeline import paths
from pipeline.data.captions import clean_captions, read_captions
from pipeline.data.shards import write_sharded
from pipeline.stage import base_fingerprint, run, say, start, write_json

CORPUS_SCHEMA = pa.schema([("caption_id", pa.string()), ("group_id", pa.string()), ("text", pa.string()),
                           ("split", pa.string()), ("source", pa.string())])


def main() -> None:
    config = start("corpus")
    c = config.corpus
    if not Path(c.path).exists():
        raise FileNotFoundError(f"`corpus.path` (params.yaml) names {c.path}, which does not exist")
    read = read_captions(c.path, c.format, source=c.source, splits=c.splits)
    kept, report = clean_captions(read, max_words=c.max_words, deduplicate=c.deduplicate)
    if c.max_captions is not None:  # a slice for quick runs: the first N kept captions
        report["truncated_to_max_captions"] = max(0, len(kept) - c.max_captions)
        kept = kept[:c.max_captions]
    if not kept:
        raise SystemExit(f"corpus: no caption of {c.path} survived cleaning: {report['dropped']}")
    rows = [r.to_dict() for r in kept]

    def make_table(task):
        return pa.Table.from_pylist(rows[task.start:task.stop], schema=CORPUS_SCHEMA)

    write_sharded(paths.CORPUS, len(rows), config.rows_per_shard, base_fingerprint("corpus", config, None, rows),
                  make_table, {"model": None, "source": c.source, "path": str(c.path)}, stage="corpus",
                  desc="corpus")
    write_json(paths.CORPUS / "report.json", report)
    say(f"corpus: kept {report['kept']} of {report['read']} captions from {c.path}; dropped {report['dropped']}")


if __name__ == "__main__":
    run(main)
