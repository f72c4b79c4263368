"""What the progress head's segment sampler feeds training, for one epoch (``sample-inspect``).

The samples are drawn exactly as training draws them (docs/algorithms.md#segment-sampling): one
epoch of ``make_loader(dataset, split, batch_size, shuffle=True, drop_last=True, seed)`` and, per
batch, `sample_segments` with one ``torch.Generator().manual_seed(seed)`` for the whole epoch.
The same epoch is drawn a second time with stratification off (a fresh generator, same seed) to
compare the two modes. Only the batches' segment tensors are built: the loader's batch sampler
gives the index lists and the loader's own `Collator` turns them into tensors from zero-width
feature arrays, so no feature file is read and the report is fast on a large dataset.

Weights are those of the weighted L1 loss (docs/algorithms.md#weighted-l1): w = min(1 / gt,
weight_cap), or 1 when
``progress.learnable.weighted_loss`` is off. The result is plain JSON-serialisable data;
`alignprog.plots.sampling_figure` draws it.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterator

import numpy as np
import torch

from alignprog.config import Config
from alignprog.data import Dataset, load_dataset, make_loader
from alignprog.data.batching import Batch, Collator, TaskBatchSampler
from alignprog.data.splits import SPLIT_NAMES
from alignprog.errors import ConfigError, DataError
from alignprog.sampling import BIN_EDGES, BIN_NAMES, SegmentSamples, sample_segments

HIST_BINS = 10  # histogram of ground-truth progress over [0, 1]
STAT_KEYS = ("videos", "draws", "targets", "short_draws", "videos_without_usable_action",
             "all_background_videos")


def _epoch_batches(dataset: Dataset, split: str, *, batch_size: int, seed: int
                   ) -> tuple[list[Batch], TaskBatchSampler]:
    """The training loader's batches of one epoch, without their features."""
    loader = make_loader(dataset, split, batch_size=batch_size, shuffle=True, drop_last=True,
                         seed=seed)
    sampler: TaskBatchSampler = loader.batch_sampler
    collate = Collator(dataset)
    # The loader's own collate on (T, 0) arrays: the segment tensors are exactly the training
    # ones, and nothing is read from disk.
    batches = [collate([(i, np.zeros((dataset.videos[i].num_frames, 0), np.float32))
                        for i in indices]) for indices in sampler]
    return batches, sampler


def _draw(batches: list[Batch], cfg: Config, *, stratified: bool, seed: int
          ) -> Iterator[SegmentSamples]:
    lp = cfg.progress.learnable
    g = torch.Generator().manual_seed(seed)  # one generator for the epoch, as training
    for batch in batches:
        yield sample_segments(batch.seg_start, batch.seg_end, batch.seg_foreground,
                              batch.seg_mask, samples_per_video=lp.samples_per_video,
                              frames_per_segment=lp.frames_per_segment,
                              min_segment_len=lp.min_segment_len, stratified=stratified,
                              generator=g)


def _weights(gt: np.ndarray, cfg: Config) -> np.ndarray:
    """Weighted-L1 weights min(1/gt, cap) (gt > 0 always: gt >= min_segment_len / L); 1 if
    unweighted."""
    lp = cfg.progress.learnable
    if not lp.weighted_loss:
        return np.ones_like(gt)
    return np.minimum(1.0 / np.maximum(gt, 1.0 / lp.weight_cap), lp.weight_cap)


def _run(batches: list[Batch], dataset: Dataset, cfg: Config, *, stratified: bool, seed: int
         ) -> tuple[dict[str, Any], list[tuple[SegmentSamples, Batch]]]:
    """Counts of one sampled epoch, and the raw samples (for the timeline)."""
    labels = dataset.labels
    vocab = dataset.vocabulary or {}
    gts, bins = [], []
    per_video: dict[int, int] = {}
    per_label: Counter[int] = Counter()
    stats: Counter[str] = Counter()
    missing = extra = 0
    n, spv = cfg.progress.learnable.frames_per_segment, cfg.progress.learnable.samples_per_video
    raw = []
    for batch, samples in zip(batches, _draw(batches, cfg, stratified=stratified, seed=seed)):
        raw.append((samples, batch))
        gts.append(samples.gt.double().numpy())
        bins.append(samples.bin.numpy())
        counts = torch.bincount(samples.video, minlength=batch.size)                # (B,)
        for row, index in enumerate(batch.indices):
            per_video[index] = per_video.get(index, 0) + int(counts[row])
        per_label.update(batch.seg_label[samples.video, samples.action].tolist())
        stats.update({k: int(samples.stats.get(k, 0)) for k in STAT_KEYS})
        # Targets per draw against frames_per_segment: short actions give fewer; stratified
        # mode with frames_per_segment < 3 gives one per non-empty bin, i.e. more.
        per_draw = torch.bincount(samples.video * spv + samples.draw,
                                  minlength=batch.size * spv)                     # (B*S,)
        per_draw = per_draw[per_draw > 0]                                           # (D',)
        missing += int((n - per_draw).clamp(min=0).sum())
        missing += n * (int(samples.stats.get("draws", 0)) - len(per_draw))
        extra += int((per_draw - n).clamp(min=0).sum())
    gt = np.concatenate(gts) if gts else np.zeros(0)                                # (Q,)
    bin_ = np.concatenate(bins) if bins else np.zeros(0, dtype=np.int64)            # (Q,)
    w = _weights(gt, cfg)                                                           # (Q,)
    total, total_w = len(gt), float(w.sum())
    edges = (0.0, *BIN_EDGES, 1.0)
    by_bin = []
    for j, name in enumerate(BIN_NAMES):
        sel = bin_ == j
        count = int(sel.sum())
        by_bin.append({
            "bin": name, "low": edges[j], "high": edges[j + 1], "count": count,
            "share": count / total if total else 0.0,
            "mean_weight": float(w[sel].mean()) if count else None,
            "weight_share": float(w[sel].sum()) / total_w if total_w else 0.0,
        })
    hist, hist_edges = np.histogram(gt, bins=HIST_BINS, range=(0.0, 1.0))
    counts = list(per_video.values())
    actions = [{"label": labels[k], "name": vocab.get(labels[k], labels[k]), "count": c}
               for k, c in per_label.items()]
    actions.sort(key=lambda a: (-a["count"], a["label"]))
    return {
        "stratified": stratified,
        "samples": total,
        "total_weight": total_w,
        "mean_gt": float(gt.mean()) if total else None,
        "bins": by_bin,
        "histogram": {"edges": [float(e) for e in hist_edges], "counts": hist.tolist()},
        "per_video": {"videos": len(counts),
                      "mean": float(np.mean(counts)) if counts else 0.0,
                      "min": min(counts, default=0), "max": max(counts, default=0)},
        "per_action": actions,
        "stats": {k: stats[k] for k in STAT_KEYS},
        "missing_targets": missing,
        "extra_targets": extra,
    }, raw


def _timeline(dataset: Dataset, index: int, raw: list[tuple[SegmentSamples, Batch]]
              ) -> dict[str, Any]:
    video = dataset.videos[index]
    ann = video.annotation
    vocab = dataset.vocabulary or {}
    fg = ann.is_foreground
    samples = []
    for s, batch in raw:
        if index not in batch.indices:
            continue
        row = batch.indices.index(index)
        for q in (s.video == row).nonzero().squeeze(1).tolist():
            samples.append({"draw": int(s.draw[q]), "action": int(s.action[q]),
                            "start": int(s.start[q]), "end": int(s.start[q] + s.length[q] - 1),
                            "target": int(s.target[q]), "gt": float(s.gt[q]),
                            "bin": BIN_NAMES[int(s.bin[q])]})
        break  # a video is in at most one batch of an epoch
    return {
        "handle": video.handle, "task": video.task, "num_frames": video.num_frames,
        "visited": any(index in b.indices for _, b in raw),
        "segments": [{"start": int(a), "end": int(b), "label": lab,
                      "name": vocab.get(lab, lab), "foreground": bool(f)}
                     for a, b, lab, f in zip(ann.starts, ann.ends, ann.labels, fg)],
        "samples": samples,
    }


def sampling_report(cfg: Config, *, split: str = "train", seed: int = 0,
                    video: str | None = None, dataset: Dataset | None = None) -> dict[str, Any]:
    """One epoch of the progress sampler on ``split``, stratified and uniform, as plain data.

    ``video`` picks the handle of the timeline (default: the first video of the split, in dataset
    order, that got samples). ``dataset`` is the already loaded ``load_dataset(cfg.data)``, if
    any. Raises `ConfigError` for an unknown split or handle, `DataError` for an empty split.
    """
    if split not in SPLIT_NAMES:
        raise ConfigError(f"split must be one of {', '.join(SPLIT_NAMES)}, got '{split}'")
    ds = dataset if dataset is not None else load_dataset(cfg.data)
    lp = cfg.progress.learnable
    in_split = ds.indices(split)
    if not in_split:
        raise DataError(f"the {split} split has no videos", file=ds.annotation_file)
    target_index = None
    if video is not None:
        where = {v.handle: v for v in ds.videos}
        if video not in where:
            close = [v.handle for v in ds.videos if v.split == split][:3]
            raise ConfigError(f"no video '{video}' in the dataset (e.g. {', '.join(close)})")
        if where[video].split != split:
            raise ConfigError(f"video '{video}' is in the {where[video].split} split, not "
                              f"{split} (pass that split)")
        target_index = where[video].index

    batches, sampler = _epoch_batches(ds, split, batch_size=cfg.data.batch_size, seed=seed)
    stratified, raw = _run(batches, ds, cfg, stratified=True, seed=seed)
    uniform, _ = _run(batches, ds, cfg, stratified=False, seed=seed)

    visited = [i for b in batches for i in b.indices]
    skipped = [i for i in in_split if ds.videos[i].task in set(sampler.skipped_tasks)]
    anns = [ds.videos[i].annotation for i in visited]
    lengths = np.concatenate([a.lengths[a.is_foreground] for a in anns] or [np.zeros(0, int)])
    if target_index is None:
        got = {b.indices[row] for s, b in raw for row in s.video.unique().tolist()}
        target_index = next((i for i in in_split if i in got), None)
    return {
        "dataset": ds.name,
        "settings": {
            "split": split, "seed": seed, "batch_size": cfg.data.batch_size,
            "samples_per_video": lp.samples_per_video,
            "frames_per_segment": lp.frames_per_segment,
            "min_segment_len": lp.min_segment_len, "weight_cap": lp.weight_cap,
            "weighted_loss": lp.weighted_loss, "stratified_sampling": lp.stratified_sampling,
        },
        "loader": {
            "videos_in_split": len(in_split), "batches": len(batches),
            "videos_visited": len(visited),
            "skipped_tasks": list(sampler.skipped_tasks), "videos_skipped": len(skipped),
            # drop_last: a task's last incomplete batch is not trained on this epoch.
            "videos_dropped_incomplete_batch": len(in_split) - len(visited) - len(skipped),
        },
        "actions": {
            "foreground": int(len(lengths)),
            "shorter_than_min_segment_len": int((lengths < lp.min_segment_len).sum()),
        },
        "stratified": stratified,
        "uniform": uniform,
        "timeline": _timeline(ds, target_index, raw) if target_index is not None else None,
        "warnings": list(ds.warnings),
    }
