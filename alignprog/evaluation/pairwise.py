"""Pairwise alignment metrics: Kendall's tau (standard and in the wild) and the enclosed area
error, from nearest neighbours between every ordered pair of distinct videos of a task.

Also the shared machinery of the alignment metrics: the embeddings' checks, per-task grouping,
nearest neighbours and the ground-truth alignment of two annotated videos (`alignment_partners`).

One deliberate deviation from the reference's index formula
(docs/evaluation.md#ground-truth-alignment): on canonical segments
(non-overlapping, ``e_k + 1 = s_{k+1}``) every frame of a shared action is alignable, and frame
``s + r`` of an action of ``n`` frames is paired with frame ``s' + round(r (n' - 1) / (n - 1))``
of the other video's action of ``n'`` frames (a one-frame action pairs with ``s'``). The reference
skipped frame ``e`` because its inclusive JSON bounds shared ``e`` with the next segment; the
canonical form has no shared frame, and with this mapping a video aligned to itself has the
identity as its ground truth.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np
import torch
from scipy.spatial.distance import cdist
from scipy.stats import kendalltau

from alignprog.data.annotations import VideoAnnotation

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
    """``nn(i) = argmin_j ||u1_i - u2_j||`` (T1,), Euclidean, ties to the lowest j
    (docs/evaluation.md#alignment-metrics)."""
    return np.argmin(cdist(_np(u1), _np(u2)), axis=1)


def alignment_partners(a1: VideoAnnotation, a2: VideoAnnotation) -> np.ndarray:
    """Ground-truth alignment ``Y`` (T1, T2) bool: ``Y[i, j]`` iff j is a valid partner of i.

    See docs/evaluation.md#ground-truth-alignment; unlike the reference, only foreground
    actions are matched (background frames have no partner; the reference matches '0'
    background as an action: docs/reference-bugs.md#background-label-mismatch); every pair of
    segments with the same label is matched, so a repeated action gives several partner runs.
    Frame ``s + r`` of an action of n frames pairs with frame
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
# Per-pair scores (KT, KTW, EAE; docs/evaluation.md#alignment-metrics): each returns a float
# or None, and why it is None


def kendall_tau_pair(u1: Array, u2: Array) -> float | None:
    """Kendall tau (docs/evaluation.md#kendall-tau): tau-b between ``(nn(0), ..., nn(T1 - 1))``
    and ``(0, ..., T1 - 1)``.

    None (NaN in the reference) when the neighbour sequence is constant or T1 < 2.
    """
    nn = nearest_neighbours(u1, u2)
    if len(nn) < 2:
        return None
    return _finite(kendalltau(nn, np.arange(len(nn))).statistic)


def kendall_tau_wild_pair(u1: Array, u2: Array, partners: np.ndarray) -> tuple[int, int]:
    """Kendall tau in the wild, alignprog's corrected definition
    (docs/evaluation.md#kendall-tau-in-the-wild): concordant and discordant frame pairs
    ``(C, D)``.

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
    """EAE (docs/evaluation.md#enclosed-area-error):
    ``sum_{x in X_a} dist(nn(x), c(x)) / (|X_a| Z)``; None if ``|X_a| Z = 0``.

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
# Pairwise metrics over all ordered pairs of distinct videos of each task (the reference pairs
# videos only inside mini-batches: docs/reference-bugs.md#dropped-or-unpaired-test-videos)


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
    """KT (docs/evaluation.md#kendall-tau): mean over ordered pairs of `kendall_tau_pair`, per
    task.

    Pairs whose tau is undefined (constant neighbour sequence) are skipped and counted, not
    averaged as NaN (docs/reference-bugs.md#kendall-tau-nan). No background handling: KT is
    only meaningful for monotonic data.
    """
    us = _check(embs, anns)

    def score(i: int, j: int) -> tuple[float | None, str | None]:
        tau = kendall_tau_pair(us[i], us[j])
        return tau, (None if tau is not None else "undefined_constant_neighbours")

    return _pairwise(us, anns, score)


def kendall_tau_wild(embs: Sequence[Array], anns: Sequence[VideoAnnotation]) -> dict[str, Any]:
    """KTW, alignprog's corrected definition (docs/evaluation.md#kendall-tau-in-the-wild,
    docs/reference-bugs.md#kendall-tau-wild-definition): per ordered pair ``(C - D) / (C + D)``
    from `kendall_tau_wild_pair`; pairs with no shared action
    (docs/reference-bugs.md#no-shared-labels-nan-alignment) or ``C + D = 0`` are skipped and
    counted. Background frames have no partner, so they never enter a frame pair.
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
    """True when any video has a background frame (the EAE wild default,
    docs/evaluation.md#enclosed-area-error)."""
    return any(not ann.is_foreground.all() for ann in anns)


def enclosed_area_error(embs: Sequence[Array], anns: Sequence[VideoAnnotation], *,
                        wild: bool | None = None) -> dict[str, Any]:
    """EAE (lower is better; docs/evaluation.md#enclosed-area-error): mean over ordered pairs of
    `enclosed_area_error_pair`.

    ``wild`` is an explicit flag, not keyed on the dataset name
    (docs/reference-bugs.md#eae-wild-mode-by-dataset-name); None turns it on when the given
    videos have background (the default for datasets with background). Pairs with no shared
    action (docs/reference-bugs.md#no-shared-labels-nan-alignment) or an undefined value are
    skipped and counted.
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
