"""What every stage script needs: its params, the frozen models (loaded once per process), reports.

Models are cached per process by their config, so a shard function can ask for its model by config
alone: locally it is loaded once, on a Ray cluster once per worker, and nothing big is pickled.
"""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

from pipeline.params import load_params


def params() -> dict:
    return load_params()


@lru_cache(maxsize=4)
def _clip(name, pretrained, seed, precision, device):
    from pipeline.models.clip import load_clip
    return load_clip(name, pretrained, seed=seed, device=device, precision=precision)


@lru_cache(maxsize=2)
def _diffusion(name, pretrained, seed, precision, device, resolution):
    from pipeline.models.diffusion import load_text_to_image
    return load_text_to_image(name, pretrained, seed=seed, device=device, precision=precision, resolution=resolution)


@lru_cache(maxsize=2)
def _detector(name, pretrained, seed, device):
    from pipeline.models.detector import load_detector
    return load_detector(name, pretrained, seed=seed, device=device)


def clip_model(p: dict):
    c = p["models"]["clip"]
    return _clip(c["name"], c.get("pretrained"), c.get("seed", 0), c.get("precision", "fp32"), p.get("device", "cpu"))


def diffusion_model(p: dict):
    c = p["models"]["diffusion"]
    return _diffusion(c["name"], c.get("pretrained"), c.get("seed", 0), c.get("precision", "fp32"), p.get("device", "cpu"),
                      p["generate"].get("resolution"))


def detector_model(p: dict):
    c = p["models"]["detector"]
    return _detector(c["name"], c.get("pretrained"), c.get("seed", 0), p.get("device", "cpu"))


def evalsets(p: dict) -> dict[str, dict]:
    """The eval sets a profile defines (an overlay disables one by setting it to null)."""
    return {name: cfg for name, cfg in (p.get("evalsets") or {}).items() if cfg}


def write_json(path: Path, obj) -> None:
    """Write JSON atomically (temp name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False), encoding="utf-8")
    os.replace(tmp, path)


def say(message: str) -> None:
    print(message, flush=True)
