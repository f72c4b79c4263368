"""The ``cumulative_l2`` progress of the embeddings: the path walked since the action's start.

Progress of frame t in an action starting at s is the path length of the embeddings from s to t
over a normaliser. The online form divides by the mean path length of the action's label in the
training videos (`PathLengthPrior`, never the evaluated ones), so it needs no future frame; the
offline form divides by the action's own total path, which needs the action's end and is a
diagnostic only. Both follow the conventions of `losses.progress.cumulative_progress`, the
function training uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from alignprog.data.annotations import VideoAnnotation
from alignprog.evaluation.baselines import label_means_json
from alignprog.losses.progress import cumulative_progress, segment_path_lengths

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
    t = s+1 .. e (the cumulative path of docs/evaluation.md#cumulative-l2-predictor; 0 for a
    one-frame segment)."""
    u, mask = _as_batch(embeddings)
    start, end, _, seg_mask = _segment_tensors(annotation)
    return segment_path_lengths(u, mask, start, end, seg_mask)[0].numpy()      # (K,)


@dataclass(frozen=True)
class PathLengthPrior:
    """Mean path length per action label, from the training split only, never test data
    (docs/evaluation.md#cumulative-l2-predictor,
    docs/reference-bugs.md#action-means-leak-test-data).

    Foreground segments of at least 2 frames (a one-frame segment has no path); ``fallback``, for
    a label no training video shows, is the mean of the positive label means, with
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
        return label_means_json(self, "mean_path_length", labels_in_eval)


def cumulative_l2_progress(embeddings: torch.Tensor, annotation: VideoAnnotation,
                           prior: PathLengthPrior | None) -> np.ndarray:
    """The unclipped ``cumulative_l2`` prediction (T,), 0 on background
    (docs/evaluation.md#cumulative-l2-predictor).

    ``prior`` given: causal, each action's path so far over its label's training mean path
    length; None: the non-causal self-normalised variant ``P_s(t) / P_s(e)`` that training uses
    (a diagnostic, "offline"; docs/reference-bugs.md#unbounded-cumulative-predictions).
    Conventions of `losses.progress.cumulative_progress`.
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
