"""What every captioner's training shares: the epoch loop over streamed batches, and checkpoints.

Checkpoints are safetensors files whose header metadata holds the checkpoint kind and the model's
config as JSON, so they load without unpickling anything.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm


def fit(model: torch.nn.Module, make_batches: Callable[[int], Iterable[dict]], epochs: int,
        optimizer: torch.optim.Optimizer, scheduler=None, loss_fn: Callable[[dict], torch.Tensor] | None = None,
        grad_clip: float | None = 1.0, desc: str = "train", progress: bool = True) -> list[float]:
    """Minimise ``loss_fn(batch)`` (default ``model.loss``) over ``epochs`` passes of ``make_batches(epoch)``.

    The scheduler steps once per optimizer step. Returns the per-epoch mean loss, weighted by batch
    size (the batch size is the length of the batch's first tensor). Leaves the model in eval mode.
    """
    loss_fn = loss_fn or model.loss
    history = []
    for epoch in range(epochs):
        model.train()
        total, count = 0.0, 0
        bar = tqdm(make_batches(epoch), desc=f"{desc} epoch {epoch + 1}/{epochs}", unit="batch", disable=not progress)
        for batch in bar:
            loss = loss_fn(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            n = len(next(v for v in batch.values() if isinstance(v, torch.Tensor)))
            total, count = total + loss.item() * n, count + n
            bar.set_postfix(loss=f"{loss.item():.3f}")
        if count == 0:
            raise ValueError(f"make_batches({epoch}) yielded no batch")
        history.append(total / count)
    model.eval()
    return history


def save_checkpoint(model: torch.nn.Module, path: Path | str, kind: str, config: dict, **extra: str) -> None:
    """Weights as safetensors; ``kind`` and ``config`` (JSON) in the header metadata."""
    from safetensors.torch import save_file
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata={"format": kind, "config": json.dumps(config, sort_keys=True), **extra})


def load_checkpoint(path: Path | str, kind: str, device: str = "cpu") -> tuple[dict, dict, dict]:
    """-> (state_dict, config, metadata) of a checkpoint of ``kind``; refuses any other file."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: run its train stage first")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != kind:
        raise ValueError(f"{path} is not a {kind} checkpoint (format={meta.get('format')!r})")
    return load_file(str(path), device=device), json.loads(meta["config"]), meta
