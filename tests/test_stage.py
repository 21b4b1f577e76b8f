"""What every stage does first (pipeline/stage.py): one process per stage instance."""
import json
import subprocess
import sys
import time

import pytest

from pipeline import paths, stage

REPO = paths.REPO

HOLDER = """
import sys, time
from pathlib import Path
from pipeline import paths, stage
paths.ARTIFACTS = Path(sys.argv[1])
stage.start("train", "syntic")
print("started", flush=True)
time.sleep(120)
"""


def test_a_stage_instance_started_twice_stops_at_once_naming_the_first(tmp_path, monkeypatch):
    """`python -m stages.train syntic` while `dvc repro train@syntic` runs must not train into the same folder."""
    monkeypatch.setattr(paths, "ARTIFACTS", tmp_path)
    first = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout.readline().strip() == "started"
        began = time.time()
        with pytest.raises(SystemExit, match=rf"train@syntic: another process is running this stage\. .*pid {first.pid}"):
            stage.start("train", "syntic")
        assert time.time() - began < 5
        stage.start("train", "pcmnet")                    # another instance of the stage runs beside it
    finally:
        first.kill()
        first.wait()
    stage.start("train", "syntic")                        # the kernel dropped the dead holder's lock


def test_status_names_a_damaged_metrics_file_and_goes_on(artifacts_root, capsys):
    from pipeline import cli
    from pipeline import config as cfg
    config = cfg.load()
    first, second = list(config.methods)[:2]
    evalset = next(iter(config.evalsets))
    for name in (first, second):
        paths.model(name).mkdir(parents=True)
        (paths.model(name) / "train_report.json").write_text(
            '{"clip_model": {"name": "c", "pretrained": null, "seed": 0}, "summary": "fine"}')
        paths.metrics(name, evalset).parent.mkdir(parents=True)
    paths.metrics(first, evalset).write_text('{"BLEU-4": 0.')                     # torn
    paths.metrics(second, evalset).write_text('{"BLEU-4": 0.25, "images_evaluated": 3}')
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert f"{paths.metrics(first, evalset)} cannot be read" in out and f"`dvc repro -f evaluate@{first}-{evalset}`" in out
    assert "BLEU-4 0.250" in out                                                    # the next instance still shown


def test_every_stage_process_logs_its_time_and_outcome_and_status_sums_the_last_of_each(artifacts_root, capsys,
                                                                                       monkeypatch):
    from pipeline import cli

    def work(name):
        stage.start("train", name)
        time.sleep(0.2)

    def bad(name):
        stage.start("train", name)
        raise ValueError("a wrong value, named")

    def early():
        raise ValueError("params.yaml is fine, but this stage stops before start()")

    monkeypatch.setattr(stage, "_started", False)
    monkeypatch.setattr(stage, "_running", [])
    with pytest.raises(SystemExit, match="stops before start"):
        stage.run(early)
    assert not (artifacts_root / "logs" / stage.STAGE_TIMES).exists()             # it did no work: no time
    age = stage.process_seconds()                    # this (pytest's) process: the first run logs its age
    stage.run(work, "syntic")
    with pytest.raises(SystemExit, match="train@pcmnet: a wrong value, named"):
        stage.run(bad, "pcmnet")
    monkeypatch.setattr(stage, "process_seconds", lambda: None)    # without /proc: from the import of stage
    monkeypatch.setattr(stage, "_imported", time.perf_counter())
    stage.run(work, "syntic")
    lines = (artifacts_root / "logs" / stage.STAGE_TIMES).read_text().splitlines()
    assert [json.loads(line)["stage"] for line in lines] == ["train@syntic", "train@pcmnet", "train@syntic"]
    (artifacts_root / "logs" / stage.STAGE_TIMES).write_text("\n".join(lines + ['{"stage": "torn'] ) + "\n")
    last = stage.last_stage_times()
    assert set(last) == {"train@syntic", "train@pcmnet"}                          # the torn line skipped
    assert last["train@pcmnet"]["outcome"] == "failed" and last["train@syntic"]["outcome"] == "ok"
    assert 0.2 <= last["train@syntic"]["seconds"] < 5                             # the last run's, not the sum
    assert age is not None and json.loads(lines[0])["seconds"] >= age + 0.2       # the first: the process's age
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert "Stage times (the last run of each of 2 stages" in out and "failed: train@pcmnet" in out


def test_speed_logs_the_reference_workload_and_status_gives_the_stage_times_in_its_units(artifacts_root, capsys):
    """`synthcap speed` (make demo: before and after dvc repro) times pipeline/machine_speed.py's fixed workload;
    status divides the stages' total by the mean of the last two readings. A torn line is skipped."""
    from pipeline import cli, machine_speed

    assert machine_speed.reference_seconds(steps=1, repeats=1) > 0
    with pytest.raises(ValueError, match="steps and repeats must be >= 1"):
        machine_speed.reference_seconds(steps=0)
    assert cli.main(["speed", "--when", "before", "--steps", "1", "--repeats", "1"]) == 0
    log = artifacts_root / "logs" / machine_speed.MACHINE_SPEED
    first = json.loads(log.read_text().splitlines()[0])
    assert first["when"] == "before" and first["reference_seconds"] > 0
    # a run's record, written by hand: 600 s of stages, readings 2.0 s and 3.0 s (after a torn line)
    log.write_text("\n".join([json.dumps({"reference_seconds": 9.0, "when": "old run"}), '{"reference_se',
                              json.dumps({"reference_seconds": 2.0, "when": "before",
                                          "finished": "2026-12-07T20:38:51+0000"}),
                              json.dumps({"reference_seconds": 3.0, "when": "after"})]) + "\n")
    times = artifacts_root / "logs" / stage.STAGE_TIMES
    times.write_text("\n".join(json.dumps({"stage": s, "seconds": t, "outcome": "ok", "finished": "now"})
                               for s, t in (("world_clip@shapes", 400.0), ("train@syntic", 200.0))) + "\n")
    assert [s["when"] for s in machine_speed.last_speeds(log)] == ["before", "after"]
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert "took 2.00 s before (20:38), 3.00 s after; the stages took 240 units of 2.50 s" in out
    log.unlink()
    assert cli.main(["status"]) == 0
    assert "Machine speed" not in capsys.readouterr().out                          # no reading: no units
