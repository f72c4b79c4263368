"""Padded single-task batches (docs/data.md#batching).

Videos of different lengths become one zero-padded tensor with a boolean mask plus padded
per-segment tensors, so downstream code is batched tensor code. Every batch holds videos of one
task only: alignment pairs never mix tasks.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset
from torch.utils.data import Sampler

from alignprog.data.annotations import VideoAnnotation
from alignprog.data.dataset import Dataset


@dataclass
class Batch:
    features: torch.Tensor        # (B, T, *F) float32, zero on padded frames
    mask: torch.Tensor            # (B, T) bool, True on real frames
    lengths: torch.Tensor         # (B,) int64
    frame_labels: torch.Tensor    # (B, T) int64 index into Dataset.labels, -1 on padding
    foreground: torch.Tensor      # (B, T) bool, True on non-background real frames
    seg_start: torch.Tensor       # (B, K) int64 first frame of each segment (0 on padding)
    seg_end: torch.Tensor         # (B, K) int64 last frame, inclusive (-1 on padding)
    seg_label: torch.Tensor       # (B, K) int64 label index (-1 on padding)
    seg_foreground: torch.Tensor  # (B, K) bool
    seg_mask: torch.Tensor        # (B, K) bool, True on real segments
    annotations: tuple[VideoAnnotation, ...]
    task: str
    indices: tuple[int, ...]      # dataset video indices

    @property
    def size(self) -> int:
        return len(self.indices)

    def _map(self, fn) -> "Batch":
        return dataclasses.replace(self, **{
            f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        return self._map(lambda t: t.pin_memory())


class Collator:
    """Turns ``[(index, float32 array), ...]`` of one task into a `Batch` (picklable for
    workers). `pin`: in the main process the features are collated straight into page-locked
    memory, from which a GPU copy is asynchronous (workers leave it to the DataLoader's
    `pin_memory`: page-locked memory does not cross processes)."""

    def __init__(self, dataset: Dataset, *, pin: bool = False) -> None:
        self.dataset = dataset
        self.pin = pin
        self.label_index = {lab: i for i, lab in enumerate(dataset.labels)}

    def __call__(self, items: Sequence[tuple[int, np.ndarray]]) -> Batch:
        videos = [self.dataset.videos[i] for i, _ in items]
        tasks = {v.task for v in videos}
        if len(tasks) != 1:
            raise ValueError(f"a batch must hold one task, got {sorted(tasks)}")
        lengths = [len(a) for _, a in items]
        b, t_max = len(items), max(lengths)
        k_max = max(v.annotation.num_segments for v in videos)
        feat_shape = items[0][1].shape[1:]
        pin = self.pin and torch.utils.data.get_worker_info() is None
        features = torch.zeros((b, t_max, *feat_shape), dtype=torch.float32,
                               pin_memory=pin)                                 # (B, T, *F)
        mask = torch.zeros((b, t_max), dtype=torch.bool)                      # (B, T)
        frame_labels = torch.full((b, t_max), -1, dtype=torch.int64)          # (B, T)
        foreground = torch.zeros((b, t_max), dtype=torch.bool)                # (B, T)
        seg_start = torch.zeros((b, k_max), dtype=torch.int64)                # (B, K)
        seg_end = torch.full((b, k_max), -1, dtype=torch.int64)
        seg_label = torch.full((b, k_max), -1, dtype=torch.int64)
        seg_fg = torch.zeros((b, k_max), dtype=torch.bool)
        seg_mask = torch.zeros((b, k_max), dtype=torch.bool)
        for row, ((_, array), video) in enumerate(zip(items, videos)):
            ann = video.annotation
            n, k = lengths[row], ann.num_segments
            features[row, :n] = torch.from_numpy(array)
            mask[row, :n] = True
            labels = torch.tensor([self.label_index[lab] for lab in ann.labels])  # (K,)
            seg_len = torch.from_numpy(ann.lengths)                                 # (K,)
            fg = torch.from_numpy(ann.is_foreground)                                # (K,)
            frame_labels[row, :n] = labels.repeat_interleave(seg_len)
            foreground[row, :n] = fg.repeat_interleave(seg_len)
            seg_start[row, :k] = torch.tensor(ann.starts)
            seg_end[row, :k] = torch.tensor(ann.ends)
            seg_label[row, :k] = labels
            seg_fg[row, :k] = fg
            seg_mask[row, :k] = True
        return Batch(features, mask, torch.tensor(lengths), frame_labels, foreground, seg_start,
                     seg_end, seg_label, seg_fg, seg_mask, tuple(v.annotation for v in videos),
                     videos[0].task, tuple(i for i, _ in items))


class _Arrays(TorchDataset):
    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset.videos)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray]:
        return index, self.dataset.load(index)


class TaskBatchSampler(Sampler[list[int]]):
    """Batches of video indices, each from one task.

    Per epoch, each task's videos are shuffled (``shuffle``) and cut into batches of
    ``batch_size``; the batches of all tasks are then pooled and shuffled (the multi-task
    schedule of docs/data.md#batching). With ``drop_last`` an incomplete final batch is dropped,
    except that a task with fewer videos than ``batch_size`` (but at least two) still forms one
    smaller batch, so that small tasks are trained on; a task with a single video cannot form a
    pair and is listed in ``skipped_tasks``. Randomness comes from a local generator seeded by
    ``(seed, epoch)``: the same seed and epoch give the same batches (no global RNG:
    docs/reference-bugs.md#global-rng-reseeding).

    Several processes (``num_replicas`` > 1, this one ``rank``): every rank draws the same
    epoch's batches from the shared seed and takes every ``num_replicas``-th one from its
    ``rank``, so the shares are disjoint and each batch stays single-task. So that all ranks take
    the same number of steps (each step is a collective), the epoch's list is first padded to a
    multiple of ``num_replicas`` by repeating its first batches, as torch's DistributedSampler
    does: every video of the epoch is seen, and at most ``num_replicas - 1`` batches twice.
    """

    def __init__(self, groups: dict[str, list[int]], batch_size: int, *, shuffle: bool,
                 drop_last: bool, seed: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, num_replicas), got rank {rank} of "
                             f"{num_replicas}")
        self.groups = {task: list(idx) for task, idx in groups.items() if idx}
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.epoch = 0
        self.num_replicas = num_replicas
        self.rank = rank
        self.skipped_tasks = [t for t, idx in self.groups.items()
                              if drop_last and len(idx) < min(2, batch_size)]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _task_batches(self, idx: list[int]) -> list[list[int]]:
        bs = self.batch_size
        if self.drop_last:
            if len(idx) < bs:
                return [idx] if len(idx) >= min(2, bs) else []
            return [idx[i:i + bs] for i in range(0, len(idx) - bs + 1, bs)]
        return [idx[i:i + bs] for i in range(0, len(idx), bs)]

    def epoch_batches(self) -> list[list[int]]:
        """All of the epoch's batches, the same on every rank (before the split)."""
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        out = []
        for idx in self.groups.values():
            order = list(idx)
            if self.shuffle:
                rng.shuffle(order)
            out += self._task_batches(order)
        if self.shuffle:
            rng.shuffle(out)
        return out

    def batches(self) -> list[list[int]]:
        """This rank's batches of the epoch: all of them for a single process."""
        out = self.epoch_batches()
        if self.num_replicas == 1 or not out:
            return out
        padded = [out[i % len(out)] for i in range(len(self) * self.num_replicas)]
        return padded[self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches())

    def __len__(self) -> int:
        """This rank's number of batches (steps) per epoch."""
        total = sum(len(self._task_batches(idx)) for idx in self.groups.values())
        return -(-total // self.num_replicas)  # ceil: the padded share


def make_loader(dataset: Dataset, split: str | None, *, batch_size: int, shuffle: bool,
                drop_last: bool, seed: int = 0, tasks: Iterable[str] | None = None,
                num_workers: int = 0, pin_memory: bool = False, num_replicas: int = 1,
                rank: int = 0) -> DataLoader:
    """A DataLoader of single-task `Batch`es over one split (None: all videos).

    Training: ``shuffle=True, drop_last=True``. Evaluation: ``shuffle=False, drop_last=False``,
    which visits every video exactly once (docs/reference-bugs.md#dropped-or-unpaired-test-videos).
    ``tasks`` restricts to some tasks (single-task mode passes one). ``num_replicas``/``rank``:
    this process's share of the batches in a multi-process run (see `TaskBatchSampler`).
    """
    groups: dict[str, list[int]] = {}
    for i in dataset.indices(split, tasks):
        groups.setdefault(dataset.videos[i].task, []).append(i)
    sampler = TaskBatchSampler(groups, batch_size, shuffle=shuffle, drop_last=drop_last,
                               seed=seed, num_replicas=num_replicas, rank=rank)
    return DataLoader(_Arrays(dataset), batch_sampler=sampler,
                      collate_fn=Collator(dataset, pin=pin_memory),
                      num_workers=num_workers, pin_memory=pin_memory)


def make_loaders(dataset: Dataset, split: str | None, *, batch_size: int, multi_task: bool,
                 train: bool, seed: int = 0, num_workers: int = 0) -> dict[str, DataLoader]:
    """Loaders for the single-task and multi-task modes (docs/data.md#batching).

    Multi-task: ``{"all": loader}`` whose batches (each single-task) cover every task, shuffled
    together when training. Single-task: ``{task: loader}``, one per task, each task trained and
    evaluated on its own. ``train`` shuffles and drops incomplete batches; otherwise every video
    is visited once in dataset order.
    """
    kw = dict(batch_size=batch_size, shuffle=train, drop_last=train, seed=seed,
              num_workers=num_workers)
    if multi_task:
        return {"all": make_loader(dataset, split, **kw)}
    return {task: make_loader(dataset, split, tasks=[task], **kw) for task in dataset.tasks}
