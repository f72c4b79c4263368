"""The synthetic dataset: determinism, annotation invariants (docs/data.md#annotation-json,
#canonical-segments), the statistics targets of docs/data.md#synthetic-dataset, and that the
features carry a readable but noisy signal."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from alignprog.config import SyntheticConfig
from alignprog.data.synthetic import SyntheticDataset, generate
from alignprog.errors import DataError

# Small arrays wherever the full 2048 / 1024x14x14 sizes are not the point.
SMALL = dict(dim=48, frame_channels=3, frame_size=4)


@pytest.fixture(scope="module")
def default() -> SyntheticDataset:
    return generate(SyntheticConfig())


@pytest.fixture(scope="module")
def small() -> SyntheticDataset:
    return generate(SyntheticConfig(**SMALL))


def videos(ds: SyntheticDataset):
    """(task, handle, labels, canonical lengths) of every video; lengths as
    docs/data.md#canonical-segments."""
    for task, rec in ds.annotations.items():
        for h, labels, starts, ends in zip(rec["handles"], rec["hdl_actions"],
                                           rec["hdl_start_times"], rec["hdl_end_times"]):
            lengths = np.diff(starts + [ends[-1] + 1])  # (K,)
            yield task, h, labels, lengths


def position_and_action(ds: SyntheticDataset, handle: str, labels, lengths):
    """Per-frame relative position in its segment and label id, foreground frames only."""
    T = int(lengths.sum())
    seg = np.repeat(np.arange(len(lengths)), lengths)  # (T,)
    starts = np.cumsum(lengths) - lengths  # (K,)
    rel = (np.arange(T) - starts[seg]) / np.maximum(lengths[seg] - 1, 1)  # (T,)
    lab = np.array([int(a) for a in labels])[seg]  # (T,)
    fg = lab != 0
    return ds.features(handle)[fg], rel[fg], lab[fg]


@pytest.fixture(scope="module")
def halves(small):
    """Foreground (features, positions, labels) of even videos (train) and odd videos (test)."""
    parts = {0: [], 1: []}
    for i, (_, h, labels, lengths) in enumerate(videos(small)):
        parts[i % 2].append(position_and_action(small, h, labels, lengths))
    return [tuple(np.concatenate(p) for p in zip(*parts[k])) for k in (0, 1)]


# ---------------------------------------------------------------------------------------------
# Determinism


def test_same_config_gives_identical_data_in_any_order():
    cfg = SyntheticConfig(tasks=2, videos_per_task=4, **SMALL)
    a, b = generate(cfg), generate(cfg)
    assert a.annotations == b.annotations
    assert a.id2action == b.id2action and a.lengths == b.lengths
    handles = list(a.lengths)
    first = {h: a.features(h) for h in handles}
    second = {h: b.features(h) for h in reversed(handles)}
    again = {h: a.features(h) for h in handles[::2]}  # repeated calls on the same object
    for h in handles:
        np.testing.assert_array_equal(first[h], second[h])
    for h in again:
        np.testing.assert_array_equal(first[h], again[h])
    np.testing.assert_array_equal(a.frames(handles[-1]), b.frames(handles[-1]))


def test_different_seed_gives_different_data():
    a = generate(SyntheticConfig(tasks=2, videos_per_task=4, seed=0, **SMALL))
    b = generate(SyntheticConfig(tasks=2, videos_per_task=4, seed=1, **SMALL))
    assert a.annotations != b.annotations
    h = next(iter(a.lengths))
    fa, fb = a.features(h), b.features(h)
    assert fa.shape != fb.shape or not np.array_equal(fa, fb)


def test_fewer_tasks_or_videos_give_a_prefix_of_the_same_data():
    # Every draw is keyed by (seed, task, video), so growing the dataset does not reshuffle it.
    big = generate(SyntheticConfig(tasks=3, videos_per_task=5, **SMALL))
    little = generate(SyntheticConfig(tasks=1, videos_per_task=3, **SMALL))
    task = next(iter(little.annotations))
    for key, values in little.annotations[task].items():
        assert big.annotations[task][key][:3] == values
    for h in little.lengths:
        np.testing.assert_array_equal(big.features(h), little.features(h))


# ---------------------------------------------------------------------------------------------
# Structure


@pytest.mark.parametrize("seed", [0, 1, 7, -3])
def test_every_video_obeys_the_annotation_invariants(seed):
    ds = generate(SyntheticConfig(seed=seed))
    handles = [h for rec in ds.annotations.values() for h in rec["handles"]]
    assert len(handles) == len(set(handles)) == 80
    assert ds.id2action[0] == "background"
    assert len(set(ds.id2action.values())) == len(ds.id2action)
    for task, rec in ds.annotations.items():
        assert "/" not in task
        assert set(rec) == {"handles", "hdl_actions", "hdl_start_times", "hdl_end_times"}
        for h, labels, starts, ends in zip(rec["handles"], rec["hdl_actions"],
                                           rec["hdl_start_times"], rec["hdl_end_times"]):
            assert len(labels) == len(starts) == len(ends) >= 3
            assert all(type(x) is int for x in starts + ends)
            assert starts[0] == 0 and ends[-1] == ds.lengths[h] - 1
            assert starts[1:] == ends[:-1]  # shared boundaries (the JSON form)
            lengths = np.diff(starts + [ends[-1] + 1])  # canonical segments
            assert (lengths >= 1).all()
            assert labels[0] == labels[-1] == "0"
            assert all(int(a) in ds.id2action for a in labels)
            assert all(a != b for a, b in zip(labels, labels[1:]))  # never equal neighbours
            fg = np.array([a != "0" for a in labels])
            assert (lengths[fg] >= 2).all()


# ---------------------------------------------------------------------------------------------
# Statistics of the default dataset (EgoProceL's, scaled down: docs/data.md#synthetic-dataset)


def test_default_statistics_are_within_the_stated_bounds(default):
    bg = total = transitions = direct = 0
    durations: dict[str, list[int]] = {}
    for _, _, labels, lengths in videos(default):
        for a, n in zip(labels, lengths):
            if a == "0":
                bg += n
            else:
                durations.setdefault(a, []).append(int(n))
        total += lengths.sum()
        transitions += len(labels) - 1
        direct += sum(a != "0" and b != "0" for a, b in zip(labels, labels[1:]))
    assert 0.35 <= bg / total <= 0.65
    assert 0 < direct / transitions <= 0.1
    cv = {a: np.std(d) / np.mean(d) for a, d in durations.items() if len(d) >= 10}
    assert len(cv) >= 10
    assert min(cv.values()) >= 0.4, cv  # frame counts alone do not give progress
    assert np.median(list(cv.values())) >= 0.4


def test_every_task_has_repeats_and_order_variation(default):
    for task, rec in default.annotations.items():
        repeated = False
        first_orders = []
        for labels in rec["hdl_actions"]:
            fg = [a for a in labels if a != "0"]
            repeated |= len(fg) > len(set(fg))
            first_orders.append({a: fg.index(a) for a in fg})
        assert repeated, task
        inverted = any(
            (x[a] - x[b]) * (y[a] - y[b]) < 0
            for x, y in itertools.combinations(first_orders, 2)
            for a, b in itertools.combinations(x.keys() & y.keys(), 2)
        )
        assert inverted, task


# ---------------------------------------------------------------------------------------------
# Feature signal


def test_progress_inside_actions_is_linearly_decodable(halves):
    (x0, p0, _), (x1, p1, _) = halves
    a0 = np.c_[x0, np.ones(len(x0))]  # (N, D+1) with intercept
    w, *_ = np.linalg.lstsq(a0, p0, rcond=None)
    pred = np.c_[x1, np.ones(len(x1))] @ w  # (M,)
    probe, constant = np.mean((pred - p1) ** 2), np.mean((0.5 - p1) ** 2)
    assert probe < 0.75 * constant, (probe, constant)
    # ...but not trivially: noise and per-video nuisance are real.
    assert probe > 0.2 * constant, (probe, constant)


def test_actions_have_distinguishable_mean_features(halves):
    (x0, _, a0), (x1, _, a1) = halves
    actions = np.unique(a0)
    centroids = np.stack([x0[a0 == a].mean(axis=0) for a in actions])  # (A, D)
    dist = ((x1[:, None, :] - centroids[None]) ** 2).sum(axis=-1)  # (M, A)
    accuracy = np.mean(actions[dist.argmin(axis=1)] == a1)
    assert accuracy > 5.0 / len(actions), accuracy


# ---------------------------------------------------------------------------------------------
# Arrays


def test_shapes_and_dtypes(small):
    h = next(iter(small.lengths))
    T = small.lengths[h]
    f = small.features(h)
    assert f.shape == (T, 48) and f.dtype == np.float32
    assert np.isfinite(f).all() and (f >= 0).all() and f.std() > 0
    fr = small.frames(h)
    assert fr.shape == (T, 3, 4, 4) and fr.dtype == np.float32
    assert np.isfinite(fr).all() and fr.std() > 0


def test_default_config_arrays(default):
    h = min(default.lengths, key=default.lengths.get)  # the shortest video keeps frames cheap
    f = default.features(h)
    assert f.shape == (default.lengths[h], 2048) and f.dtype == np.float32
    assert np.isfinite(f).all()
    fr = default.frames(h)
    assert fr.shape == (default.lengths[h], 1024, 14, 14) and fr.dtype == np.float32


def test_unknown_handle_is_a_data_error(small):
    with pytest.raises(DataError, match="nope"):
        small.features("nope")
