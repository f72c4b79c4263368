"""Action-level progress evaluation: the learnable head online, naive baselines, one report.

Spec DATA_AND_EVAL 3.0 (action-level ground truth), 3.7 (the head's online protocol), 3.11 (naive
baselines), 3.12 (shape-aware metrics), 3.13 (split hash and counts in every result) and pitfalls
P3/P4 (priors from the training split only), P20 (both aggregations), P21 (videos without actions
are skipped and counted), P22 (baselines beside every model number), P23/P24 (conventions written
into the report); ALGORITHMS 3.5 (inference protocol).

Ground truth: frame t of a foreground (non-background) canonical segment [s, e] of length
L = e - s + 1 has progress (t - s + 1) / L, from 1/L at the first frame to 1 at the last;
background frames are excluded from every error. Every number is oracle-segmented (segment
bounds and labels come from the annotation) and never comparable with the paper's video-level OPE.

The flow is: embed each evaluated video once (`embed_videos`), predict per frame (`online_progress`
for the head, `constant_progress`, `duration_prior_progress`, `random_progress` for baselines),
flatten the foreground frames once (`action_frames`), then score every predictor on the same
frames (`progress_metrics`). All of it is assembled by `evaluate_progress` into a JSON-serialisable
dict.

Two optional parts (``evaluate_progress(..., cumulative=True, video_level=True)``, which
`alignprog eval-progress` turns on; `train` leaves them off):

* the ``cumulative_l2`` predictor of the embeddings (spec 3.7, ALGORITHMS 5.3): the path length
  since the action's start over the mean path length of the action's label in the TRAINING
  split's videos (`PathLengthPrior`, P3/P4), causal; reported clipped to [0, 1]
  (``cumulative_l2``) and raw (``cumulative_l2_raw``, REF-compatible, P5), plus the non-causal
  self-normalised diagnostic ``cumulative_l2_offline`` (P5; the normaliser `train` uses);
* the video-level OGPE (spec 3.6, the paper's OPE): ``P(t) / G_hat_task`` against the video-level
  ground truth of spec 3.0 with the full background set, over all frames, ``G_hat_task`` the mean
  total path length of the task's TRAINING videos (`GeodesicNormaliser`, P3), raw and clipped,
  beside the frame-count and constant baselines (`video_level_report`).
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from alignprog.data.annotations import VideoAnnotation
from alignprog.data.dataset import Dataset
from alignprog.losses.progress import cumulative_progress, segment_path_lengths
from alignprog.sampling import BIN_EDGES, BIN_NAMES

CONVENTION = "action-level, online (prefix), oracle-segmented"
GROUND_TRUTH = ("(t - s + 1) / L on the frames of each foreground canonical segment [s, e] "
                "(L = e - s + 1); background frames excluded")
# Spec 3.11: the five constants of [F]'s naive baselines.
CONSTANTS = (0.0, 0.25, 0.5, 0.75, 1.0)
# Spec 3.11: [F] averages the uniform-random baseline over seeds 0..9.
RANDOM_SEEDS = tuple(range(10))
# Spec 3.12: OGPE by action length, bins 1-2, 3-5, 6-10, 11-20, 21-50, more than 50 frames.
LENGTH_BINS = ((1, 2), (3, 5), (6, 10), (11, 20), (21, 50), (51, None))
# Spec 3.12: endpoint errors over the first and last 10% of each action (at least one frame).
ENDPOINT_FRACTION = 10  # percent
# Spec 3.12: per-action Spearman correlation only for actions with at least 3 frames.
SPEARMAN_MIN_FRAMES = 3


# ----------------------------------------------------------------------------------------------
# Embedding pass (spec 3.0): every evaluated video through the encoder once


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module):
    """Eval mode (dropout off, spec 3.5) for the duration, then the caller's mode back."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def embed_videos(model: torch.nn.Module, dataset: Dataset, indices: Sequence[int], *,
                 device: torch.device | str, batch_size: int = 4,
                 autocast_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Each video's aligned embeddings (T_i, D), float32 on the CPU, in ``indices`` order.

    The model must already live on ``device``. Eval mode and no grad; the model's train/eval
    mode is restored afterwards. Videos are batched by similar length (the encoders are padding
    invariant, so this changes nothing but the padding); each is read and embedded once.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    indices = list(indices)
    order = sorted(range(len(indices)), key=lambda j: dataset.videos[indices[j]].num_frames)
    out: list[torch.Tensor | None] = [None] * len(indices)
    with _eval_mode(model), torch.no_grad():
        for lo in range(0, len(order), batch_size):
            rows = order[lo:lo + batch_size]
            arrays = [dataset.load(indices[j]) for j in rows]                     # (T_i, *F) each
            t_max = max(len(a) for a in arrays)
            x = torch.zeros((len(arrays), t_max, *arrays[0].shape[1:]))          # (B, T, *F)
            mask = torch.zeros((len(arrays), t_max), dtype=torch.bool)           # (B, T)
            for b, a in enumerate(arrays):
                x[b, :len(a)] = torch.from_numpy(a)
                mask[b, :len(a)] = True
            x, mask = x.to(device), mask.to(device)
            with _autocast(device, autocast_dtype):
                emb = model.encoder(x, mask).embeddings                           # (B, T, D)
            emb = emb.float().cpu()
            for b, (j, a) in enumerate(zip(rows, arrays)):
                out[j] = emb[b, :len(a)].clone()                                  # (T_i, D)
    return out  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# The learnable head, online (spec 3.7, ALGORITHMS 3.5)


def _foreground_segments(annotation: VideoAnnotation) -> tuple[np.ndarray, np.ndarray]:
    """Starts and lengths (A,) of the foreground segments."""
    fg = annotation.is_foreground                                                 # (K,)
    return np.asarray(annotation.starts)[fg], annotation.lengths[fg]


def _chunks(lengths: np.ndarray, row_elems: int, chunk_elems: int) -> list[np.ndarray]:
    """Indices of rows sorted by length, cut so that rows * max length * row_elems <= budget."""
    order = np.argsort(lengths, kind="stable")
    chunks, lo = [], 0
    while lo < len(order):
        hi = lo + 1
        # Sorted ascending, so the last row of a chunk sets its padded length.
        while (hi < len(order)
               and (hi + 1 - lo) * int(lengths[order[hi]]) * row_elems <= chunk_elems):
            hi += 1
        chunks.append(order[lo:hi])
        lo = hi
    return chunks


def _dense_is_online(head: torch.nn.Module) -> bool:
    """True when one dense pass gives every prefix's output: a streamable head (causal position
    feature) that has a dense output (ALGORITHMS 3.5)."""
    return bool(head.streamable) and bool(getattr(head, "has_dense", True))


def online_cost(head: torch.nn.Module, annotation: VideoAnnotation) -> int:
    """Frame steps `online_progress` will run the head for (work and, for attention, memory):
    sum L over the actions for a head with one dense pass, sum L(L+1)/2 for one that re-runs
    every prefix, and the transformer, which attends over every earlier frame, sum L(L+1)/2
    in one dense pass (its score matrices are L x L), L(L+1)(L+2)/6 prefix by prefix."""
    _, lengths = _foreground_segments(annotation)
    n = [int(x) for x in lengths]                      # Python ints: no overflow
    from alignprog.models.progress_heads import TransformerProgressHead
    attends = isinstance(head, TransformerProgressHead)
    if _dense_is_online(head):
        return sum(x * (x + 1) // 2 if attends else x for x in n)
    if attends:
        return sum(x * (x + 1) * (x + 2) // 6 for x in n)
    return sum(x * (x + 1) // 2 for x in n)


def online_progress(head: torch.nn.Module, embeddings: torch.Tensor, annotation: VideoAnnotation,
                    *, chunk_elems: int = 2**22, dense: bool | None = None) -> torch.Tensor:
    """The head's online action-level prediction (T,) on the CPU (spec 3.7, ALGORITHMS 3.5).

    Frame t of foreground segment [s, e] gets head(U[s : t+1]), the output at the last frame of
    the growing prefix; background frames get 0. The head runs in eval mode (restored after) and
    in its parameters' dtype and device. All prefixes of all actions go through the head as
    left-aligned zero-padded batches (Q, L, D) + lengths, cut into chunks with Q * L * D <=
    ``chunk_elems``. A streamable head with a dense output gives the same values from one dense
    pass over each whole action (ALGORITHMS 3.5: causal features, eval mode), which is used then;
    ``dense`` forces one path (True is refused for a head whose dense output is not the prefix
    output).
    """
    t_total, dim = embeddings.shape
    if t_total != annotation.num_frames:
        raise ValueError(f"{annotation.task}/{annotation.handle}: {t_total} embeddings for an "
                         f"annotation of {annotation.num_frames} frames")
    param = next(head.parameters())
    u = embeddings.to(device=param.device, dtype=param.dtype)                     # (T, D)
    starts, lengths = _foreground_segments(annotation)                            # (A,), (A,)
    pred = torch.zeros(t_total, dtype=param.dtype)                                # (T,)
    if len(starts) == 0:
        return pred
    can_dense = _dense_is_online(head)
    if dense is None:
        dense = can_dense
    elif dense and not can_dense:
        raise ValueError(f"{type(head).__name__} (position '{getattr(head, 'position', None)}') "
                         "has no dense output equal to its prefix outputs (ALGORITHMS 3.5); "
                         "evaluate it prefix by prefix (dense=False)")
    if dense:
        row_start, row_len = starts, lengths                                      # a row an action
    else:
        # One row per prefix: action a contributes prefixes of lengths 1 .. L_a.
        row_start = np.repeat(starts, lengths)                                    # (Q,)
        row_len = np.concatenate([np.arange(1, n + 1) for n in lengths])          # (Q,)
    with _eval_mode(head), torch.no_grad():
        for rows in _chunks(row_len, dim, chunk_elems):
            s = torch.as_tensor(row_start[rows], device=u.device)                 # (q,)
            n = torch.as_tensor(row_len[rows], device=u.device)                   # (q,)
            width = int(n.max())
            tau = torch.arange(width, device=u.device)                            # (L,)
            real = tau[None, :] < n[:, None]                                      # (q, L)
            idx = (s[:, None] + tau[None, :]).clamp(max=t_total - 1)              # (q, L)
            x = u[idx] * real[..., None].to(u.dtype)                              # (q, L, D)
            y = head(x, n, dense=dense).cpu()                                     # (q, L) | (q,)
            real, s, n = real.cpu(), s.cpu(), n.cpu()
            if dense:
                frames = (s[:, None] + tau.cpu()[None, :])[real]                  # (sum n,)
                pred[frames] = y[real].to(pred.dtype)
            else:
                pred[s + n - 1] = y.to(pred.dtype)                                # prefix end frame
    return pred


# ----------------------------------------------------------------------------------------------
# Naive baselines (spec 3.11, 3.6)


def constant_progress(annotation: VideoAnnotation, c: float) -> np.ndarray:
    """c on every foreground frame, 0 on background (T,)."""
    return np.where(annotation.foreground_mask(), float(c), 0.0)


@dataclass(frozen=True)
class DurationPrior:
    """Mean foreground segment length per action label, from the training split (P4).

    ``fallback`` is the mean length over all training foreground segments, used for a label that
    no training video shows. Background never enters a mean.
    """

    means: dict[str, float]
    counts: dict[str, int]
    fallback: float
    videos: int

    @classmethod
    def from_annotations(cls, annotations: Sequence[VideoAnnotation]) -> "DurationPrior":
        sums: dict[str, int] = {}
        counts: dict[str, int] = {}
        for ann in annotations:
            for lab, n, fg in zip(ann.labels, ann.lengths, ann.is_foreground):
                if fg:
                    sums[lab] = sums.get(lab, 0) + int(n)
                    counts[lab] = counts.get(lab, 0) + 1
        total = sum(counts.values())
        if total == 0:
            raise ValueError("the duration prior needs at least one foreground segment in the "
                             "training videos, found none")
        means = {lab: sums[lab] / counts[lab] for lab in sums}
        return cls(means, counts, sum(sums.values()) / total, len(annotations))

    def mean_length(self, label: str) -> float:
        return self.means.get(label, self.fallback)

    def to_json(self, labels_in_eval: Sequence[str] = ()) -> dict[str, Any]:
        return {
            "videos": self.videos,
            "segments": sum(self.counts.values()),
            "fallback_mean_length": self.fallback,
            "labels": {lab: {"mean_length": self.means[lab], "segments": self.counts[lab]}
                       for lab in sorted(self.means)},
            "unseen_labels": sorted({lab for lab in labels_in_eval if lab not in self.means}),
        }


def duration_prior(dataset: Dataset, split: str = "train") -> DurationPrior:
    """The `DurationPrior` of a split's videos (the training split: never test data, P4)."""
    return DurationPrior.from_annotations([dataset.videos[i].annotation
                                           for i in dataset.indices(split)])


def duration_prior_progress(annotation: VideoAnnotation, prior: DurationPrior) -> np.ndarray:
    """``min(1, (t - s + 1) / Lbar_a)`` on foreground frames, 0 on background (T,).

    The action-level form of the paper's trivial frame-count predictor (spec 3.6, 3.11): the
    frames elapsed in the action over the mean training length of its label.
    """
    pred = np.zeros(annotation.num_frames)
    for lab, s, n, fg in zip(annotation.labels, annotation.starts, annotation.lengths,
                             annotation.is_foreground):
        if fg:
            pred[s:s + n] = np.minimum(1.0, np.arange(1, n + 1) / prior.mean_length(lab))
    return pred


def random_progress(annotation: VideoAnnotation, rng: np.random.Generator) -> np.ndarray:
    """i.i.d. U[0, 1] on foreground frames, 0 on background (T,) (spec 3.11)."""
    return np.where(annotation.foreground_mask(), rng.uniform(size=annotation.num_frames), 0.0)


def parse_baseline(name: str) -> tuple[str, float | None, tuple[int, ...]]:
    """``constant_<c>``, ``frame_count`` (alias ``action_duration_prior``), ``random`` (seeds
    0..9, averaged) or ``random_<seed>`` -> (kind, constant, seeds)."""
    if name.startswith("constant_"):
        try:
            c = float(name[len("constant_"):])
        except ValueError:
            c = math.nan
        if not 0.0 <= c <= 1.0:
            raise ValueError(f"baseline '{name}': the constant must be a number in [0, 1] "
                             f"(e.g. {', '.join(f'constant_{c:g}' for c in CONSTANTS)})")
        return "constant", c, ()
    if name in ("frame_count", "action_duration_prior"):
        return "frame_count", None, ()
    if name == "random":
        return "random", None, RANDOM_SEEDS
    if name.startswith("random_") and name[len("random_"):].isdigit():
        return "random", None, (int(name[len("random_"):]),)
    raise ValueError(f"unknown progress baseline '{name}'; choose constant_<c> (c in [0, 1]), "
                     "frame_count (alias action_duration_prior), random or random_<seed>")


# ----------------------------------------------------------------------------------------------
# Metrics on the pooled foreground frames


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
    """Flatten the foreground frames of the given videos (spec 3.0, action-level GT)."""
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


def _finite(x: float) -> float | None:
    """JSON has no NaN: undefined values are None."""
    x = float(x)
    return x if math.isfinite(x) else None


def _mean(x: np.ndarray) -> float | None:
    return _finite(x.mean()) if len(x) else None


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties averaged (Spearman's convention)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)
    return (upper - (counts - 1) / 2.0)[inverse]


def _spearman(pred: np.ndarray, frames: ActionFrames) -> dict[str, Any]:
    """Mean per-action Spearman correlation with the GT (strictly increasing within an action).

    Actions shorter than 3 frames are left out; an action whose prediction is constant has no
    correlation and is counted as undefined (spec 3.12).
    """
    values, undefined = [], 0
    bounds = np.flatnonzero(np.diff(frames.action)) + 1
    for lo, hi in zip(np.r_[0, bounds], np.r_[bounds, len(pred)]):
        n = hi - lo
        if n < SPEARMAN_MIN_FRAMES:
            continue
        rp = _average_ranks(pred[lo:hi]) - (n + 1) / 2.0
        rg = np.arange(1, n + 1) - (n + 1) / 2.0
        denom = math.sqrt(float((rp * rp).sum() * (rg * rg).sum()))
        if denom == 0.0:
            undefined += 1
            continue
        values.append(float((rp * rg).sum()) / denom)
    return {"mean": _mean(np.asarray(values)), "actions": len(values),
            "undefined_constant": undefined, "min_frames": SPEARMAN_MIN_FRAMES}


def progress_metrics(pred: np.ndarray, frames: ActionFrames) -> dict[str, Any]:
    """Errors of one predictor (N,) on the foreground frames (N,), JSON-serialisable.

    ``mae``: pooled over frames, mean over videos of per-video MAE, mean over tasks of per-task
    MAE (a task's MAE is the mean over its videos, as [F]'s evaluators; P20 asks for both
    aggregations). ``per_task``, ``by_progress`` (GT bins early/mid/late, the sampler's edges),
    ``by_length`` (spec 3.12 action-length bins), ``normalised_mae`` = 1 - MAE / MAE(constant
    0.5) (pooled, spec 3.12), and the shape metrics: ``monotonicity`` (share of consecutive
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
            "std": std,                                    # over videos (P19: std, not var)
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


# ----------------------------------------------------------------------------------------------
# The cumulative_l2 predictor of the embeddings (spec 3.7, 3.8; ALGORITHMS 5.3; P4, P5, B27)

CUMULATIVE_CONVENTIONS = (
    "pi_t = P_s(t) / mu_a on the frames of each foreground action [s, e] (P_s: path length of the "
    "embeddings since s, 0 at s), mu_a the mean path length of label a over the training "
    "split's foreground segments of >= 2 frames (unseen label: mean of the positive label "
    "means); one-frame actions 0.5 and a zero normaliser a linear ramp, as "
    "losses.progress.cumulative_progress")


def _segment_tensors(annotation: VideoAnnotation
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """seg_start, seg_end, seg_foreground, seg_mask of one video, each (1, K)."""
    start = torch.as_tensor(annotation.starts, dtype=torch.long)[None]           # (1, K)
    end = torch.as_tensor(annotation.ends, dtype=torch.long)[None]               # (1, K)
    fg = torch.as_tensor(annotation.is_foreground)[None]                         # (1, K)
    return start, end, fg, torch.ones_like(fg)


def _as_batch(embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One video's embeddings (T, D) as a float64 batch (1, T, D) and its mask (1, T)."""
    u = torch.as_tensor(embeddings).detach().cpu().double()[None]               # (1, T, D)
    return u, torch.ones(u.shape[:2], dtype=torch.bool)


def action_path_lengths(embeddings: torch.Tensor, annotation: VideoAnnotation) -> np.ndarray:
    """Path length of the embeddings over each segment (K,), sum of ||u_t - u_{t-1}|| for
    t = s+1 .. e (spec 3.0 cumulative geodesic length; 0 for a one-frame segment)."""
    u, mask = _as_batch(embeddings)
    start, end, _, seg_mask = _segment_tensors(annotation)
    return segment_path_lengths(u, mask, start, end, seg_mask)[0].numpy()      # (K,)


@dataclass(frozen=True)
class PathLengthPrior:
    """Mean path length per action label, from the training split only (spec 3.8 SPEC, P4).

    Foreground segments of at least 2 frames (a one-frame segment has no path); ``fallback``, for
    a label no training video shows, is the mean of the positive label means (spec 3.7), with
    background never entering any mean.
    """

    means: dict[str, float]
    counts: dict[str, int]
    fallback: float
    videos: int

    @classmethod
    def from_embeddings(cls, annotations: Sequence[VideoAnnotation],
                        embeddings: Sequence[torch.Tensor]) -> "PathLengthPrior":
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for ann, u in zip(annotations, embeddings, strict=True):
            paths = action_path_lengths(u, ann)                                   # (K,)
            for lab, n, fg, g in zip(ann.labels, ann.lengths, ann.is_foreground, paths):
                if fg and n >= 2:
                    sums[lab] = sums.get(lab, 0.0) + float(g)
                    counts[lab] = counts.get(lab, 0) + 1
        means = {lab: sums[lab] / counts[lab] for lab in sums}
        positive = [m for m in means.values() if m > 0]
        return cls(means, counts, float(np.mean(positive)) if positive else 0.0, len(annotations))

    def normaliser(self, label: str) -> float:
        return self.means.get(label, self.fallback)

    def to_json(self, labels_in_eval: Sequence[str] = ()) -> dict[str, Any]:
        return {
            "videos": self.videos,
            "segments": sum(self.counts.values()),
            "fallback_mean_path_length": self.fallback,
            "labels": {lab: {"mean_path_length": self.means[lab], "segments": self.counts[lab]}
                       for lab in sorted(self.means)},
            "unseen_labels": sorted({lab for lab in labels_in_eval if lab not in self.means}),
        }


def cumulative_l2_progress(embeddings: torch.Tensor, annotation: VideoAnnotation,
                           prior: PathLengthPrior | None) -> np.ndarray:
    """The unclipped ``cumulative_l2`` prediction (T,), 0 on background (spec 3.7).

    ``prior`` given: causal, each action's path so far over its label's training mean path
    length; None: the non-causal self-normalised variant ``P_s(t) / P_s(e)`` that training uses
    (a diagnostic, "offline", P5). Conventions of `losses.progress.cumulative_progress`.
    """
    u, mask = _as_batch(embeddings)
    if u.shape[1] != annotation.num_frames:
        raise ValueError(f"{annotation.task}/{annotation.handle}: {u.shape[1]} embeddings for an "
                         f"annotation of {annotation.num_frames} frames")
    start, end, fg, seg_mask = _segment_tensors(annotation)
    norm = None
    if prior is not None:
        norm = torch.tensor([[prior.normaliser(lab) for lab in annotation.labels]],
                            dtype=torch.float64)                                 # (1, K)
    return cumulative_progress(u, mask, start, end, fg, seg_mask,
                               normaliser=norm)[0].numpy()                       # (T,)


# ----------------------------------------------------------------------------------------------
# Video-level OGPE (spec 3.0 ground truth, 3.6 metric; P1, P3, P19, P20, P21)

VIDEO_CONVENTION = "video-level, online (cumulative over the whole video), all frames"
VIDEO_GROUND_TRUTH = (
    "spec 3.0: with M foreground actions, action k ramps linearly from k/M at its first frame to "
    "(k+1)/M at its last (a one-frame action: k/M); background frames (full background set) "
    "hold the previous value (0 before the first action)")


def video_progress_gt(annotation: VideoAnnotation) -> np.ndarray:
    """Video-level ground-truth progress (T,) (spec 3.0, the full background set: P1).

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
    """P(t) (T,): P(0) = 0, P(t) = sum_{tau=1..t} ||u_tau - u_{tau-1}|| (spec 3.0), float64."""
    u = torch.as_tensor(embeddings).detach().cpu().double()                     # (T, D)
    steps = torch.linalg.vector_norm(u[1:] - u[:-1], dim=-1)                     # (T-1,)
    return torch.cat([steps.new_zeros(1), steps.cumsum(0)]).numpy()              # (T,)


@dataclass(frozen=True)
class GeodesicNormaliser:
    """Per task: the mean total path length ``G_hat`` = mean G(U) of the task's TRAINING videos
    (spec 3.6 SPEC, P3: never the evaluated split), their std and count, and the mean training
    length in frames (the frame-count baseline's). A task with no training video falls back to
    the values over all training videos (and says so)."""

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
    mean over videos, over tasks (P20) and pooled over frames; per task mean, std, cov = std /
    mean (P19) and counts; monotonicity = share of consecutive non-decreasing predictions."""
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
    """Video-level OGPE (spec 3.6) of the embeddings' cumulative path and of baselines.

    ``annotations`` are the evaluated videos (the caller has dropped those without foreground:
    P21); ``embeddings`` their (T_i, D) embeddings, or None for baselines only. Videos whose
    path is 0 everywhere are skipped by the spec; they are then left out for every predictor,
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


# ----------------------------------------------------------------------------------------------
# The report


def _spread(n: int, k: int) -> list[int]:
    """k positions spread evenly over range(n) (all of them when k >= n)."""
    if k <= 0 or n == 0:
        return []
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, min(k, n))})


def evaluate_progress(model: torch.nn.Module | None, dataset: Dataset, split: str, *,
                      device: torch.device | str, train_split: str = "train",
                      batch_size: int = 4,
                      baselines: Sequence[str] = ("constant_0.5", "frame_count"),
                      autocast_dtype: torch.dtype | None = None,
                      chunk_elems: int = 2**22, cumulative: bool = False,
                      video_level: bool = False, curves: int = 0) -> dict[str, Any]:
    """Action-level, online, oracle-segmented progress errors of the model's head and baselines.

    Every video of ``split`` with at least one foreground frame is evaluated (the others are
    counted and listed, never silently dropped: P21); each is embedded once. The head (if
    ``model`` has one; ``model=None`` evaluates baselines only) predicts online per spec 3.7.
    ``frame_count`` takes its mean action lengths from ``train_split`` (P4). The report holds the
    split name and hash, counts, the conventions (P23, P24) and, under ``predictors``, the
    `progress_metrics` of each predictor.

    ``cumulative`` adds the embeddings' ``cumulative_l2`` predictors (clipped, raw, offline) with
    per-label normalisers from ``train_split`` videos; ``video_level`` adds the ``video_level``
    section (`video_level_report`, ``G_hat`` from ``train_split`` videos). Both embed the
    training split's videos once more (no model: the video-level baselines only). ``curves``
    > 0 keeps, under ``curves``, the per-frame ground truth and predictions of that many
    evaluated videos (spread over the split) for plotting. None of these change the other
    numbers: the evaluated videos are embedded exactly as without them.
    """
    t_start = time.perf_counter()
    kinds = {name: parse_baseline(name) for name in baselines}                   # fail early
    indices = dataset.indices(split)
    skipped = [i for i in indices if not dataset.videos[i].annotation.is_foreground.any()]
    skipped_set = set(skipped)
    kept = [i for i in indices if i not in skipped_set]
    annotations = [dataset.videos[i].annotation for i in kept]
    frames = action_frames(annotations)
    fg_labels = [lab for a in annotations for lab, fg in zip(a.labels, a.is_foreground) if fg]

    predictions: dict[str, dict[str, Any]] = {}
    per_video: dict[str, list[np.ndarray]] = {}   # per-frame predictions kept for ``curves``
    timing: dict[str, float] = {}
    priors: dict[str, Any] = {}
    head = getattr(model, "progress_head", None) if model is not None else None
    use_embeddings = model is not None and (head is not None or cumulative or video_level)
    embeddings: list[torch.Tensor] | None = None
    if use_embeddings and kept:
        t0 = time.perf_counter()
        embeddings = embed_videos(model, dataset, kept, device=device, batch_size=batch_size,
                                  autocast_dtype=autocast_dtype)
        timing["embed_s"] = time.perf_counter() - t0
    train_embeddings: list[torch.Tensor] | None = None
    train_indices = dataset.indices(train_split)
    if model is not None and (cumulative or video_level):
        # Normalisers come from the training split only (P3, P4); when it is the evaluated split
        # its videos are not embedded twice.
        t0 = time.perf_counter()
        reuse = dict(zip(kept, embeddings or [])) if split == train_split else {}
        todo = [i for i in train_indices if i not in reuse]
        fresh = dict(zip(todo, embed_videos(model, dataset, todo, device=device,
                                            batch_size=batch_size, autocast_dtype=autocast_dtype)
                         if todo else []))
        train_embeddings = [reuse[i] if i in reuse else fresh[i] for i in train_indices]
        timing["embed_train_s"] = time.perf_counter() - t0
    train_annotations = [dataset.videos[i].annotation for i in train_indices]

    if head is not None and embeddings is not None:
        t0 = time.perf_counter()
        per_video["head"] = [online_progress(head, u, ann, chunk_elems=chunk_elems).double().numpy()
                             for u, ann in zip(embeddings, annotations)]
        timing["head_s"] = time.perf_counter() - t0
        dense = _dense_is_online(head)
        predictions["head"] = {
            "kind": "learnable_head",
            "arch": type(head).__name__,
            "position": getattr(head, "position", None),
            "inference": "one dense pass per action (streamable head)" if dense
            else "one head call per prefix, batched",
            "metrics": progress_metrics(frames.gather(per_video["head"]), frames),
        }

    if cumulative and embeddings is not None and train_embeddings is not None:
        t0 = time.perf_counter()
        path_prior = PathLengthPrior.from_embeddings(train_annotations, train_embeddings)
        priors["cumulative_l2"] = {"split": train_split} | path_prior.to_json(fg_labels)
        raw = [cumulative_l2_progress(u, a, path_prior) for u, a in zip(embeddings, annotations)]
        per_video["cumulative_l2"] = [np.clip(p, 0.0, 1.0) for p in raw]
        offline = [cumulative_l2_progress(u, a, None) for u, a in zip(embeddings, annotations)]
        formula = f"P_s(t) / mean {train_split} path length of the action's label"
        predictions["cumulative_l2"] = {
            "kind": "cumulative_l2", "normaliser": f"class ({train_split} split)", "causal": True,
            "clipped": True, "formula": f"clip({formula}, 0, 1)",
            "conventions": CUMULATIVE_CONVENTIONS,
            "metrics": progress_metrics(frames.gather(per_video["cumulative_l2"]), frames)}
        predictions["cumulative_l2_raw"] = {
            "kind": "cumulative_l2", "normaliser": f"class ({train_split} split)", "causal": True,
            "clipped": False, "formula": formula + " (unclipped, REF-compatible)",
            "metrics": progress_metrics(frames.gather(raw), frames)}
        predictions["cumulative_l2_offline"] = {
            "kind": "cumulative_l2", "normaliser": "self (the action's own total path)",
            "causal": False, "clipped": False,
            "formula": "P_s(t) / P_s(e): needs the action's end, a diagnostic, not online",
            "metrics": progress_metrics(frames.gather(offline), frames)}
        timing["cumulative_s"] = time.perf_counter() - t0

    prior: DurationPrior | None = None
    for name, (kind, c, seeds) in kinds.items():
        if kind == "constant":
            pred = frames.gather([constant_progress(a, c) for a in annotations])
            predictions[name] = {"kind": "constant", "value": c,
                                 "metrics": progress_metrics(pred, frames)}
        elif kind == "frame_count":
            if prior is None:
                prior = duration_prior(dataset, train_split)
                priors["frame_count"] = {"split": train_split} | prior.to_json(fg_labels)
            per_video.setdefault(name, [duration_prior_progress(a, prior) for a in annotations])
            predictions[name] = {"kind": "frame_count",
                                 "formula": f"min(1, (t - s + 1) / mean {train_split} length "
                                            "of the action's label)",
                                 "metrics": progress_metrics(frames.gather(per_video[name]),
                                                             frames)}
        else:
            per_seed = []
            for seed in seeds:
                rng = np.random.default_rng(seed)
                pred = frames.gather([random_progress(a, rng) for a in annotations])
                per_seed.append(progress_metrics(pred, frames))
            pooled = [m["mae"]["pooled"] for m in per_seed]
            predictions[name] = {
                "kind": "random", "seeds": list(seeds),
                "mae_pooled_std_over_seeds": (None if any(p is None for p in pooled)
                                              else float(np.std(pooled))),
                "metrics": _average_reports(per_seed)}

    report: dict[str, Any] = {
        "convention": CONVENTION,
        "ground_truth": GROUND_TRUTH,
        "dataset": dataset.name,
        "split": split,
        "split_sha256": dataset.splits.sha256(),
        "train_split": train_split,
        "counts": {
            "videos": len(kept),
            "videos_in_split": len(indices),
            "videos_skipped_no_foreground": len(skipped),
            "skipped_handles": [dataset.videos[i].handle for i in skipped],
            "foreground_frames": int(len(frames.gt)),
            "background_frames_excluded": int(sum(a.num_frames for a in annotations)
                                              - len(frames.gt)),
            "actions": frames.num_actions,
            "tasks": len(set(frames.tasks)),
            "videos_per_task": {t: frames.tasks.count(t) for t in dict.fromkeys(frames.tasks)},
        },
        "model_has_head": head is not None,
        "priors": priors,
        "predictors": predictions,
    }
    if video_level:
        t0 = time.perf_counter()
        report["video_level"] = video_level_report(
            annotations, embeddings if model is not None else None,
            GeodesicNormaliser.from_videos(train_annotations, train_embeddings),
            train_split=train_split)
        timing["video_level_s"] = time.perf_counter() - t0
    if curves > 0:
        report["curves"] = [{
            "handle": ann.handle, "task": ann.task, "num_frames": ann.num_frames,
            "segments": [{"label": lab, "start": int(s), "end": int(e), "foreground": bool(fg)}
                         for lab, s, e, fg in zip(ann.labels, ann.starts, ann.ends,
                                                  ann.is_foreground)],
            "ground_truth": _action_gt(ann).tolist(),
            "predictions": {name: preds[j].tolist() for name, preds in per_video.items()},
        } for j, ann in ((j, annotations[j]) for j in _spread(len(annotations), curves))]
    timing["total_s"] = time.perf_counter() - t_start
    report["timing"] = timing
    return report


def _action_gt(annotation: VideoAnnotation) -> np.ndarray:
    """Action-level ground truth (T,): (t - s + 1) / L on foreground frames, 0 on background."""
    gt = np.zeros(annotation.num_frames)
    for s, n, fg in zip(annotation.starts, annotation.lengths, annotation.is_foreground):
        if fg:
            gt[s:s + n] = np.arange(1, n + 1) / n
    return gt
