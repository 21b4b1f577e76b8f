"""Optimisers and learning-rate schedules: the one place every method's training takes them from.

A method's ``Train`` settings hold an ``optim`` section (:class:`Optim`); the runner builds the
optimiser and its per-step schedule with :func:`build`. Schedules are multipliers of ``lr`` as a
function of the optimizer step ``s`` (0-based):

- ``constant``: linear warm-up ``(s + 1) / warmup`` up to 1, then 1 (needs no total step count).
- ``linear``: the same warm-up, then a linear decay reaching 0 at the last step (ClipCap's
  ``get_linear_schedule_with_warmup`` shape).
- ``noam``: Vaswani et al. 2017, ``lr * width^-0.5 * min((s+1)^-0.5, (s+1) * warmup^-1.5)``; here
  ``lr`` is Noam's factor and ``width`` the model width (PCM-Net).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from pipeline.config import at_least, non_negative, opt, positive


def adam_betas(betas) -> str | None:
    return None if all(0.0 <= b < 1.0 for b in betas) else "must both lie in [0, 1)"


@dataclass(frozen=True, kw_only=True)
class Optim:
    name: Literal["adam", "adamw"] = opt("adamw", "adam (L2 weight decay, all parameters) | adamw (decoupled "
                                                  "decay on >= 2-D weights only, as nanoGPT)")
    lr: float = opt(1e-4, "peak learning rate (noam: the factor)", check=positive)
    weight_decay: float = opt(0.0, "weight decay", check=non_negative)
    betas: tuple[float, float] = opt((0.9, 0.999), "Adam betas", check=adam_betas)
    eps: float = opt(1e-8, "Adam epsilon", check=positive)
    schedule: Literal["constant", "linear", "noam"] = opt("constant", "constant | linear | noam (see "
                                                                      "pipeline/nn/schedules.py)")
    warmup_steps: int = opt(0, "linear warm-up steps", check=at_least(0))
    grad_clip: float | None = opt(None, "clip the gradient norm to this (null = off)", check=positive)
    grad_clip_value: float | None = opt(None, "clip every gradient value to +- this (null = off)", check=positive)


def warmup_constant(step: int, warmup_steps: int) -> float:
    return min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0


def warmup_linear_decay(step: int, warmup_steps: int, total_steps: int | None) -> float:
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if not total_steps:
        return 1.0
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def noam(step: int, width: int, warmup_steps: int, factor: float = 1.0) -> float:
    """Vaswani et al. [39]: factor * width^-0.5 * min(step^-0.5, step * warmup^-1.5), step >= 1."""
    step = max(int(step), 1)
    return factor * width ** -0.5 * min(step ** -0.5, step * max(warmup_steps, 1) ** -1.5)


def optimizer(model: torch.nn.Module, o: Optim) -> torch.optim.Optimizer:
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"{type(model).__name__} has no trainable parameter")
    if o.name == "adam":
        make = lambda **fused: torch.optim.Adam(trainable, lr=o.lr, betas=o.betas, eps=o.eps,   # noqa: E731
                                                weight_decay=o.weight_decay, **fused)
    else:
        groups = [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": o.weight_decay},
                  {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]
        make = lambda **fused: torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, **fused)  # noqa: E731
    try:        # torch's fused kernel: the same update in one pass, ~5x faster than its per-tensor loop on CPU
        return make(fused=True)
    except (RuntimeError, TypeError):       # a device or dtype without it
        return make()


def build(model: torch.nn.Module, o: Optim, total_steps: int | None = None, width: int | None = None):
    """-> (optimizer, scheduler stepped once per optimizer step)."""
    opt_ = optimizer(model, o)
    if o.schedule == "noam":
        if not width:
            raise ValueError("the noam schedule needs the model width")
        for group in opt_.param_groups:
            group["lr"] = group["initial_lr"] = 1.0
        factor = lambda s: noam(s + 1, width, o.warmup_steps, o.lr)   # noqa: E731
    elif o.schedule == "linear":
        factor = lambda s: warmup_linear_decay(s, o.warmup_steps, total_steps)   # noqa: E731
    else:
        factor = lambda s: warmup_constant(s, o.warmup_steps)   # noqa: E731
    return opt_, torch.optim.lr_scheduler.LambdaLR(opt_, factor)
