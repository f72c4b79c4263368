"""Alignment metrics: Kendall's tau (standard and in the wild), EAE, phase classification and
phase progression, per task, with the protocol written into the report.

Definitions: docs/evaluation.md#alignment-metrics (ground-truth alignment, nearest neighbours,
video-level ground-truth progress, PC, PHP, KT, KTW, EAE). Unlike the reference evaluators
(docs/reference-bugs.md): background never aligns, is never progress, is reported apart in PC
(#background-label-mismatch); every test video, every ordered pair of distinct videos
(#dropped-or-unpaired-test-videos); PC trained on the train split, scored on test frames
(#phase-classification-on-training-frames); PHP fitted on train, scored on test
(#phase-progression-on-training-frames); EAE wild mode an explicit flag
(#eae-wild-mode-by-dataset-name); pairs without a shared action skipped and counted
(#no-shared-labels-nan-alignment); NaN taus skipped, with counts (#kendall-tau-nan); the
corrected in-the-wild tau (#kendall-tau-wild-definition); means over tasks and over
videos/pairs (#aggregation-differs-across-scripts); local RNGs (#global-rng-reseeding).

Every function takes per-video embeddings ``(T_i, D)`` (numpy or torch) and the matching
canonical annotations (`VideoAnnotation`, whose ``background`` set decides what is background).
Videos of several tasks may be mixed: pairs, probes and regressions never cross tasks. Each
returns a JSON-serialisable dict (undefined values are ``None``, never NaN).

The metrics live in `pairwise` (Kendall's tau, in the wild, EAE: nearest neighbours between
every ordered pair of a task's videos) and `probes` (phase classification and progression:
models fitted on the train split, scored on the test split); `evaluate_alignment` embeds each
video once and runs them all.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch

from alignprog.data.dataset import Dataset
from alignprog.evaluation.embed import embed_videos
from alignprog.evaluation.pairwise import (alignment_partners, enclosed_area_error,
                                           enclosed_area_error_pair, has_background,
                                           kendall_tau, kendall_tau_pair, kendall_tau_wild,
                                           kendall_tau_wild_pair, nearest_neighbours)
from alignprog.evaluation.probes import (PC_CLASSIFIER, PC_FRACTIONS, phase_classification,
                                         phase_progression)

__all__ = ["PC_CLASSIFIER", "PC_FRACTIONS", "PROTOCOL", "alignment_partners",
           "enclosed_area_error", "enclosed_area_error_pair", "evaluate_alignment",
           "has_background", "kendall_tau", "kendall_tau_pair", "kendall_tau_wild",
           "kendall_tau_wild_pair", "nearest_neighbours", "phase_classification",
           "phase_progression"]

PROTOCOL = {
    "embedding": "each video of the train and test splits embedded once by the encoder in eval "
                 "mode, no grad; every metric computed per task (pairs, probes and regressions "
                 "never mix tasks), then averaged over tasks and over pairs/videos",
    "ground_truth_alignment": "frames of two videos are partners when they lie in foreground "
                              "segments of the same action label (every pair of such segments, so "
                              "repeated actions give several partners); frame s+r of an n-frame "
                              "segment pairs with s'+round(r(n'-1)/(n-1)) of the other's n'-frame "
                              "segment; background frames have no partner",
    "nearest_neighbour": "Euclidean nearest frame of the other video, ties to the lowest index",
    "kendall_tau": "every ordered pair of distinct test videos of a task; scipy tau-b "
                   "between the nearest-neighbour indices and the frame order, all frames "
                   "(background included); undefined pairs (constant neighbours) skipped and "
                   "counted; task value = mean over its scored pairs",
    "kendall_tau_wild": "corrected definition: every ordered pair of distinct test videos of "
                        "a task; frame pairs t < t' both with a ground-truth partner; concordant "
                        "iff some partners p of t, q of t' satisfy (nn(t')-nn(t))(q-p) > 0, or "
                        "nn(t') = nn(t) and q = p; tau = (C-D)/(C+D); pairs with no shared "
                        "action or no alignable frame pair skipped and counted",
    "enclosed_area_error": "every ordered pair of distinct test videos of a task; for "
                           "each frame with a ground-truth partner, the distance from its nearest "
                           "neighbour to the closest partner, summed and divided by (frames x Z); "
                           "wild: distance and Z count partner frames of the other video (Z = "
                           "adjacent partner pairs), else |a-b| and Z = its length; lower is "
                           "better (the paper reports x100); pairs with no shared action skipped "
                           "and counted",
    "phase_classification": "corrected protocol: per task, StandardScaler + RBF SVC (C=1, "
                            "gamma='scale', one-vs-one) fitted on round(p*n) random frames of "
                            "every TRAIN-split video (p in fractions, fixed seed), accuracy on all "
                            "TEST-split frames; background_included treats background labels as "
                            "classes, background_excluded drops background frames from training "
                            "and test",
    "phase_progression": "corrected protocol: per task, least squares with intercept from "
                         "embeddings to video-level ground-truth progress (background holds the "
                         "previous value, each action an equal share), fitted on all TRAIN-split "
                         "frames, R^2 on TEST-split frames: pooled per task, and mean of "
                         "per-video R^2 (videos with constant ground truth skipped and counted)",
}


def evaluate_alignment(model: torch.nn.Module, dataset: Dataset, *, device: torch.device | str,
                       train_split: str = "train", test_split: str = "test", batch_size: int = 4,
                       fractions: Sequence[float] = PC_FRACTIONS, seed: int = 0,
                       wild: bool | None = None,
                       autocast_dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Every alignment metric (docs/evaluation.md#alignment-metrics) on ``test_split``, probes
    fitted on ``train_split``; JSON-serialisable (no NaN).

    Each video of both splits is embedded once (`embed_videos`). ``wild`` (EAE) defaults to on
    when the dataset has background frames (docs/evaluation.md#enclosed-area-error; an explicit
    flag, not the dataset name: docs/reference-bugs.md#eae-wild-mode-by-dataset-name). Top-level
    keys: ``dataset``, ``split``, ``train_split``, ``split_sha256``, ``counts``, ``metrics``
    (``kendall_tau``, ``kendall_tau_wild``, ``enclosed_area_error``, ``phase_classification``,
    ``phase_progression``), ``protocol``, ``timing_s``.
    """
    t_start = time.perf_counter()
    if train_split == test_split:
        raise ValueError("train_split and test_split must differ (probes are fitted on one and "
                         f"scored on the other), both are {test_split!r}")
    test_idx, train_idx = dataset.indices(test_split), dataset.indices(train_split)
    t0 = time.perf_counter()
    embs = embed_videos(model, dataset, test_idx + train_idx, device=device,
                        batch_size=batch_size, autocast_dtype=autocast_dtype)
    embed_s = time.perf_counter() - t0
    test_embs, train_embs = embs[:len(test_idx)], embs[len(test_idx):]
    test_anns = [dataset.videos[i].annotation for i in test_idx]
    train_anns = [dataset.videos[i].annotation for i in train_idx]
    if wild is None:
        wild = has_background([v.annotation for v in dataset.videos])

    t0 = time.perf_counter()
    metrics = {
        "kendall_tau": kendall_tau(test_embs, test_anns),
        "kendall_tau_wild": kendall_tau_wild(test_embs, test_anns),
        "enclosed_area_error": enclosed_area_error(test_embs, test_anns, wild=wild),
        "phase_classification": phase_classification(train_embs, train_anns, test_embs,
                                                      test_anns, fractions=fractions, seed=seed),
        "phase_progression": phase_progression(train_embs, train_anns, test_embs, test_anns),
    }
    metrics_s = time.perf_counter() - t0
    tasks = list(dict.fromkeys(a.task for a in test_anns))
    return {
        "dataset": dataset.name,
        "split": test_split,
        "train_split": train_split,
        "split_sha256": dataset.splits.sha256(),
        "counts": {
            "test_videos": len(test_idx),
            "train_videos": len(train_idx),
            "tasks": len(tasks),
            "per_task": {task: {"test_videos": sum(a.task == task for a in test_anns),
                                "train_videos": sum(a.task == task for a in train_anns)}
                         for task in tasks},
        },
        "metrics": metrics,
        "protocol": {**PROTOCOL, "background_labels": sorted(dataset.background),
                     "eae_wild": wild, "pc_fractions": [float(p) for p in fractions],
                     "pc_seed": seed},
        "timing_s": {"embed": embed_s, "metrics": metrics_s,
                     "total": time.perf_counter() - t_start},
    }
