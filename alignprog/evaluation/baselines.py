"""Naive progress baselines, the floor every model number is reported against.

Each baseline predicts per frame (T,) of one video, 0 on background, from the annotation alone:
a constant, uniform noise, or the frames elapsed in the action over its label's mean length in
the training videos (never the evaluated ones). `parse_baseline` turns a user's baseline name
into what to run, with a one-line error for an unknown name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from alignprog.data.annotations import VideoAnnotation
from alignprog.data.dataset import Dataset

# The five constants of the fork's naive baselines (docs/evaluation.md#constant-baselines).
CONSTANTS = (0.0, 0.25, 0.5, 0.75, 1.0)
# The fork averages the uniform-random baseline over seeds 0..9
# (docs/evaluation.md#random-baseline).
RANDOM_SEEDS = tuple(range(10))


def constant_progress(annotation: VideoAnnotation, c: float) -> np.ndarray:
    """c on every foreground frame, 0 on background (T,)."""
    return np.where(annotation.foreground_mask(), float(c), 0.0)


@dataclass(frozen=True)
class DurationPrior:
    """Mean foreground segment length per action label, from the training split only, never
    test data (docs/reference-bugs.md#action-means-leak-test-data).

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
        return label_means_json(self, "mean_length", labels_in_eval)


def label_means_json(prior: Any, quantity: str, labels_in_eval: Sequence[str] = ()
                     ) -> dict[str, Any]:
    """The report entry of a per-label prior (`means`, `counts`, `fallback`, `videos`), its
    means named `quantity`; the evaluated labels that no training video shows are listed."""
    return {
        "videos": prior.videos,
        "segments": sum(prior.counts.values()),
        f"fallback_{quantity}": prior.fallback,
        "labels": {lab: {quantity: prior.means[lab], "segments": prior.counts[lab]}
                   for lab in sorted(prior.means)},
        "unseen_labels": sorted({lab for lab in labels_in_eval if lab not in prior.means}),
    }


def duration_prior(dataset: Dataset, split: str = "train") -> DurationPrior:
    """The `DurationPrior` of a split's videos (the training split: never test data,
    docs/reference-bugs.md#action-means-leak-test-data)."""
    return DurationPrior.from_annotations([dataset.videos[i].annotation
                                           for i in dataset.indices(split)])


def duration_prior_progress(annotation: VideoAnnotation, prior: DurationPrior) -> np.ndarray:
    """``min(1, (t - s + 1) / Lbar_a)`` on foreground frames, 0 on background (T,).

    The action-level form of the paper's trivial frame-count predictor
    (docs/evaluation.md#frame-counting): the frames elapsed in the action over the mean training
    length of its label.
    """
    pred = np.zeros(annotation.num_frames)
    for lab, s, n, fg in zip(annotation.labels, annotation.starts, annotation.lengths,
                             annotation.is_foreground):
        if fg:
            pred[s:s + n] = np.minimum(1.0, np.arange(1, n + 1) / prior.mean_length(lab))
    return pred


def random_progress(annotation: VideoAnnotation, rng: np.random.Generator) -> np.ndarray:
    """i.i.d. U[0, 1] on foreground frames, 0 on background (T,)
    (docs/evaluation.md#random-baseline)."""
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
