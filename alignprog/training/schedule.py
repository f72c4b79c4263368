"""The learning-rate schedule: linear warm-up, then constant or cosine (`train.lr_schedule`,
`train.warmup_steps`, `train.min_lr_ratio`; docs/algorithms.md#learning-rate-schedule).

The schedule is a factor of every group's configured learning rate, a function of the optimizer
step within the training stage alone, so a resumed run continues it exactly. A scheduled run
takes the eager step: a CUDA graph holds the learning rate it was captured with.
"""

from __future__ import annotations

import math

import torch

from alignprog.config import TrainConfig


def scheduled(tc: TrainConfig) -> bool:
    """Whether the learning rate moves at all."""
    return tc.lr_schedule != "constant" or tc.warmup_steps > 0


def lr_factor(step: int, steps: int, tc: TrainConfig) -> float:
    """The factor of the configured learning rates at the stage's optimizer step `step`
    (0 = its first) of `steps`: (step + 1) / warmup_steps during the warm-up; after it 1
    (constant) or the cosine from 1 at the first step after the warm-up down to min_lr_ratio
    at the stage's last step."""
    warmup = tc.warmup_steps
    if step < warmup:
        return (step + 1) / warmup
    if tc.lr_schedule == "constant":
        return 1.0
    last = max(steps - 1 - warmup, 1)        # steps after the warm-up, less the first
    t = min((step - warmup) / last, 1.0)
    return tc.min_lr_ratio + (1.0 - tc.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def set_learning_rates(optimizer: torch.optim.Optimizer, base: list[float],
                       factor: float) -> None:
    """Every group's learning rate to its `base` value times `factor`."""
    for group, lr in zip(optimizer.param_groups, base, strict=True):
        group["lr"] = lr * factor
