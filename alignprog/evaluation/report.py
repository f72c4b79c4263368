"""The action-level progress report: the learnable head online, naive baselines, one dict.

Every number is action-level, online (a frame sees only its action's prefix) and
oracle-segmented (segment bounds and labels come from the annotation), so it is never comparable
with the paper's video-level OPE; those conventions are written into every report, beside the
split's name and hash and the counts of evaluated and skipped videos.

`evaluate_progress` embeds each evaluated video once (`embed.embed_videos`), predicts per frame
(`online.online_progress` for the head; `baselines` for the naive predictors, whose priors
come from the training split only), flattens the foreground frames once
(`metrics.action_frames`) and scores every predictor on the same frames
(`metrics.progress_metrics`). Videos without a foreground action are skipped and counted.

Two optional parts (``evaluate_progress(..., cumulative=True, video_level=True)``, which
`alignprog eval-progress` turns on; `train` leaves them off):

* the ``cumulative_l2`` predictors of the embeddings (`cumulative`): causal and clipped to
  [0, 1] (``cumulative_l2``), causal and raw (``cumulative_l2_raw``), and the non-causal,
  self-normalised diagnostic ``cumulative_l2_offline`` (the normaliser `train` uses);
* the video-level OGPE, the paper's OPE, over all frames (`video_level`).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import numpy as np
import torch

from alignprog.data.annotations import VideoAnnotation
from alignprog.data.dataset import Dataset
from alignprog.evaluation.baselines import (DurationPrior, constant_progress, duration_prior,
                                            duration_prior_progress, parse_baseline,
                                            random_progress)
from alignprog.evaluation.cumulative import (CUMULATIVE_CONVENTIONS, PathLengthPrior,
                                             cumulative_l2_progress)
from alignprog.evaluation.embed import embed_videos, embed_with_head_inputs
from alignprog.evaluation.metrics import _average_reports, action_frames, progress_metrics
from alignprog.evaluation.online import _dense_is_online, online_progress
from alignprog.evaluation.video_level import GeodesicNormaliser, video_level_report

CONVENTION = "action-level, online (prefix), oracle-segmented"
GROUND_TRUTH = ("(t - s + 1) / L on the frames of each foreground canonical segment [s, e] "
                "(L = e - s + 1); background frames excluded")


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
    counted and listed, never silently dropped: docs/reference-bugs.md#empty-action-videos);
    each is embedded once. The head (if ``model`` has one; ``model=None`` evaluates baselines
    only) predicts online (docs/evaluation.md#online-action-level-mae). ``frame_count`` takes its
    mean action lengths from ``train_split``, never test data
    (docs/reference-bugs.md#action-means-leak-test-data). The report holds the split name and
    hash, counts, the ground-truth conventions and the oracle segmentation
    (docs/reference-bugs.md#progress-ground-truth-conventions, #oracle-segmentation) and, under
    ``predictors``, the `progress_metrics` of each predictor.

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
    head_inputs: list[torch.Tensor] | None = None    # what the head reads, when there is one
    if use_embeddings and kept:
        t0 = time.perf_counter()
        kw = dict(device=device, batch_size=batch_size, autocast_dtype=autocast_dtype)
        if head is not None:
            embeddings, head_inputs = embed_with_head_inputs(model, dataset, kept, **kw)
        else:
            embeddings = embed_videos(model, dataset, kept, **kw)
        timing["embed_s"] = time.perf_counter() - t0
    train_embeddings: list[torch.Tensor] | None = None
    train_indices = dataset.indices(train_split)
    if model is not None and (cumulative or video_level):
        # Normalisers come from the training split only, never test data
        # (docs/reference-bugs.md#ogpe-normaliser-from-test-data, #action-means-leak-test-data);
        # when it is the evaluated split its videos are not embedded twice.
        t0 = time.perf_counter()
        reuse = dict(zip(kept, embeddings or [])) if split == train_split else {}
        todo = [i for i in train_indices if i not in reuse]
        fresh = dict(zip(todo, embed_videos(model, dataset, todo, device=device,
                                            batch_size=batch_size, autocast_dtype=autocast_dtype)
                         if todo else []))
        train_embeddings = [reuse[i] if i in reuse else fresh[i] for i in train_indices]
        timing["embed_train_s"] = time.perf_counter() - t0
    train_annotations = [dataset.videos[i].annotation for i in train_indices]

    if head is not None and head_inputs is not None:
        t0 = time.perf_counter()
        per_video["head"] = [online_progress(head, u, ann, chunk_elems=chunk_elems).double().numpy()
                             for u, ann in zip(head_inputs, annotations)]
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
            "clipped": False, "formula": formula + " (unclipped, as the reference reports it)",
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
