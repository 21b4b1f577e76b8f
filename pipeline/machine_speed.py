"""This machine's speed now: a fixed CPU workload timed beside a run, so that the run's wall time can be
read in units of it.

Wall time on a shared machine drifts: the same world-CLIP step took 77 ms at one hour and 97 ms half an
hour later (README, "The demo (7 December, night)"), so one `make demo` cannot say whether a change saved
10%, nor whether the demo fits its minutes with margin. `make demo` times :func:`reference_seconds` before
and after `dvc repro` (``synthcap speed``, logged to ``artifacts/logs/machine_speed.jsonl``) and ``synthcap
status`` prints the stages' total in units of it. Two runs are then compared in units, not seconds.

The workload is the demo's commonest work: training steps of the world profile's SynTIC decoder
(``PrefixDecoder`` width 128, 4 layers, 4 heads, a prefix of 2, 22 caption tokens, a vocabulary of 1,000,
batches of 32, AdamW), on fixed random data, at the torch threads of a stage. The median of ``repeats``
timings of ``steps`` steps, after one warm-up step.
"""
from __future__ import annotations

import statistics
import time
from pathlib import Path

from pipeline.stage import append_log, read_log

MACHINE_SPEED = "machine_speed.jsonl"   # artifacts/logs/: one line per `synthcap speed`


def reference_seconds(steps: int = 20, repeats: int = 3) -> float:
    """Seconds for ``steps`` training steps of the reference decoder (module docstring); the median of
    ``repeats`` timings."""
    import torch

    from pipeline.nn.prefix_decoder import DecoderConfig, PrefixDecoder, caption_loss

    if steps < 1 or repeats < 1:
        raise ValueError(f"steps and repeats must be >= 1, got {steps} and {repeats}")
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = PrefixDecoder(DecoderConfig(vocab_size=1000, width=128, layers=4, heads=4, max_len=22,
                                        prefix_len=2, dropout=0.1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    prefix = torch.randn(32, 2, 128, generator=generator)
    tokens = torch.randint(0, 998, (32, 22), generator=generator)
    lengths = torch.full((32,), 22)

    def step() -> None:
        loss = caption_loss(model(prefix, tokens), tokens, lengths)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    model.train()
    step()                                                 # warm-up: allocations, kernel choice
    timings = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        timings.append(time.perf_counter() - t0)
    return statistics.median(timings)


def log_speed(log: Path, seconds: float, when: str) -> dict:
    """Append ``{"reference_seconds", "when", "finished"}`` to ``log`` (``when``: e.g. before | after)."""
    entry = {"reference_seconds": round(seconds, 3), "when": when,
             "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    append_log(log, entry)
    return entry


def last_speeds(log: Path, n: int = 2) -> list[dict]:
    """The last ``n`` readable entries of ``log`` (oldest first; [] without a log; torn lines skipped)."""
    return read_log(log, {"reference_seconds": float, "when": str, "finished": str}, {"finished": ""})[-n:]


def in_units(total_seconds: float, speeds: list[dict]) -> tuple[float, float] | None:
    """(the mean reference seconds of ``speeds``, ``total_seconds`` in units of it), or None without one."""
    if not speeds:
        return None
    unit = statistics.fmean(s["reference_seconds"] for s in speeds)
    return unit, total_seconds / unit
