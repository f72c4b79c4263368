"""Checks shared by eval-progress, export and predict: trained weights must be finite and sane,
and a damaged checkpoint is one clear line, never a traceback."""

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


def load_checked_model(checkpoint: Path, *, device: str = "cpu"):
    """`training.restore.load_trained_model` with its failures as one-line AlignprogErrors and
    the weights checked (`check_weights`): ``(cfg, model, state)``."""
    from alignprog.training.restore import load_trained_model

    try:
        cfg, model, state = load_trained_model(checkpoint, device=str(device))
    except AlignprogError:
        raise
    except (ValueError, KeyError, TypeError, OSError, RuntimeError, AttributeError,
            IndexError) as exc:
        # A meta that no longer validates, a damaged file: one line, not a traceback.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AlignprogError(f"{checkpoint}: cannot load the checkpoint ({first})") from None
    if not isinstance(state, dict):
        raise AlignprogError(f"{checkpoint}: cannot load the checkpoint (its state is a "
                             f"{type(state).__name__}, not an object)")
    check_weights(model.state_dict(), checkpoint)
    return cfg, model, state
