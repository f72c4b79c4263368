"""Action-level ground truth and the errors of one progress predictor on it.

Frame t of a foreground (non-background) canonical segment [s, e] of length L = e - s + 1 has
progress (t - s + 1) / L, from 1/L at the first frame to 1 at the last; background frames are
excluded from every error. `action_frames` flattens the foreground frames of the evaluated
videos once, and `progress_metrics` scores any predictor's per-frame values on them, so every
predictor is compared on exactly the same frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from scipy.stats import spearmanr

from alignprog.data.annotations import VideoAnnotation
from alignprog.sampling import BIN_EDGES, BIN_NAMES

# Shape metrics (docs/evaluation.md#shape-metrics): error by action length, bins 1-2, 3-5,
# 6-10, 11-20, 21-50, more than 50 frames.
LENGTH_BINS = ((1, 2), (3, 5), (6, 10), (11, 20), (21, 50), (51, None))
# Endpoint errors over the first and last 10% of each action (at least one frame).
ENDPOINT_FRACTION = 10  # percent
# Per-action Spearman correlation only for actions with at least 3 frames.
SPEARMAN_MIN_FRAMES = 3


def _finite(x: float) -> float | None:
    """JSON has no NaN: undefined values are None."""
    x = float(x)
    return x if math.isfinite(x) else None


def _mean(x: np.ndarray) -> float | None:
    """The mean of ``x``, None when ``x`` is empty or the mean is not finite."""
    return _finite(x.mean()) if len(x) else None


def _foreground_segments(annotation: VideoAnnotation) -> tuple[np.ndarray, np.ndarray]:
    """Starts and lengths (A,) of the foreground segments."""
    fg = annotation.is_foreground                                                 # (K,)
    return np.asarray(annotation.starts)[fg], annotation.lengths[fg]


@dataclass(frozen=True)
class ActionFrames:
    """Every foreground frame of the evaluated videos, flattened in video then frame order.

    All arrays are (N,) with N the number of foreground frames; actions are contiguous runs.
    """

    video: np.ndarray    # position of the frame's video in the evaluated list
    frame: np.ndarray    # t within its video
    action: np.ndarray   # global index of the frame's action (0 .. A-1)
    offset: np.ndarray   # r = t - s
    length: np.ndarray   # L of the frame's action
    gt: np.ndarray       # (r + 1) / L, float64
    tasks: tuple[str, ...]  # task of each evaluated video

    @property
    def num_actions(self) -> int:
        return int(self.action[-1]) + 1 if len(self.action) else 0

    def gather(self, per_video: Sequence[np.ndarray | torch.Tensor]) -> np.ndarray:
        """The foreground frames (N,) of per-video predictions (T_i,) each, as float64."""
        parts = [np.asarray(p, dtype=np.float64) for p in per_video]
        if len(parts) != len(self.tasks):
            raise ValueError(f"{len(parts)} predictions for {len(self.tasks)} videos")
        flat = np.concatenate(parts) if parts else np.zeros(0)
        offsets = np.cumsum([0] + [len(p) for p in parts[:-1]])
        return flat[offsets[self.video] + self.frame]


def action_frames(annotations: Sequence[VideoAnnotation]) -> ActionFrames:
    """Flatten the foreground frames of the given videos, with their action-level GT
    (docs/evaluation.md#action-level-ground-truth)."""
    video, frame, action, offset, length = [], [], [], [], []
    a = 0
    for v, ann in enumerate(annotations):
        starts, lengths = _foreground_segments(ann)
        for s, n in zip(starts, lengths):
            r = np.arange(n)
            video.append(np.full(n, v))
            frame.append(s + r)
            action.append(np.full(n, a))
            offset.append(r)
            length.append(np.full(n, n))
            a += 1

    def cat(parts: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    video_, frame_, action_, offset_, length_ = map(cat, (video, frame, action, offset, length))
    gt = (offset_ + 1) / np.maximum(length_, 1)
    return ActionFrames(video_, frame_, action_, offset_, length_, gt.astype(np.float64),
                        tuple(ann.task for ann in annotations))


def _spearman(pred: np.ndarray, frames: ActionFrames) -> dict[str, Any]:
    """Mean per-action Spearman correlation with the GT (strictly increasing within an action).

    Actions shorter than 3 frames are left out; an action whose prediction is constant has no
    correlation and is counted as undefined (docs/evaluation.md#shape-metrics).
    """
    values, undefined = [], 0
    bounds = np.flatnonzero(np.diff(frames.action)) + 1
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(pred)]):
        n = hi - lo
        if n < SPEARMAN_MIN_FRAMES:
            continue
        # The prediction's order as integer codes: equal values tie, and NaNs tie with each
        # other above every number (np.unique's order), so a NaN frame ranks last instead of
        # making spearmanr return NaN for the whole action.
        _, codes = np.unique(pred[lo:hi], return_inverse=True)                 # (n,)
        if codes.max() == 0:
            undefined += 1  # a constant prediction: spearmanr would return NaN
            continue
        # The GT is strictly increasing within an action, so its ranks are the frame order.
        values.append(float(spearmanr(codes, np.arange(n)).statistic))
    return {"mean": _mean(np.asarray(values)), "actions": len(values),
            "undefined_constant": undefined, "min_frames": SPEARMAN_MIN_FRAMES}


def progress_metrics(pred: np.ndarray, frames: ActionFrames) -> dict[str, Any]:
    """Errors of one predictor (N,) on the foreground frames (N,), JSON-serialisable.

    ``mae``: pooled over frames, mean over videos of per-video MAE, mean over tasks of per-task
    MAE (a task's MAE is the mean over its videos, as the fork's evaluators; both aggregations,
    since the reference scripts disagree:
    docs/reference-bugs.md#aggregation-differs-across-scripts). ``per_task`` (with std and
    cov = std / mean: docs/reference-bugs.md#cov-definition), ``by_progress`` (GT bins
    early/mid/late, the sampler's edges), ``by_length`` (action-length bins),
    ``normalised_mae`` = 1 - MAE / MAE(constant 0.5) (pooled), and the shape metrics
    (docs/evaluation.md#shape-metrics): ``monotonicity`` (share of consecutive
    within-action pairs whose prediction does not decrease), ``endpoints`` (MAE over the first
    and last 10% of each action's frames, at least one frame each, and at the first and last
    frame), ``spearman`` (per action, >= 3 frames).
    """
    pred = np.asarray(pred, dtype=np.float64)
    if pred.shape != frames.gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != foreground frames {frames.gt.shape}")
    err = np.abs(pred - frames.gt)                                                # (N,)
    n_videos = len(frames.tasks)
    frames_per_video = np.bincount(frames.video, minlength=n_videos)              # (V,)
    err_per_video = np.bincount(frames.video, weights=err, minlength=n_videos)    # (V,)
    has = frames_per_video > 0
    video_mae = err_per_video[has] / frames_per_video[has]                        # (V',)
    video_task = np.asarray(frames.tasks, dtype=object)[has]

    per_task: dict[str, dict[str, Any]] = {}
    for task in dict.fromkeys(frames.tasks):
        sel = video_task == task
        if not sel.any():
            continue
        maes = video_mae[sel]
        in_task = np.isin(frames.video, np.flatnonzero(np.asarray(frames.tasks) == task))
        mean = float(maes.mean())
        std = float(maes.std())
        per_task[task] = {
            "mae": mean,                                   # mean over the task's videos
            "mae_pooled": _mean(err[in_task]),             # pooled over the task's frames
            "std": std,                                    # over videos (std, not var)
            "cov": _finite(std / mean) if mean > 0 else None,
            "videos": int(sel.sum()),
            "frames": int(in_task.sum()),
        }

    bins = np.digitize(frames.gt, BIN_EDGES, right=True)  # 0: q <= .33, 1: <= .67, 2: above
    edges = (0.0, *BIN_EDGES, 1.0)
    by_progress = {name: {"low": edges[j], "high": edges[j + 1], "mae": _mean(err[bins == j]),
                          "frames": int((bins == j).sum())}
                   for j, name in enumerate(BIN_NAMES)}

    by_length = {}
    for lo, hi in LENGTH_BINS:
        sel = (frames.length >= lo) & (frames.length <= (hi if hi is not None else np.inf))
        key = f"{lo}-{hi}" if hi is not None else f"{lo}+"
        by_length[key] = {"mae": _mean(err[sel]), "frames": int(sel.sum()),
                          "actions": int(len(np.unique(frames.action[sel])))}

    same = frames.action[1:] == frames.action[:-1]                                # (N-1,)
    steps = (pred[1:] >= pred[:-1])[same]
    k = (frames.length + (100 // ENDPOINT_FRACTION - 1)) // (100 // ENDPOINT_FRACTION)  # ceil(L/10)
    first, last = frames.offset < k, frames.offset >= frames.length - k
    const_mae = _mean(np.abs(0.5 - frames.gt))
    mae = _mean(err)
    return {
        "mae": {"pooled": mae,
                "mean_over_videos": _mean(video_mae),
                "mean_over_tasks": _mean(np.asarray([t["mae"] for t in per_task.values()])),
                "frames": int(len(err)), "videos": int(has.sum()), "tasks": len(per_task)},
        "normalised_mae": (_finite(1.0 - mae / const_mae)
                           if mae is not None and const_mae else None),
        "per_task": per_task,
        "by_progress": by_progress,
        "by_length": by_length,
        "monotonicity": {"share": _mean(steps.astype(np.float64)), "pairs": int(len(steps))},
        "endpoints": {
            "first_10pct": _mean(err[first]), "last_10pct": _mean(err[last]),
            "first_frame": _mean(err[frames.offset == 0]),
            "last_frame": _mean(err[frames.offset == frames.length - 1]),
        },
        "spearman": _spearman(pred, frames),
    }


def _average_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of the float leaves of equally shaped metric dicts (ints: the first's, counts)."""
    first = reports[0]
    out: dict[str, Any] = {}
    for key, value in first.items():
        if isinstance(value, dict):
            out[key] = _average_reports([r[key] for r in reports])
        elif isinstance(value, float) or value is None:
            vals = [r[key] for r in reports]
            out[key] = None if any(v is None for v in vals) else float(np.mean(vals))
        else:
            out[key] = value
    return out
