"""Alignment metrics: Kendall's tau (standard and in the wild), EAE, phase classification and
phase progression, per task, with the protocol written into the report.

Spec DATA_AND_EVAL 3.0 (shared machinery: ground-truth alignment, nearest neighbours, video-level
ground-truth progress), 3.1 (PC), 3.2 (PHP), 3.3 (KT), 3.4 (KTW), 3.5 (EAE), and pitfalls P1
(background never aligns, is never progress, is reported apart in PC), P8 (every test video,
every ordered pair of distinct videos), P13 (PC trained on the train split, scored on test
frames), P14 (PHP fitted on train, scored on test), P15 (EAE wild mode an explicit flag), P16
(pairs without a shared action skipped and counted), P17 (NaN taus: nanmean with counts), P18
(the SPEC in-the-wild tau), P20 (mean over tasks and over videos/pairs), P30 (local RNG).

Every function takes per-video embeddings ``(T_i, D)`` (numpy or torch) and the matching
canonical annotations (`VideoAnnotation`, whose ``background`` set decides what is background).
Videos of several tasks may be mixed: pairs, probes and regressions never cross tasks. Each
returns a JSON-serialisable dict (undefined values are ``None``, never NaN).

One deliberate deviation from the reference's index formula (3.0): on canonical segments
(non-overlapping, ``e_k + 1 = s_{k+1}``) every frame of a shared action is alignable, and frame
``s + r`` of an action of ``n`` frames is paired with frame ``s' + round(r (n' - 1) / (n - 1))``
of the other video's action of ``n'`` frames (a one-frame action pairs with ``s'``). The reference
skipped frame ``e`` because its inclusive JSON bounds shared ``e`` with the next segment; the
canonical form has no shared frame, and with this mapping a video aligned to itself has the
identity as its ground truth.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import numpy as np
import torch
from scipy.spatial.distance import cdist
from scipy.stats import kendalltau
from sklearn.linear_model import LinearRegression
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from alignprog.data.annotations import VideoAnnotation
from alignprog.data.dataset import Dataset
from alignprog.evaluation.progress import embed_videos, video_progress_gt

# Spec 3.1: label fractions of the PC probe ("PC 0.1 / 0.5 / 1.0").
PC_FRACTIONS = (0.1, 0.5, 1.0)
# Spec 3.1: the probe is a standard scaler + SVM with an RBF kernel, C = 1, gamma 'scale',
# one-vs-one, tol 1e-3.
PC_CLASSIFIER = "StandardScaler + SVC(kernel='rbf', C=1, gamma='scale', one-vs-one, tol=1e-3)"

Array = np.ndarray | torch.Tensor


# ----------------------------------------------------------------------------------------------
# Small helpers


def _np(u: Array) -> np.ndarray:
    """Embeddings as float64 numpy (T, D)."""
    if isinstance(u, torch.Tensor):
        u = u.detach().cpu().double().numpy()
    u = np.asarray(u, dtype=np.float64)
    if u.ndim != 2:
        raise ValueError(f"embeddings must be (T, D), got shape {u.shape}")
    return u


def _check(embs: Sequence[Array], anns: Sequence[VideoAnnotation]) -> list[np.ndarray]:
    if len(embs) != len(anns):
        raise ValueError(f"{len(embs)} embedding arrays for {len(anns)} annotations")
    out = [_np(u) for u in embs]
    for u, ann in zip(out, anns):
        if len(u) != ann.num_frames:
            raise ValueError(f"{ann.task}/{ann.handle}: {len(u)} embeddings for an annotation of "
                             f"{ann.num_frames} frames")
    return out


def _finite(x: float | None) -> float | None:
    """JSON has no NaN: undefined values are None."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _mean(values: Sequence[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return _finite(float(np.mean(vals))) if vals else None


def _by_task(anns: Sequence[VideoAnnotation]) -> dict[str, list[int]]:
    """Positions of the videos of each task, tasks in first-seen order."""
    groups: dict[str, list[int]] = {}
    for i, ann in enumerate(anns):
        groups.setdefault(ann.task, []).append(i)
    return groups


def nearest_neighbours(u1: Array, u2: Array) -> np.ndarray:
    """``nn(i) = argmin_j ||u1_i - u2_j||`` (T1,), Euclidean, ties to the lowest j (spec 3.0)."""
    return np.argmin(cdist(_np(u1), _np(u2)), axis=1)


def alignment_partners(a1: VideoAnnotation, a2: VideoAnnotation) -> np.ndarray:
    """Ground-truth alignment ``Y`` (T1, T2) bool: ``Y[i, j]`` iff j is a valid partner of i.

    Spec 3.0 with the SPEC changes: only foreground actions are matched (background frames have
    no partner, P1); every pair of segments with the same label is matched, so a repeated action
    gives several partner runs. Frame ``s + r`` of an action of n frames pairs with frame
    ``s' + round(r (n' - 1) / (n - 1))`` (numpy's half-to-even rounding; a one-frame action pairs
    with ``s'``); see the module docstring for why every frame of the action takes part.
    """
    y = np.zeros((a1.num_frames, a2.num_frames), dtype=bool)  # (T1, T2)
    for lab, s, n, fg in zip(a1.labels, a1.starts, a1.lengths, a1.is_foreground):
        if not fg:
            continue
        r = np.arange(n)
        for lab2, s2, n2, fg2 in zip(a2.labels, a2.starts, a2.lengths, a2.is_foreground):
            if not fg2 or lab2 != lab:
                continue
            cols = s2 + (np.round(r * (n2 - 1) / (n - 1)).astype(int) if n > 1 else 0)
            y[s + r, cols] = True
    return y


# ----------------------------------------------------------------------------------------------
# Per-pair scores (spec 3.3-3.5): each returns a float or None, and why it is None


def kendall_tau_pair(u1: Array, u2: Array) -> float | None:
    """Spec 3.3: tau-b between ``(nn(0), ..., nn(T1 - 1))`` and ``(0, ..., T1 - 1)``.

    None (NaN in the reference) when the neighbour sequence is constant or T1 < 2.
    """
    nn = nearest_neighbours(u1, u2)
    if len(nn) < 2:
        return None
    return _finite(kendalltau(nn, np.arange(len(nn))).statistic)


def kendall_tau_wild_pair(u1: Array, u2: Array, partners: np.ndarray) -> tuple[int, int]:
    """Spec 3.4 (SPEC definition): concordant and discordant frame pairs ``(C, D)``.

    Over frame pairs ``t < t'`` of video 1 that both have a partner, with ``n = nn(t)``,
    ``n' = nn(t')``: concordant iff some partners ``p in A(t)``, ``q in A(t')`` satisfy
    ``(n' - n)(q - p) > 0``, or ``n' = n`` and ``q = p``; discordant otherwise.
    ``tau_W = (C - D) / (C + D)``.
    """
    nn = nearest_neighbours(u1, u2)                                  # (T1,)
    rows = np.flatnonzero(partners.any(axis=1))                      # alignable frames (m,)
    if len(rows) < 2:
        return 0, 0
    y = partners[rows]                                               # (m, T2)
    n = nn[rows]                                                     # (m,)
    cols = np.arange(partners.shape[1])
    lo = np.where(y, cols, partners.shape[1]).min(axis=1)            # min A(t) (m,)
    hi = np.where(y, cols, -1).max(axis=1)                           # max A(t) (m,)
    later = np.triu(np.ones((len(rows), len(rows)), dtype=bool), 1)  # t < t' (m, m)
    up = n[None, :] > n[:, None]                                     # n' > n
    down = n[None, :] < n[:, None]                                   # n' < n
    # Some q > p exists iff max A(t') > min A(t); some q < p iff min A(t') < max A(t).
    conc = (up & (hi[None, :] > lo[:, None])) | (down & (lo[None, :] < hi[:, None]))
    for value in np.unique(n):                                       # n' = n: shared partner
        g = np.flatnonzero(n == value)
        if len(g) > 1:
            yg = y[g].astype(np.float32)                             # (k, T2)
            conc[np.ix_(g, g)] |= (yg @ yg.T) > 0
    c = int((conc & later).sum())
    return c, int(later.sum()) - c


def enclosed_area_error_pair(u1: Array, u2: Array, partners: np.ndarray, *, wild: bool
                             ) -> float | None:
    """Spec 3.5: ``sum_{x in X_a} dist(nn(x), c(x)) / (|X_a| Z)``; None if ``|X_a| Z = 0``.

    ``X_a`` = frames of video 1 with a partner (background never has one), ``c(x)`` the partner
    nearest ``nn(x)`` (ties to the lower). Wild: ``dist`` counts the partner frames ``y`` of
    video 2 with ``min(a, b) <= y < max(a, b)``, ``Z`` = adjacent pairs of partner frames;
    otherwise ``dist = |a - b|`` and ``Z = T2``.
    """
    nn = nearest_neighbours(u1, u2)                                  # (T1,)
    rows = np.flatnonzero(partners.any(axis=1))                      # X_a
    t2 = partners.shape[1]
    in_set = partners.any(axis=0)                                    # Yset as a mask (T2,)
    z = int((in_set[:-1] & in_set[1:]).sum()) if wild else t2
    if len(rows) == 0 or z == 0:
        return None
    a = nn[rows]                                                     # (m,)
    gap = np.where(partners[rows], np.abs(np.arange(t2)[None, :] - a[:, None]), t2 + 1)
    b = gap.argmin(axis=1)                                           # c(x) (m,)
    if wild:
        below = np.concatenate([[0], np.cumsum(in_set)])             # below[k] = #{y < k}
        dist = below[np.maximum(a, b)] - below[np.minimum(a, b)]
    else:
        dist = np.abs(a - b)
    return float(dist.sum()) / (len(rows) * z)


# ----------------------------------------------------------------------------------------------
# Pairwise metrics over all ordered pairs of distinct videos of each task (P8)


def _pairwise(embs: Sequence[Array], anns: Sequence[VideoAnnotation],
              score: Callable[[int, int], tuple[float | None, str | None]]) -> dict[str, Any]:
    """Score every ordered pair ``(i, j)``, ``i != j``, of the same task; aggregate.

    ``score`` returns (value, None) or (None, reason); reasons are counted per task.
    """
    per_task: dict[str, Any] = {}
    all_values: list[float] = []
    for task, members in _by_task(anns).items():
        values: list[float] = []
        skipped: dict[str, int] = {}
        for i in members:
            for j in members:
                if i == j:
                    continue
                value, reason = score(i, j)
                if value is None:
                    skipped[reason or "undefined"] = skipped.get(reason or "undefined", 0) + 1
                else:
                    values.append(value)
        all_values += values
        per_task[task] = {"value": _mean(values), "videos": len(members),
                          "pairs": len(members) * (len(members) - 1), "pairs_scored": len(values),
                          "pairs_skipped": skipped}
    return {"mean_over_tasks": _mean([t["value"] for t in per_task.values()]),
            "mean_over_pairs": _mean(all_values),
            "pairs_scored": len(all_values),
            "pairs": sum(t["pairs"] for t in per_task.values()),
            "tasks_scored": sum(t["value"] is not None for t in per_task.values()),
            "per_task": per_task}


def kendall_tau(embs: Sequence[Array], anns: Sequence[VideoAnnotation]) -> dict[str, Any]:
    """Spec 3.3 (KT): mean over ordered pairs of `kendall_tau_pair`, per task.

    Pairs whose tau is undefined (constant neighbour sequence) are skipped and counted (P17).
    No background handling: KT is only meaningful for monotonic data (spec 3.3).
    """
    us = _check(embs, anns)

    def score(i: int, j: int) -> tuple[float | None, str | None]:
        tau = kendall_tau_pair(us[i], us[j])
        return tau, (None if tau is not None else "undefined_constant_neighbours")

    return _pairwise(us, anns, score)


def kendall_tau_wild(embs: Sequence[Array], anns: Sequence[VideoAnnotation]) -> dict[str, Any]:
    """Spec 3.4 (KTW, SPEC definition): per ordered pair ``(C - D) / (C + D)`` from
    `kendall_tau_wild_pair`; pairs with no shared action (P16) or ``C + D = 0`` are skipped and
    counted. Background frames have no partner, so they never enter a frame pair (P1, P18).
    """
    us = _check(embs, anns)

    def score(i: int, j: int) -> tuple[float | None, str | None]:
        partners = alignment_partners(anns[i], anns[j])
        if not partners.any():
            return None, "no_shared_action"
        c, d = kendall_tau_wild_pair(us[i], us[j], partners)
        if c + d == 0:
            return None, "no_alignable_frame_pair"
        return (c - d) / (c + d), None

    return _pairwise(us, anns, score)


def has_background(anns: Sequence[VideoAnnotation]) -> bool:
    """True when any video has a background frame (the EAE wild default, spec 3.5)."""
    return any(not ann.is_foreground.all() for ann in anns)


def enclosed_area_error(embs: Sequence[Array], anns: Sequence[VideoAnnotation], *,
                        wild: bool | None = None) -> dict[str, Any]:
    """Spec 3.5 (EAE, lower is better): mean over ordered pairs of `enclosed_area_error_pair`.

    ``wild`` is an explicit flag (P15); None turns it on when the given videos have background
    (the spec's default for datasets with background). Pairs with no shared action (P16) or an
    undefined value are skipped and counted.
    """
    us = _check(embs, anns)
    wild = has_background(anns) if wild is None else wild

    def score(i: int, j: int) -> tuple[float | None, str | None]:
        partners = alignment_partners(anns[i], anns[j])
        if not partners.any():
            return None, "no_shared_action"
        value = enclosed_area_error_pair(us[i], us[j], partners, wild=wild)
        return value, (None if value is not None else "zero_normaliser")

    out = _pairwise(us, anns, score)
    out["wild"] = wild
    return out


# ----------------------------------------------------------------------------------------------
# Phase classification (spec 3.1, corrected protocol: P13)


def _probe_subset(keep: Sequence[np.ndarray], fraction: float, rng: np.random.Generator
                  ) -> list[np.ndarray]:
    """Frame indices per training video: a random ``round(fraction * n)`` (>= 1) of its ``n``
    kept frames, so every training video contributes (stratified by video, spec 3.1)."""
    out = []
    for frames in keep:
        k = max(1, int(round(fraction * len(frames)))) if len(frames) else 0
        out.append(np.sort(rng.choice(frames, size=k, replace=False)) if k else frames)
    return out


def _phase_task(train_us: list[np.ndarray], train_anns: list[VideoAnnotation],
                test_us: list[np.ndarray], test_anns: list[VideoAnnotation],
                fractions: Sequence[float], seed: int, background: bool) -> dict[str, Any]:
    """One task, one variant (background included or excluded): accuracy per fraction."""
    def frames(anns: list[VideoAnnotation]) -> list[np.ndarray]:
        return [np.arange(a.num_frames) if background else np.flatnonzero(a.foreground_mask())
                for a in anns]

    train_keep, test_keep = frames(train_anns), frames(test_anns)
    train_lab = [np.asarray(a.frame_labels(), dtype=object) for a in train_anns]
    test_lab = [np.asarray(a.frame_labels(), dtype=object) for a in test_anns]
    x_test = (np.concatenate([u[k] for u, k in zip(test_us, test_keep)])
              if test_us else np.zeros((0, 1)))                                  # (N, D)
    y_test = (np.concatenate([lab[k] for lab, k in zip(test_lab, test_keep)])
              if test_us else np.zeros(0, dtype=object))                         # (N,)
    video_of = np.repeat(np.arange(len(test_us)), [len(k) for k in test_keep])   # (N,)
    seen = {x for lab, k in zip(train_lab, train_keep) for x in lab[k]}
    result: dict[str, Any] = {"accuracy": {}, "mean_over_videos": {}, "train_frames": {},
                              "test_frames": int(len(y_test)),
                              "test_videos_scored": sum(len(k) > 0 for k in test_keep),
                              "test_labels_unseen_in_train": sorted(set(y_test) - seen)}
    for p in fractions:
        key = f"{p:g}"
        # A fresh generator per fraction: results do not depend on task order (P30).
        rng = np.random.default_rng(seed)
        subset = _probe_subset(train_keep, p, rng)
        x = np.concatenate([u[k] for u, k in zip(train_us, subset)]) if subset else None
        y = np.concatenate([lab[k] for lab, k in zip(train_lab, subset)]) if subset else None
        result["train_frames"][key] = 0 if y is None else int(len(y))
        if y is None or len(set(y)) < 2 or len(y_test) == 0:
            # The reference also gives None for a single-class training subset (spec 3.1).
            result["accuracy"][key] = result["mean_over_videos"][key] = None
            continue
        scaler = StandardScaler().fit(x)
        svm = SVC(kernel="rbf", C=1.0, gamma="scale", decision_function_shape="ovo", tol=1e-3)
        svm.fit(scaler.transform(x), y)
        hit = svm.predict(scaler.transform(x_test)) == y_test                    # (N,)
        result["accuracy"][key] = float(hit.mean())
        result["mean_over_videos"][key] = _mean(
            [float(hit[video_of == v].mean()) for v in range(len(test_us)) if len(test_keep[v])])
    return result


def phase_classification(train_embs: Sequence[Array], train_anns: Sequence[VideoAnnotation],
                         test_embs: Sequence[Array], test_anns: Sequence[VideoAnnotation], *,
                         fractions: Sequence[float] = PC_FRACTIONS, seed: int = 0
                         ) -> dict[str, Any]:
    """Spec 3.1, SPEC protocol: per task, a scaler + RBF SVM fitted on a fraction of the
    TRAIN-split frames (``round(p n)`` random frames of each training video, local RNG from
    ``seed``), accuracy on ALL test-split frames (never on its own training frames: P13).

    Two variants: ``background_included`` (every frame, background labels are classes) and
    ``background_excluded`` (foreground frames only, for training and testing; P1). Frame labels
    come from the canonical segments. Test frames whose label no training frame has count as
    errors and are listed. None where the training subset has a single class.
    """
    for p in fractions:
        if not 0.0 < p <= 1.0:
            raise ValueError(f"phase classification fractions must be in (0, 1], got {p}")
    tr, te = _check(train_embs, train_anns), _check(test_embs, test_anns)
    train_groups, test_groups = _by_task(train_anns), _by_task(test_anns)
    per_task: dict[str, Any] = {}
    for task, test_idx in test_groups.items():
        train_idx = train_groups.get(task, [])
        entry: dict[str, Any] = {"train_videos": len(train_idx), "test_videos": len(test_idx)}
        for variant, bg in (("background_included", True), ("background_excluded", False)):
            entry[variant] = _phase_task([tr[i] for i in train_idx],
                                         [train_anns[i] for i in train_idx],
                                         [te[i] for i in test_idx],
                                         [test_anns[i] for i in test_idx], fractions, seed, bg)
        per_task[task] = entry
    out: dict[str, Any] = {"fractions": [float(p) for p in fractions], "seed": seed,
                           "classifier": PC_CLASSIFIER}
    for variant in ("background_included", "background_excluded"):
        summary = {}
        for p in fractions:
            key = f"{p:g}"
            # Mean over all scored test videos: each task's per-video mean weighted by its count.
            weighted = [(t[variant]["mean_over_videos"][key], t[variant]["test_videos_scored"])
                        for t in per_task.values()
                        if t[variant]["mean_over_videos"][key] is not None]
            n_videos = sum(n for _, n in weighted)
            summary[key] = {
                "mean_over_tasks": _mean([t[variant]["accuracy"][key]
                                          for t in per_task.values()]),
                "mean_over_videos": (_finite(sum(v * n for v, n in weighted) / n_videos)
                                     if n_videos else None),
            }
        out[variant] = summary
    out["per_task"] = per_task
    return out


# ----------------------------------------------------------------------------------------------
# Phase progression (spec 3.2, corrected protocol: P14)


def _r2(y: np.ndarray, pred: np.ndarray) -> float | None:
    ss_tot = float(((y - y.mean()) ** 2).sum()) if len(y) else 0.0
    if ss_tot == 0.0:
        return None
    return _finite(1.0 - float(((y - pred) ** 2).sum()) / ss_tot)


def phase_progression(train_embs: Sequence[Array], train_anns: Sequence[VideoAnnotation],
                      test_embs: Sequence[Array], test_anns: Sequence[VideoAnnotation]
                      ) -> dict[str, Any]:
    """Spec 3.2, SPEC protocol: per task, ordinary least squares (with intercept) from frame
    embeddings to video-level GT progress (`video_progress_gt`), fitted on every TRAIN-split
    frame, scored on test frames only (P14): R^2 pooled over the task's test frames, and the mean
    of per-video R^2 (the paper's "average over videos"); a video whose GT is constant has no R^2
    and is counted.
    """
    tr, te = _check(train_embs, train_anns), _check(test_embs, test_anns)
    train_groups = _by_task(train_anns)
    per_task: dict[str, Any] = {}
    all_video_r2: list[float] = []
    for task, test_idx in _by_task(test_anns).items():
        train_idx = train_groups.get(task, [])
        entry: dict[str, Any] = {"train_videos": len(train_idx), "test_videos": len(test_idx),
                                 "r2_pooled": None, "r2_mean_over_videos": None,
                                 "videos_scored": 0, "videos_constant_gt": 0}
        per_task[task] = entry
        if not train_idx:
            continue
        x = np.concatenate([tr[i] for i in train_idx])                           # (N, D)
        y = np.concatenate([video_progress_gt(train_anns[i]) for i in train_idx])  # (N,)
        reg = LinearRegression().fit(x, y)
        gts = [video_progress_gt(test_anns[i]) for i in test_idx]
        preds = [reg.predict(te[i]) for i in test_idx]
        entry["r2_pooled"] = _r2(np.concatenate(gts), np.concatenate(preds))
        video_r2 = [_r2(g, p) for g, p in zip(gts, preds)]
        scored = [v for v in video_r2 if v is not None]
        entry["r2_mean_over_videos"] = _mean(scored)
        entry["videos_scored"] = len(scored)
        entry["videos_constant_gt"] = len(video_r2) - len(scored)
        all_video_r2 += scored
    return {
        "r2_pooled": {"mean_over_tasks": _mean([t["r2_pooled"] for t in per_task.values()])},
        "r2_per_video": {"mean_over_tasks": _mean([t["r2_mean_over_videos"]
                                                   for t in per_task.values()]),
                         "mean_over_videos": _mean(all_video_r2),
                         "videos_scored": len(all_video_r2)},
        "per_task": per_task,
    }


# ----------------------------------------------------------------------------------------------
# The report


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
    "kendall_tau": "spec 3.3: every ordered pair of distinct test videos of a task; scipy tau-b "
                   "between the nearest-neighbour indices and the frame order, all frames "
                   "(background included); undefined pairs (constant neighbours) skipped and "
                   "counted; task value = mean over its scored pairs",
    "kendall_tau_wild": "spec 3.4 SPEC definition: every ordered pair of distinct test videos of "
                        "a task; frame pairs t < t' both with a ground-truth partner; concordant "
                        "iff some partners p of t, q of t' satisfy (nn(t')-nn(t))(q-p) > 0, or "
                        "nn(t') = nn(t) and q = p; tau = (C-D)/(C+D); pairs with no shared "
                        "action or no alignable frame pair skipped and counted",
    "enclosed_area_error": "spec 3.5: every ordered pair of distinct test videos of a task; for "
                           "each frame with a ground-truth partner, the distance from its nearest "
                           "neighbour to the closest partner, summed and divided by (frames x Z); "
                           "wild: distance and Z count partner frames of the other video (Z = "
                           "adjacent partner pairs), else |a-b| and Z = its length; lower is "
                           "better (the paper reports x100); pairs with no shared action skipped "
                           "and counted",
    "phase_classification": "spec 3.1 SPEC protocol: per task, StandardScaler + RBF SVC (C=1, "
                            "gamma='scale', one-vs-one) fitted on round(p*n) random frames of "
                            "every TRAIN-split video (p in fractions, fixed seed), accuracy on all "
                            "TEST-split frames; background_included treats background labels as "
                            "classes, background_excluded drops background frames from training "
                            "and test",
    "phase_progression": "spec 3.2 SPEC protocol: per task, least squares with intercept from "
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
    """Every alignment metric of spec 3.1-3.5 on ``test_split``, probes fitted on
    ``train_split``; JSON-serialisable (no NaN).

    Each video of both splits is embedded once (`embed_videos`). ``wild`` (EAE) defaults to on
    when the dataset has background frames (spec 3.5, P15). Top-level keys: ``dataset``,
    ``split``, ``train_split``, ``split_sha256``, ``counts``, ``metrics`` (``kendall_tau``,
    ``kendall_tau_wild``, ``enclosed_area_error``, ``phase_classification``,
    ``phase_progression``), ``protocol``, ``timing_s``.
    """
    t_start = time.perf_counter()
    if train_split == test_split:
        raise ValueError(f"train_split and test_split must differ (P13), both are {test_split!r}")
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
