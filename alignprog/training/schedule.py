"""The learning-rate schedule: linear warm-up, then constant or cosine (`train.lr_schedule`,
`train.warmup_steps`, `train.min_lr_ratio`; docs/algorithms.md#learning-rate-schedule).

The schedule is a factor of every group's configured learning rate, a function of the optimizer
step within the training stage alone, so a resumed run continues it exactly. Where the step is a
CUDA-graph replay the groups hold their learning rates as device tensors, which the replay reads
and `set_learning_rates` refills in place (no host sync, no recapture).
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
    """Every group's learning rate to its `base` value times `factor`: a tensor rate (a CUDA
    graph reads its memory) in place, a float replaced."""
    for group, lr in zip(optimizer.param_groups, base, strict=True):
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr * factor)
        else:
            group["lr"] = lr * factor


def use_tensor_rates(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Hold every group's learning rate as a float32 0-dim tensor on `device` (the fused,
    capturable Adam takes one), so that a captured step reads the current rate."""
    for group in optimizer.param_groups:
        group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
