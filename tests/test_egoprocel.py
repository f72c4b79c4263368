"""The real EgoProceL annotation file with generated feature files (docs/data.md: dataset root,
annotation JSON, EgoProceL conventions and statistics)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from alignprog.config import DataConfig, FpsConfig
from alignprog.data import load_dataset
from alignprog.data import annotations as A
from alignprog.data.dataset import DatasetErrors

from helpers import TEST_DATA

EGO_JSON = TEST_DATA / "egoprocel.json"
CMU = ["Sandwich.cmu", "Salad.cmu", "Eggs.cmu", "Brownie.cmu", "Pizza.cmu"]
NON_CMU = ["*.egtea", "tent", "meccano", "pc_*"]
FPS = {"egtea": 24, "cmu": 30, "tent": 60, "meccano": 12, "pc_": 12}


def _fps(task: str) -> int:
    return next(v for k, v in FPS.items() if k in task)


def _write_features(root: Path, lengths: dict[str, int]) -> Path:
    (root / "features").mkdir(parents=True)
    for handle, n in lengths.items():
        np.save(root / "features" / f"{handle}.npy", np.full((n, 4), 0.5, dtype=np.float16))
    return root


@pytest.fixture(scope="module")
def ego():
    data = json.loads(EGO_JSON.read_text())
    # Lists paired by position, as the lenient loader pairs them (the CMU quirk).
    return {t: list(zip(r["handles"], r["hdl_actions"], r["hdl_start_times"], r["hdl_end_times"]))
            for t, r in data.items()}


@pytest.fixture(scope="module")
def identity_root(tmp_path_factory, ego) -> Path:
    """Features whose length is the annotation's last end + 1 (annotation frames = features)."""
    lengths = {h: e[-1] + 1 for videos in ego.values() for h, _, _, e in videos}
    return _write_features(tmp_path_factory.mktemp("ego"), lengths)


def test_strict_mode_rejects_the_cmu_tasks(identity_root: Path):
    with pytest.raises(DatasetErrors) as info:
        load_dataset(DataConfig(root=identity_root, annotations=EGO_JSON), collect=True)
    errors = info.value.errors
    assert sorted(e.task for e in errors) == sorted(CMU)
    sandwich = next(e for e in errors if e.task == "Sandwich.cmu")
    assert "unequal list lengths (handles 31, hdl_actions 174, hdl_start_times 174, " \
           "hdl_end_times 174)" in str(sandwich)
    assert "--lenient" in str(sandwich)


def test_non_cmu_tasks_load_strictly(identity_root: Path, ego):
    ds = load_dataset(DataConfig(root=identity_root, annotations=EGO_JSON, tasks=NON_CMU))
    assert len(ds.videos) == 86 + 29 + 17 + 14 + 15
    assert not ds.repairs and not ds.warnings
    assert ds.vocabulary is not None and ds.vocabulary["0"] == "background"  # found beside the JSON
    # Background fraction of every video against a plain float64 loop over the raw lists:
    # segment k owns frames start_k .. start_{k+1}-1 (the later segment takes the shared frame).
    raw = {h: (a, s, e) for t in ego for h, a, s, e in ego[t]}
    for video in ds.videos:
        labels, starts, ends = raw[video.handle]
        bg = 0.0
        for k, lab in enumerate(labels):
            stop = starts[k + 1] - 1 if k + 1 < len(labels) else ends[-1]
            if lab == "0":
                bg += float(stop - starts[k] + 1)
        assert video.annotation.background_fraction == pytest.approx(bg / (ends[-1] + 1),
                                                                     abs=1e-12)
    summary = ds.summary()
    # Background is the majority of EGTEA time (mean per-video fraction .68-.85;
    # docs/data.md#egoprocel-statistics).
    egtea = [r for r in summary["tasks"] if r["task"].endswith(".egtea")]
    assert all(0.6 < r["background_fraction"] < 0.9 for r in egtea)
    assert summary["total"]["videos"] == 161


def test_lenient_mode_pairs_by_position_with_a_warning_per_task(identity_root: Path):
    ds = load_dataset(DataConfig(root=identity_root, annotations=EGO_JSON, strict=False))
    assert len(ds.videos) == 325
    cmu_warnings = [w for w in ds.warnings if "lenient" in w]
    assert len(cmu_warnings) == 5
    assert any("task 'Sandwich.cmu'" in w and "handles 31" in w and "hdl_actions 174" in w
               and "paired the first 31" in w for w in cmu_warnings)
    counts = ds.summary()["total"]
    assert counts["train"] + counts["val"] + counts["test"] == 325
    assert (counts["train"], counts["val"], counts["test"]) == (245, 32, 48)


def test_egoprocel_fps_preset(tmp_path: Path, ego):
    """Source frames -> 1 fps features: floor(t / fps); short segments collapse and are dropped."""
    lengths = {h: math.floor(e[-1] / _fps(t)) + 1 for t, videos in ego.items()
               if "cmu" not in t for h, _, _, e in videos}
    root = _write_features(tmp_path / "ego1fps", lengths)
    shutil.copy(TEST_DATA / "egoprocel-id2action.txt", root / "id2action.txt")
    cfg = DataConfig(root=root, annotations=EGO_JSON, tasks=NON_CMU,
                     fps=FpsConfig(preset="egoprocel"))
    ds = load_dataset(cfg)
    assert set(ds.repairs.counts) == {A.EMPTY_DROPPED}
    fg = [n for v in ds.videos for n in v.annotation.lengths[v.annotation.is_foreground]]
    # At 1 fps most foreground segments are short; a few collapse entirely
    # (docs/data.md#egoprocel-statistics).
    assert 0.4 < np.mean(np.array(fg) <= 5) < 0.8
    for v in ds.videos:
        ann = v.annotation
        assert ann.starts[0] == 0 and ann.ends[-1] == v.num_frames - 1
        assert all(b == a + 1 for a, b in zip(ann.ends[:-1], ann.starts[1:]))
    # One hand-checked video: OP01-R03-BaconAndEggs, 24 fps source.
    video = next(v for v in ds.videos if v.handle == "OP01-R03-BaconAndEggs")
    _, labels, starts, ends = next(x for x in ego["BaconAndEggs.egtea"]
                                   if x[0] == "OP01-R03-BaconAndEggs")
    mapped = [s // 24 for s in starts]
    keep = [k for k in range(len(starts))
            if (mapped[k + 1] - 1 if k + 1 < len(starts) else ends[-1] // 24) >= mapped[k]]
    assert video.annotation.starts == tuple(mapped[k] for k in keep)
    assert video.annotation.labels == tuple(labels[k] for k in keep)


def test_length_mismatch_is_warned(tmp_path: Path, ego):
    """Features 10 frames shorter than the annotation: repaired, counted and warned."""
    lengths = {h: e[-1] + 1 - (10 if i == 0 else 0) for i, (h, _, _, e) in
               enumerate(ego["tent"])}
    root = _write_features(tmp_path / "tent", lengths)
    ds = load_dataset(DataConfig(root=root, annotations=EGO_JSON, tasks=["tent"]))
    assert ds.repairs.counts == {A.FINAL_SHORTENED: 1, A.LENGTH_MISMATCH: 1}
    assert any("off by 10" in w for w in ds.warnings)
