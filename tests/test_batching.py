"""Padded single-task batches, masks, segment tensors and the batch schedule."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from alignprog.config import DataConfig, SyntheticConfig
from alignprog.data import TaskBatchSampler, load_dataset, make_loader


def test_padded_batch_matches_the_videos(tiny_root: Path):
    ds = load_dataset(DataConfig(root=tiny_root))
    loader = make_loader(ds, None, batch_size=3, shuffle=False, drop_last=False)
    batches = list(loader)
    assert [b.task for b in batches] == ["cook", "build"]
    for batch in batches:
        b, t = batch.mask.shape
        assert batch.features.shape == (b, t, 8) and batch.features.dtype == torch.float32
        assert batch.lengths.tolist() == [ds.videos[i].num_frames for i in batch.indices]
        assert t == max(batch.lengths.tolist())
        for row, i in enumerate(batch.indices):
            n = ds.videos[i].num_frames
            ann = ds.videos[i].annotation
            assert batch.mask[row].tolist() == [True] * n + [False] * (t - n)
            np.testing.assert_array_equal(batch.features[row, :n].numpy(), ds.load(i))
            assert not batch.features[row, n:].any()
            labels = [ds.labels[j] for j in batch.frame_labels[row, :n].tolist()]
            assert labels == ann.frame_labels()
            assert (batch.frame_labels[row, n:] == -1).all()
            assert (batch.foreground[row].tolist()
                    == ann.foreground_mask().tolist() + [False] * (t - n))
            k = ann.num_segments
            assert batch.seg_start[row, :k].tolist() == list(ann.starts)
            assert batch.seg_end[row, :k].tolist() == list(ann.ends)
            assert batch.seg_foreground[row, :k].tolist() == ann.is_foreground.tolist()
            assert batch.seg_mask[row].sum() == k and not batch.seg_mask[row, k:].any()
            assert batch.annotations[row] is ann


def test_batch_to_device_keeps_everything():
    ds = load_dataset(DataConfig(synthetic=SyntheticConfig(tasks=2, videos_per_task=4, dim=16)))
    batch = next(iter(make_loader(ds, "train", batch_size=2, shuffle=True, drop_last=True)))
    moved = batch.to("cpu")
    assert torch.equal(moved.features, batch.features) and moved.task == batch.task
    assert moved.indices == batch.indices


def test_eval_loader_visits_every_video_once():
    ds = load_dataset(DataConfig(synthetic=SyntheticConfig(tasks=3, videos_per_task=7, dim=16)))
    for split in ("train", "val", "test", None):
        loader = make_loader(ds, split, batch_size=2, shuffle=False, drop_last=False)
        seen = [i for b in loader for i in b.indices]
        assert sorted(seen) == ds.indices(split)
        for b in loader:
            assert {ds.videos[i].task for i in b.indices} == {b.task}


def test_train_schedule_single_task_batches_deterministic():
    groups = {"a": list(range(0, 9)), "b": list(range(9, 14)), "c": [14, 15, 16]}
    s1 = TaskBatchSampler(groups, 4, shuffle=True, drop_last=True, seed=5)
    s2 = TaskBatchSampler(groups, 4, shuffle=True, drop_last=True, seed=5)
    first = list(s1)
    assert first == list(s2)
    task_of = {i: t for t, idx in groups.items() for i in idx}
    for batch in first:
        assert len({task_of[i] for i in batch}) == 1
    # 9 -> 2 full batches, 5 -> 1, 3 (fewer than batch_size) -> one batch of 3
    assert sorted(len(b) for b in first) == [3, 4, 4, 4]
    assert len(s1) == 4
    s1.set_epoch(1)
    assert list(s1) != first
    s2.set_epoch(1)
    assert list(s1) == list(s2)
    # every batch has distinct videos
    assert all(len(set(b)) == len(b) for b in first)


def test_task_with_one_video_cannot_form_a_pair():
    s = TaskBatchSampler({"a": [0, 1, 2], "b": [3]}, 2, shuffle=False, drop_last=True)
    assert s.skipped_tasks == ["b"]
    assert list(s) == [[0, 1]]
    s = TaskBatchSampler({"a": [0, 1, 2], "b": [3]}, 2, shuffle=False, drop_last=False)
    assert list(s) == [[0, 1], [2], [3]]


def test_multi_task_epoch_mixes_tasks_and_single_task_mode_filters():
    ds = load_dataset(DataConfig(synthetic=SyntheticConfig(tasks=3, videos_per_task=8, dim=16)))
    loader = make_loader(ds, "train", batch_size=2, shuffle=True, drop_last=True, seed=0)
    tasks = [ds.videos[idx[0]].task for idx in loader.batch_sampler]
    assert Counter(tasks) == {t: 3 for t in ds.tasks}       # 6 train videos per task -> 3 pairs
    assert tasks != sorted(tasks, key=ds.tasks.index)         # interleaved, not task by task
    one = make_loader(ds, "train", batch_size=2, shuffle=True, drop_last=True, tasks=[ds.tasks[1]])
    assert {ds.videos[i].task for idx in one.batch_sampler for i in idx} == {ds.tasks[1]}


def test_nan_in_features_is_reported_at_load(tiny_root: Path):
    path = tiny_root / "features" / "cook_1.npy"
    arr = np.load(path)
    arr[3, 2] = np.nan
    np.save(path, arr)
    ds = load_dataset(DataConfig(root=tiny_root))
    from alignprog.errors import DataError
    with pytest.raises(DataError, match=r"cook_1.npy: task 'cook', handle 'cook_1': contains "
                                        r"NaN/Inf values \(first at frame 3\)"):
        list(make_loader(ds, None, batch_size=3, shuffle=False, drop_last=False))


def test_float16_arrays_are_read_lazily_as_float32(tmp_path: Path):
    from helpers import tiny_annotations, write_root
    ann, lengths = tiny_annotations()
    root = write_root(tmp_path / "r", ann, lengths, dtype=np.float16)
    ds = load_dataset(DataConfig(root=root))
    src = ds.videos[0].arrays["features"].load()
    assert isinstance(src, np.memmap) and src.dtype == np.float16
    assert ds.load(0).dtype == np.float32


def test_make_loaders_modes():
    from alignprog.data import make_loaders
    ds = load_dataset(DataConfig(synthetic=SyntheticConfig(tasks=3, videos_per_task=5, dim=8)))
    multi = make_loaders(ds, "test", batch_size=2, multi_task=True, train=False)
    assert list(multi) == ["all"]
    assert sorted(i for b in multi["all"] for i in b.indices) == ds.indices("test")
    single = make_loaders(ds, "train", batch_size=2, multi_task=False, train=True)
    assert list(single) == ds.tasks
    for task, loader in single.items():
        assert {b.task for b in loader} == {task}
