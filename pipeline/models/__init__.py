"""Frozen models behind one loader each: CLIP (open_clip), text-to-image (diffusers), detector (transformers).

Every loader takes the same config shape, ``{name, pretrained, seed}``:
- ``pretrained`` set: the real model through its ecosystem (an open_clip pretrained tag or local
  checkpoint file; a Hugging Face model id or local folder). ``HF_HUB_OFFLINE=1`` and local paths work.
- ``pretrained: null``: the model named ``name`` is built from its configuration (the small ones live
  in ``pipeline/models/configs/``) with weights drawn from ``seed``; same classes, same code paths.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

CONFIG_DIR = Path(__file__).parent / "configs"


def weights_sha256(module: torch.nn.Module) -> str:
    """Hash of a model's weights (names, shapes, dtypes, bytes): its identity when no tag names it."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def local_model_type(pretrained: str | None) -> str | None:
    """The ``model_type`` of the ``config.json`` in the local folder ``pretrained`` (None for anything
    else: a hub id, a tag, a file, a folder without one). The world's own models are such folders
    (pipeline/world): each loader asks this first to tell them from its ecosystem's models."""
    path = Path(pretrained) / "config.json" if pretrained else None
    if path is None or not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return config.get("model_type") if isinstance(config, dict) else None


def missing_model_error(kind: str, name: str, pretrained: str, err: Exception) -> RuntimeError:
    return RuntimeError(
        f"could not load the {kind} model {name!r} (pretrained={pretrained!r}): {err}\n"
        f"Provide it by one of: a local path in params.yaml (models.{kind}.pretrained), a Hugging Face "
        f"cache that already holds it (with HF_HUB_OFFLINE=1), or network access to the hub. "
        f"The offline profile uses small models built from configuration instead (pretrained: null).")
