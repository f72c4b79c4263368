"""Checks shared by eval-progress, export and predict: trained weights must be finite and sane.
(A checkpoint that cannot be loaded is one line too: `training.restore.load_checked_model`.)"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch

from alignprog.errors import AlignprogError

# Trained weights beyond this magnitude are corruption (3e38 weights give nonsense outputs that
# overflow to Inf/NaN a layer later), not a model.
MAX_ABS_WEIGHT = 1e30


def check_weights(tensors: Mapping[str, torch.Tensor], where: str | Path) -> None:
    """Raise AlignprogError naming the first floating tensor holding NaN/Inf or |w| >
    MAX_ABS_WEIGHT (and how many are bad)."""
    nonfinite, huge = [], []
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.numel() == 0:
            continue
        t = t.detach()
        if not torch.isfinite(t).all():
            nonfinite.append(name)
        elif float(t.abs().max().float()) > MAX_ABS_WEIGHT:
            huge.append(name)
    if nonfinite:
        more = f" (and {len(nonfinite) - 1} more)" if len(nonfinite) > 1 else ""
        raise AlignprogError(f"{where}: NaN/Inf values in tensor {nonfinite[0]}{more}; the "
                             "weights are corrupted (or training diverged)")
    if huge:
        more = f" (and {len(huge) - 1} more)" if len(huge) > 1 else ""
        raise AlignprogError(f"{where}: absurd magnitudes (|w| > {MAX_ABS_WEIGHT:g}) in tensor "
                             f"{huge[0]}{more}; the weights are corrupted")
