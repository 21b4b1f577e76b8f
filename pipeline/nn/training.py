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

HEADER_KEY = "synthcap"  # the checkpoint header entry holding our JSON (config and extras)


def adamw(model: torch.nn.Module, lr: float, weight_decay: float, **kwargs) -> torch.optim.AdamW:
    """AdamW with weight decay on the >= 2-D trainable parameters (weights, embeddings) only, as nanoGPT."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": weight_decay},
                              {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}],
                             lr=lr, **kwargs)


def warmup_then_constant(optimizer: torch.optim.Optimizer, warmup_steps: int):
    """Linear warm-up from lr/warmup_steps to lr, then constant: needs no total step count (streams)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0)


def fit(model: torch.nn.Module, make_batches: Callable[[int], Iterable[dict]], epochs: int,
        optimizer: torch.optim.Optimizer, scheduler=None, loss_fn: Callable[[dict], torch.Tensor] | None = None,
        grad_clip: float | None = 1.0, desc: str = "train", progress: bool = True,
        max_steps: int | None = None) -> list[float]:
    """Minimise ``loss_fn(batch)`` (default ``model.loss``) over ``epochs`` passes of ``make_batches(epoch)``.

    The scheduler steps once per optimizer step; ``max_steps`` stops early. Returns the per-epoch
    mean loss, weighted by batch size (the length of the batch's first tensor). Leaves the model in
    eval mode.
    """
    loss_fn = loss_fn or model.loss
    history, steps = [], 0
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
            total, count, steps = total + loss.item() * n, count + n, steps + 1
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if max_steps is not None and steps >= max_steps:
                break
        if count == 0:
            raise ValueError(f"make_batches({epoch}) yielded no batch")
        history.append(total / count)
        if max_steps is not None and steps >= max_steps:
            break
    model.eval()
    return history


def save_checkpoint(model: torch.nn.Module, path: Path | str, kind: str, config: dict, **extra) -> None:
    """Weights as safetensors (tied tensors stored once); ``kind``, ``config`` and every ``extra``
    (JSON-able: e.g. the identity of the CLIP model whose features it was trained on) in the header."""
    from safetensors.torch import save_model  # it adds its own entries (tied-weight aliases) to the header
    header = json.dumps({"config": config, **extra}, sort_keys=True)
    save_model(model, str(path), metadata={"format": kind, HEADER_KEY: header})


def checkpoint_metadata(path: Path | str, kind: str) -> dict:
    """The header of a checkpoint of ``kind`` (config and extras, parsed); refuses any other file."""
    from safetensors import safe_open
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}: run its train stage first")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != kind:
        raise ValueError(f"{path} is not a {kind} checkpoint (format={meta.get('format')!r})")
    return json.loads(meta[HEADER_KEY])


def load_weights(model: torch.nn.Module, path: Path | str, device: str = "cpu") -> torch.nn.Module:
    """Load a checkpoint's weights into ``model`` (strict), without unpickling anything."""
    from safetensors.torch import load_model
    load_model(model, str(path), strict=True, device=str(device))
    return model.to(device).eval()
