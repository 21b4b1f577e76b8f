"""The ``synthcap`` command: what a user does with a trained pipeline besides ``dvc repro``.

    synthcap caption PHOTOS... [--method NAME] [--out FILE] [--format jsonl|csv|table] [--beam N]
                                                      caption your own images with the trained methods
    synthcap status                                   what is trained, on which models, with which metrics
    synthcap score RESULTS --evalset NAME             anyone's captions scored exactly as evaluate@ scores ours
    synthcap score RESULTS --references FILE          the COCO metrics against a references file
    synthcap speed [--when LABEL]                     time a fixed CPU workload now (make demo: before and after)
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

from pipeline import methods, paths
from pipeline import config as cfg
from pipeline.data.evalsets import read_references
from pipeline.data.shards import ShardedArtifact, describe_model
from pipeline.evaluation.evaluate import evaluate_captions
from pipeline.evaluation.metrics import caption_metrics
from pipeline.evaluation.results import match, read_predictions
from pipeline.machine_speed import MACHINE_SPEED, in_units, last_speeds, log_speed, reference_seconds
from pipeline.stage import STAGE_TIMES, last_stage_times

SHOWN = ("BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE", "CLIPScore", "RefCLIPScore")


def status(args) -> int:
    """Every method instance of params.yaml: trained or not (and on which CLIP), and its metrics."""
    config = cfg.load()
    print(f"Profile {config.profile}: CLIP {describe_model(vars(config.models.clip))}, "
          f"detector {config.models.detector.name}, text-to-image {config.models.diffusion.name}")
    for name, instance in config.methods.items():
        variant = methods.get(instance.method).variant(instance.train, instance.caption)
        report_file = paths.model(name) / "train_report.json"
        if not report_file.is_file():
            print(f"  {name} ({instance.method}, {variant}): not trained — `dvc repro train@{name}`")
            continue
        report = _read_json_or_say(report_file, f"  {name} ({instance.method}, {variant})", f"train@{name}")
        if report is None:
            continue
        print(f"  {name} ({instance.method}, {variant}): trained on features of "
              f"{describe_model(report['clip_model'])}; {report['summary']}")
        for evalset in config.evalsets:
            metrics_file = paths.metrics(name, evalset)
            if not metrics_file.is_file():
                print(f"    {evalset}: not evaluated — `dvc repro evaluate@{name}-{evalset}`")
                continue
            m = _read_json_or_say(metrics_file, f"    {evalset}", f"evaluate@{name}-{evalset}")
            if m is None:
                continue
            scores = "  ".join(f"{k} {m[k]:.3f}" for k in SHOWN if k in m)
            print(f"    {evalset} ({m.get('images_evaluated', '?')} images, {m.get('images_skipped', 0)} skipped): "
                  f"{scores}")
    report = paths.REPORT / "index.html"
    print(f"Report: {report.relative_to(paths.REPO) if report.is_file() else 'not written yet (dvc repro report)'}")
    times = last_stage_times()
    if times:
        slowest = sorted(times.items(), key=lambda kv: -kv[1]["seconds"])[:6]
        failed = sorted(name for name, t in times.items() if t["outcome"] != "ok")
        total = sum(t["seconds"] for t in times.values())
        print(f"Stage times (the last run of each of {len(times)} stages, artifacts/logs/{STAGE_TIMES}): "
              f"{total / 60:.1f} min in all; slowest "
              + ", ".join(f"{name} {t['seconds']:.0f} s" for name, t in slowest)
              + (f"; failed: {', '.join(failed)}" if failed else ""))
        speeds = last_speeds(paths.ARTIFACTS / "logs" / MACHINE_SPEED)
        units = in_units(total, speeds)
        if units is not None:
            readings = ", ".join(f"{s['reference_seconds']:.2f} s {s['when']}" + (f" ({s['finished'][11:16]})"
                                                                                  if s["finished"] else "")
                                 for s in speeds)
            print(f"Machine speed (`synthcap speed`, artifacts/logs/{MACHINE_SPEED}): the reference workload took "
                  f"{readings}; the stages took {units[1]:.0f} units of {units[0]:.2f} s (compare full runs in "
                  f"units, wall time drifts; readings taken around another run than the stages' do not compare)")
    return 0


def speed(args) -> int:
    """Time the reference workload (pipeline/machine_speed.py) now; log it beside the stage times."""
    seconds = reference_seconds(steps=args.steps, repeats=args.repeats)
    log_speed(paths.ARTIFACTS / "logs" / MACHINE_SPEED, seconds, args.when)
    print(f"synthcap speed: the reference workload took {seconds:.2f} s ({args.when}; "
          f"artifacts/logs/{MACHINE_SPEED})")
    return 0


def _read_json_or_say(path: Path, label: str, stage: str) -> dict | None:
    """A JSON object from ``path``, or None after a line that names the damaged file and its rebuild
    (status goes on with the other instances)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(data, dict):
            return data
        problem = f"holds a JSON {type(data).__name__}, not an object"
    except (OSError, ValueError) as err:
        problem = f"cannot be read ({err})"
    print(f"{label}: {path.relative_to(paths.REPO) if path.is_relative_to(paths.REPO) else path} {problem}: "
          f"rebuild it with `dvc repro -f {stage}`")
    return None


def score(args) -> int:
    """Score a result file (COCO results, Karpathy-style or `synthcap caption` JSON Lines) with the
    evaluate stage's protocol; say how many images matched, which are missing and which results match
    no image."""
    predictions = read_predictions(args.results, args.method)
    if args.evalset:
        config = cfg.load()
        if args.evalset not in config.evalsets:
            raise ValueError(f"params.yaml has no eval set {args.evalset!r} (evalsets: {', '.join(config.evalsets)})")
        ids = ShardedArtifact(paths.evalset(args.evalset)).read_column("image_id").to_pylist()
        matched, missing, extra = match(predictions, ids)
        metrics, details = evaluate_captions(matched, args.evalset, config)
        skipped = details["skipped_metrics"]
    else:
        references = read_references(args.references, args.format)
        matched, missing, extra = match(predictions, list(references))
        if not matched:
            raise ValueError(f"no result of {args.results} matches an image of {args.references}")
        result = caption_metrics(matched, {i: references[i] for i in matched})
        metrics, skipped = result["scores"], dict(result["skipped"])
        skipped["CLIPScore"] = skipped["RefCLIPScore"] = ("needs the eval set's cached image features: "
                                                          "score with --evalset NAME")
    print(f"{len(matched)} images matched, {len(missing)} missing, {len(extra)} results matching no image")
    for name, shown in (("missing", missing), ("matching no image", extra)):
        if shown:
            print(f"  {name}: {', '.join(map(str, shown[:10]))}" + (f" ... ({len(shown) - 10} more)" if len(shown) > 10 else ""))
    for key, value in metrics.items():
        print(f"{key}\t{value:.6f}" if isinstance(value, float) else f"{key}\t{value}")
    for key, reason in skipped.items():
        print(f"{key}\tskipped: {reason}")
    return 0


def caption(args) -> int:
    """Caption image files, folders or lists of paths with every trained method (or --method)."""
    from pipeline import captioning     # open_clip and the models: seconds to import, for this command only
    config = cfg.load()
    names = args.method or list(config.methods)
    unknown = [n for n in names if n not in config.methods]
    if unknown:
        raise ValueError(f"no method instance {', '.join(unknown)} in params.yaml (methods: {', '.join(config.methods)})")
    untrained = [n for n in names if not captioning.trained(n)]
    for name in untrained:
        print(f"synthcap caption: {name} is not trained: run `dvc repro train@{name}`", file=sys.stderr)
    names = [n for n in names if n not in untrained]
    if not names:
        return 2
    if args.out:
        check_writable(Path(args.out))        # before the work, not after it
    photos = captioning.load(captioning.collect(args.photos), max(e.max_pixels for e in config.evalsets.values())
                             if config.evalsets else 89_478_485)
    for path, reason in photos.skipped.items():
        print(f"synthcap caption: skipped {path}: {reason}", file=sys.stderr)
    if photos.ids:
        captions, tags = captioning.caption_photos(config, names, photos, args.beam)
        rows = [{"image": i, "method": name, "caption": captions[name][i], "tags": tags.get(i, [])}
                for i in photos.ids for name in names]
        write_rows(rows, args.out, args.format)
    print(f"synthcap caption: {len(photos.ids)} image(s) captioned by {len(names)} method(s), "
          f"{len(photos.skipped)} skipped", file=sys.stderr)
    if photos.ids:
        return 0
    print("synthcap caption: no image was captioned (see the skips above; a folder is searched recursively for "
          f"{', '.join(sorted(captioning.IMAGE_SUFFIXES))} files)", file=sys.stderr)
    if args.out and Path(args.out).is_file():  # an earlier run's result must not pass for this one's
        Path(args.out).unlink()
        print(f"synthcap caption: removed {args.out}, an earlier run's result", file=sys.stderr)
    return 1


def check_writable(out: Path) -> None:
    """--out must name a file in an existing, writable folder."""
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder: name a file in it (e.g. {out / 'captions.jsonl'})")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise ValueError(f"--out {out}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise ValueError(f"--out {out} is not writable")


def write_rows(rows: list[dict], out: str | None, fmt: str | None) -> None:
    fmt = fmt or ("jsonl" if out and out.endswith((".jsonl", ".json")) else "csv" if out and out.endswith(".csv")
                  else "table" if out is None else "jsonl")
    # --out is written to a temporary name and renamed when complete: never half a result under its name
    tmp = Path(out).with_name(f".{Path(out).name}.tmp-{os.getpid()}") if out else None
    stream = open(tmp, "w", encoding="utf-8", newline="") if out else sys.stdout
    try:
        if fmt == "jsonl":
            for row in rows:
                stream.write(json.dumps(row, ensure_ascii=False) + "\n")
        elif fmt == "csv":
            writer = csv.writer(stream)
            writer.writerow(["image", "method", "caption", "tags"])
            for row in rows:
                writer.writerow([row["image"], row["method"], row["caption"], " ".join(row["tags"])])
        else:
            width = max(len(r["method"]) for r in rows)
            for image in dict.fromkeys(r["image"] for r in rows):
                stream.write(f"{image}\n")
                for row in (r for r in rows if r["image"] == image):
                    stream.write(f"  {row['method']:<{width}}  {row['caption']}\n")
    except BaseException:
        if out:
            stream.close()
            tmp.unlink(missing_ok=True)
        raise
    if out:
        stream.close()
        os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="synthcap", description="Text-only image captioning from synthetic "
                                     "image-text pairs: caption your own images, see what is trained, score "
                                     "result files.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("caption", help="caption your own images with the trained method instances")
    p.add_argument("photos", nargs="+", help="image files, folders (recursively) or text files listing image paths")
    p.add_argument("--method", action="append", help="a method instance of params.yaml (repeat; default: all trained)")
    p.add_argument("--out", help="write here (.jsonl, .csv) instead of a table on the terminal")
    p.add_argument("--format", choices=("jsonl", "csv", "table"), help="default: by --out's suffix, else a table")
    p.add_argument("--beam", type=int, help="beam size (default: each instance's caption.beam_size)")
    p.set_defaults(run=caption)
    p = sub.add_parser("status", help="what is trained, on which models, with which metrics")
    p.set_defaults(run=status)
    p = sub.add_parser("speed", help="time a fixed CPU workload now (make demo runs it before and after "
                                     "dvc repro): status then gives the stage times in units of it")
    p.add_argument("--when", default="now", help="a label of the reading, e.g. before | after")
    p.add_argument("--steps", type=int, default=20, help="training steps per timing (default 20)")
    p.add_argument("--repeats", type=int, default=3, help="timings, of which the median is kept (default 3)")
    p.set_defaults(run=speed)
    p = sub.add_parser("score", help="score a result file with the same protocol as evaluate@")
    p.add_argument("results", help="COCO results [{image_id, caption}], Karpathy-style [{image_name, prediction}] "
                                   "or JSON Lines from `synthcap caption`")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--evalset", help="an eval set of params.yaml: its references and cached image features "
                                         "(every metric, CLIPScore included)")
    where.add_argument("--references", help="a references file (any caption format; COCO metrics only)")
    p.add_argument("--format", default="auto", help="the references file's format (default: by content)")
    p.add_argument("--method", help="the method whose lines to score, in a JSON Lines file of several")
    p.set_defaults(run=score)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (cfg.ConfigError, FileNotFoundError, ValueError) as err:
        print(f"synthcap {args.command}: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
