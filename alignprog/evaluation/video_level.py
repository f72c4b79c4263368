"""Video-level OGPE: progress over the whole video, background included, as the paper reports.

The ground truth gives each foreground action an equal share of the video and holds its value
over background (`video_progress_gt`). The embeddings' prediction is the cumulative path length
``P(t)`` over ``G_hat``, the mean total path length of the task's training videos
(`GeodesicNormaliser`); it is scored raw and clipped to [0, 1], beside a frame-count and a
constant baseline, on every frame (`video_level_report`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from alignprog.data.annotations import VideoAnnotation
from alignprog.evaluation.metrics import _finite, _mean

VIDEO_CONVENTION = "video-level, online (cumulative over the whole video), all frames"
VIDEO_GROUND_TRUTH = (
    "with M foreground actions, action k ramps linearly from k/M at its first frame to "
    "(k+1)/M at its last (a one-frame action: k/M); background frames (full background set) "
    "hold the previous value (0 before the first action)")


def video_progress_gt(annotation: VideoAnnotation) -> np.ndarray:
    """Video-level ground-truth progress (T,) (docs/evaluation.md#video-level-ground-truth; the
    full background set, not only 'SIL': docs/reference-bugs.md#background-label-mismatch).

    With M foreground segments, each rises linearly from p to p + 1/M over its frames (a
    one-frame segment is p), then p += 1/M; a background segment holds the value of the frame
    before it (0 at the start). All zeros when the video has no foreground segment."""
    fg = annotation.is_foreground
    delta = 1.0 / max(int(fg.sum()), 1)
    g = np.zeros(annotation.num_frames)
    p = 0.0
    for s, e, is_fg in zip(annotation.starts, annotation.ends, fg):
        if is_fg:
            g[s:e + 1] = p + delta * (np.arange(e - s + 1) / (e - s) if e > s else 0.0)
            p += delta
        else:
            g[s:e + 1] = g[s - 1] if s > 0 else 0.0
    return g


def cumulative_path(embeddings: torch.Tensor) -> np.ndarray:
    """P(t) (T,): P(0) = 0, P(t) = sum_{tau=1..t} ||u_tau - u_{tau-1}||, float64
    (docs/evaluation.md#video-level-ogpe)."""
    u = torch.as_tensor(embeddings).detach().cpu().double()                     # (T, D)
    steps = torch.linalg.vector_norm(u[1:] - u[:-1], dim=-1)                     # (T-1,)
    return torch.cat([steps.new_zeros(1), steps.cumsum(0)]).numpy()              # (T,)


@dataclass(frozen=True)
class GeodesicNormaliser:
    """Per task: the mean total path length ``G_hat`` = mean G(U) of the task's TRAINING videos
    (never the evaluated split: docs/reference-bugs.md#ogpe-normaliser-from-test-data), their
    std and count, and the mean training length in frames (the frame-count baseline's). A task
    with no training video falls back to the values over all training videos (and says so)."""

    per_task: dict[str, dict[str, Any]]
    overall: dict[str, Any]

    @classmethod
    def from_videos(cls, annotations: Sequence[VideoAnnotation],
                    embeddings: Sequence[torch.Tensor] | None) -> "GeodesicNormaliser":
        if not annotations:
            raise ValueError("the video-level normaliser needs training videos, found none")

        def stats(idx: list[int]) -> dict[str, Any]:
            lengths = np.asarray([annotations[i].num_frames for i in idx], dtype=np.float64)
            out: dict[str, Any] = {"videos": len(idx), "mean_length_frames": float(lengths.mean())}
            if embeddings is not None:
                totals = np.asarray([cumulative_path(embeddings[i])[-1] for i in idx])
                mean, std = float(totals.mean()), float(totals.std())
                out |= {"mean": mean, "std": std, "cov": _finite(std / mean) if mean > 0 else None}
            return out

        by_task: dict[str, list[int]] = {}
        for i, ann in enumerate(annotations):
            by_task.setdefault(ann.task, []).append(i)
        return cls({t: stats(idx) | {"fallback": False} for t, idx in by_task.items()},
                   stats(list(range(len(annotations)))))

    def for_task(self, task: str) -> dict[str, Any]:
        return self.per_task.get(task, self.overall | {"fallback": True})

    def to_json(self, tasks: Sequence[str] = ()) -> dict[str, Any]:
        return {"per_task": {t: self.for_task(t) for t in dict.fromkeys([*self.per_task, *tasks])},
                "all_training_videos": self.overall}


def _video_metrics(preds: Sequence[np.ndarray], gts: Sequence[np.ndarray],
                   tasks: Sequence[str]) -> dict[str, Any]:
    """OGPE of one video-level predictor: per-video mean |g_t - pi_t| over all frames, then the
    mean over videos, over tasks (docs/reference-bugs.md#aggregation-differs-across-scripts) and
    pooled over frames; per task mean, std, cov = std / mean
    (docs/reference-bugs.md#cov-definition) and counts; monotonicity = share of consecutive
    non-decreasing predictions."""
    errs = [np.abs(p - g) for p, g in zip(preds, gts, strict=True)]
    video_err = np.asarray([e.mean() for e in errs])                             # (V,)
    task_arr = np.asarray(tasks, dtype=object)
    per_task: dict[str, dict[str, Any]] = {}
    for task in dict.fromkeys(tasks):
        v = video_err[task_arr == task]
        mean, std = float(v.mean()), float(v.std())
        per_task[task] = {"ogpe": mean, "std": std,
                          "cov": _finite(std / mean) if mean > 0 else None, "videos": int(len(v)),
                          "frames": int(sum(len(e) for e, t in zip(errs, tasks) if t == task))}
    steps = np.concatenate([np.diff(p) >= 0 for p in preds]) if preds else np.zeros(0)
    flat = np.concatenate(errs) if errs else np.zeros(0)
    return {
        "ogpe": {"mean_over_videos": _mean(video_err),
                 "mean_over_tasks": _mean(np.asarray([t["ogpe"] for t in per_task.values()])),
                 "pooled": _mean(flat), "videos": len(errs), "frames": int(len(flat)),
                 "tasks": len(per_task)},
        "per_task": per_task,
        "monotonicity": {"share": _mean(steps.astype(np.float64)), "pairs": int(len(steps))},
        "last_frame": _mean(np.asarray([e[-1] for e in errs])),
    }


def video_level_report(annotations: Sequence[VideoAnnotation],
                       embeddings: Sequence[torch.Tensor] | None,
                       normaliser: GeodesicNormaliser, *, train_split: str = "train"
                       ) -> dict[str, Any]:
    """Video-level OGPE (docs/evaluation.md#video-level-ogpe) of the embeddings' cumulative path
    and of baselines.

    ``annotations`` are the evaluated videos (the caller has dropped and listed those without
    foreground: docs/reference-bugs.md#empty-action-videos); ``embeddings`` their (T_i, D)
    embeddings, or None for baselines only. Videos whose path is 0 everywhere are skipped
    (docs/evaluation.md#video-level-ogpe); they are then left out for every predictor,
    so all rows score the same videos, and listed. Predictors: ``cumulative_geodesic``
    ``P(t) / G_hat_task`` raw (the paper's, unclipped) and clipped to [0, 1]; ``frame_count``
    ``t / mean training length`` (the paper's trivial baseline, Fig. 7) raw and clipped;
    ``constant_0.5``.
    """
    keep = list(range(len(annotations)))
    paths: list[np.ndarray] = []
    skipped: list[str] = []
    if embeddings is not None:
        paths = [cumulative_path(u) for u in embeddings]
        skipped = [annotations[i].handle for i in keep if paths[i].sum() <= 0]
        keep = [i for i in keep if paths[i].sum() > 0]
    anns = [annotations[i] for i in keep]
    gts = [video_progress_gt(a) for a in anns]
    tasks = [a.task for a in anns]
    predictors: dict[str, dict[str, Any]] = {}

    def add(name: str, kind: str, formula: str, raw: list[np.ndarray], clip: bool) -> None:
        entry: dict[str, Any] = {"kind": kind, "formula": formula}
        if clip:
            entry["raw"] = _video_metrics(raw, gts, tasks)
            entry["clipped"] = _video_metrics([np.clip(p, 0.0, 1.0) for p in raw], gts, tasks)
        else:
            entry["raw"] = _video_metrics(raw, gts, tasks)
        predictors[name] = entry

    if anns:
        if embeddings is not None:
            preds = []
            for i, a in zip(keep, anns):
                g_hat = normaliser.for_task(a.task)["mean"]
                preds.append(paths[i] / g_hat if g_hat > 0 else np.zeros(a.num_frames))
            add("cumulative_geodesic", "cumulative_geodesic",
                f"P(t) / G_hat_task (mean total path length of the task's {train_split} videos)",
                preds, clip=True)
        add("frame_count", "frame_count",
            f"t / mean length in frames of the task's {train_split} videos",
            [np.arange(a.num_frames) / normaliser.for_task(a.task)["mean_length_frames"]
             for a in anns], clip=True)
        add("constant_0.5", "constant", "0.5 on every frame",
            [np.full(a.num_frames, 0.5) for a in anns], clip=False)
    return {
        "convention": VIDEO_CONVENTION,
        "ground_truth": VIDEO_GROUND_TRUTH,
        "normaliser": {"split": train_split} | normaliser.to_json(tasks),
        "counts": {"videos": len(anns), "videos_skipped_zero_path": len(skipped),
                   "skipped_handles": skipped,
                   "frames": int(sum(a.num_frames for a in anns)),
                   "videos_per_task": {t: tasks.count(t) for t in dict.fromkeys(tasks)}},
        "predictors": predictors,
    }
