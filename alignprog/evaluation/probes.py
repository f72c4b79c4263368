"""Probes on the embeddings: phase classification (an SVM per task) and phase progression
(least squares per task), each fitted on the train split and scored on the test split only.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from sklearn.linear_model import LinearRegression
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

from alignprog.data.annotations import VideoAnnotation
from alignprog.evaluation.pairwise import Array, _by_task, _check, _finite, _mean
from alignprog.evaluation.video_level import video_progress_gt

# Label fractions of the PC probe ("PC 0.1 / 0.5 / 1.0").
PC_FRACTIONS = (0.1, 0.5, 1.0)
# The probe is a standard scaler + SVM with an RBF kernel, C = 1, gamma 'scale', one-vs-one,
# tol 1e-3 (docs/evaluation.md#phase-classification).
PC_CLASSIFIER = "StandardScaler + SVC(kernel='rbf', C=1, gamma='scale', one-vs-one, tol=1e-3)"


# ----------------------------------------------------------------------------------------------
# Phase classification (docs/evaluation.md#phase-classification), corrected protocol: fitted on
# train, scored on test (docs/reference-bugs.md#phase-classification-on-training-frames)


def _probe_subset(keep: Sequence[np.ndarray], fraction: float, rng: np.random.Generator
                  ) -> list[np.ndarray]:
    """Frame indices per training video: a random ``round(fraction * n)`` (>= 1) of its ``n``
    kept frames, so every training video contributes (stratified by video,
    docs/evaluation.md#phase-classification)."""
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
        # A fresh generator per fraction: results do not depend on task order (no global RNG:
        # docs/reference-bugs.md#global-rng-reseeding).
        rng = np.random.default_rng(seed)
        subset = _probe_subset(train_keep, p, rng)
        x = np.concatenate([u[k] for u, k in zip(train_us, subset)]) if subset else None
        y = np.concatenate([lab[k] for lab, k in zip(train_lab, subset)]) if subset else None
        result["train_frames"][key] = 0 if y is None else int(len(y))
        if y is None or len(set(y)) < 2 or len(y_test) == 0:
            # The reference also gives None for a single-class training subset.
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
    """Phase classification, corrected protocol (docs/evaluation.md#phase-classification): per
    task, a scaler + RBF SVM fitted on a fraction of the TRAIN-split frames (``round(p n)``
    random frames of each training video, local RNG from ``seed``), accuracy on ALL test-split
    frames (never on its own training frames, as the reference does:
    docs/reference-bugs.md#phase-classification-on-training-frames).

    Two variants: ``background_included`` (every frame, background labels are classes) and
    ``background_excluded`` (foreground frames only, for training and testing; background is
    the full background set, docs/reference-bugs.md#background-label-mismatch). Frame labels
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
# Phase progression (docs/evaluation.md#phase-progression), corrected protocol: fitted on train,
# scored on test (docs/reference-bugs.md#phase-progression-on-training-frames)


def _r2(y: np.ndarray, pred: np.ndarray) -> float | None:
    ss_tot = float(((y - y.mean()) ** 2).sum()) if len(y) else 0.0
    if ss_tot == 0.0:
        return None
    return _finite(1.0 - float(((y - pred) ** 2).sum()) / ss_tot)


def phase_progression(train_embs: Sequence[Array], train_anns: Sequence[VideoAnnotation],
                      test_embs: Sequence[Array], test_anns: Sequence[VideoAnnotation]
                      ) -> dict[str, Any]:
    """Phase progression, corrected protocol (docs/evaluation.md#phase-progression): per task,
    ordinary least squares (with intercept) from frame embeddings to video-level GT progress
    (`video_progress_gt`), fitted on every TRAIN-split frame, scored on test frames only
    (docs/reference-bugs.md#phase-progression-on-training-frames): R^2 pooled over the task's
    test frames, and the mean of per-video R^2 (the paper's "average over videos"); a video
    whose GT is constant has no R^2 and is counted.
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
