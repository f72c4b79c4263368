"""Splits: the fork's counting rule, determinism, the reference procedure, files
(docs/data.md#splits)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from alignprog.data.splits import (SPLIT_NAMES, ordered_split, random_split, read_splits,
                                   split_counts, write_splits)
from alignprog.errors import DataError

from helpers import TEST_DATA

# The fork's data_splits.json per-task train/val/test counts (docs/data.md#splits).
F_COUNTS = {16: (12, 2, 2), 31: (23, 3, 5), 29: (22, 3, 4), 19: (14, 2, 3), 15: (11, 2, 2),
            17: (13, 2, 2), 10: (8, 1, 1), 34: (26, 3, 5), 33: (25, 3, 5), 12: (9, 1, 2),
            13: (10, 1, 2), 14: (10, 1, 3), 6: (4, 1, 1), 32: (24, 3, 5), 2: (1, 0, 1),
            1: (1, 0, 0)}


@pytest.mark.parametrize("n,expected", sorted(F_COUNTS.items()))
def test_counts_match_reference_split(n, expected):
    assert split_counts(n, 0.75, 0.10, 0.15) == expected


def test_counts_always_sum_to_n():
    for n in range(0, 60):
        for fr in [(0.75, 0.1, 0.15), (0.6, 0.2, 0.2), (0.8, 0.0, 0.2), (1.0, 0.0, 0.0),
                   (0.5, 0.5, 0.0)]:
            counts = split_counts(n, *fr)
            assert sum(counts) == n and min(counts) >= 0
            if fr[2] == 0:
                assert counts[2] == 0


def egoprocel_handles() -> dict[str, list[str]]:
    data = json.loads((TEST_DATA / "egoprocel.json").read_text())
    return {task: rec["handles"] for task, rec in data.items()}


def test_egoprocel_totals_match_reference():
    splits = random_split(egoprocel_handles(), train=0.75, val=0.10, test=0.15, seed=42)
    counts = splits.to_json()["counts"]
    assert counts == {"total": 325, "train": 245, "val": 32, "test": 48}


def test_random_split_equals_reference_procedure():
    """The fork: random.seed(42) once, then per task in JSON order copy + random.shuffle."""
    handles = egoprocel_handles()
    state = random.getstate()
    try:
        random.seed(42)
        expected = {}
        for task, hs in handles.items():
            shuffled = list(hs)
            random.shuffle(shuffled)
            n_tr, n_va, _ = F_COUNTS[len(hs)]
            expected[task] = (shuffled[:n_tr], shuffled[n_tr:n_tr + n_va], shuffled[n_tr + n_va:])
    finally:
        random.setstate(state)
    outer = random.random()
    random.seed(1234)
    before = random.random()
    random.seed(1234)
    splits = random_split(handles, train=0.75, val=0.10, test=0.15, seed=42)
    assert random.random() == before, "random_split must not touch the global RNG"
    del outer
    for task, (tr, va, te) in expected.items():
        got = splits.assignment[task]
        assert list(got["train"]) == tr and list(got["val"]) == va and list(got["test"]) == te


def test_split_is_a_partition_and_deterministic():
    handles = egoprocel_handles()
    a = random_split(handles, train=0.75, val=0.10, test=0.15, seed=3)
    b = random_split(handles, train=0.75, val=0.10, test=0.15, seed=3)
    c = random_split(handles, train=0.75, val=0.10, test=0.15, seed=4)
    assert a.sha256() == b.sha256() and a.sha256() != c.sha256()
    for task, hs in handles.items():
        parts = [set(a.assignment[task][s]) for s in SPLIT_NAMES]
        assert set().union(*parts) == set(hs)
        assert sum(map(len, parts)) == len(hs)


def test_ordered_split_is_the_original_rule():
    splits = ordered_split({"t": [f"h{i}" for i in range(20)]}, train=0.65)
    assert list(splits.assignment["t"]["train"]) == [f"h{i}" for i in range(13)]
    assert list(splits.assignment["t"]["test"]) == [f"h{i}" for i in range(13, 20)]
    assert splits.assignment["t"]["val"] == ()


def test_file_round_trip(tmp_path: Path):
    handles = {"a": ["a1", "a2", "a3", "a4"], "b": ["b1", "b2"]}
    splits = random_split(handles, train=0.5, val=0.25, test=0.25, seed=0)
    write_splits(splits, tmp_path / "s.json")
    data = json.loads((tmp_path / "s.json").read_text())
    assert set(data) >= {"description", "ratios", "seed", "counts", "category_counts", "splits",
                         "sha256"}
    assert data["category_counts"]["a"] == {"train": 2, "val": 1, "test": 1, "total": 4}
    again, warnings = read_splits(tmp_path / "s.json", handles)
    assert again.sha256() == splits.sha256() == data["sha256"]
    assert warnings == []


def test_read_splits_checks_against_dataset(tmp_path: Path):
    f = tmp_path / "s.json"
    handles = {"a": ["a1", "a2", "a3"]}
    f.write_text(json.dumps({"splits": {"a": {"train": ["a1"], "val": [], "test": ["a2"]}}}))
    splits, warnings = read_splits(f, handles)
    assert splits.split_of() == {"a1": "train", "a2": "test"}
    assert len(warnings) == 1 and "1 video(s)" in warnings[0] and "'a3'" in warnings[0]
    f.write_text(json.dumps({"splits": {"a": {"train": ["a1"], "test": ["a1"]}}}))
    with pytest.raises(DataError, match="handle 'a1': handle is in both 'train' and 'test'"):
        read_splits(f, handles)
    f.write_text(json.dumps({"splits": {"a": {"train": ["zz"]}}}))
    with pytest.raises(DataError, match="handle 'zz': handle is not a video of this task"):
        read_splits(f, handles)
    f.write_text("{not json")
    with pytest.raises(DataError, match="unreadable JSON"):
        read_splits(f, handles)
