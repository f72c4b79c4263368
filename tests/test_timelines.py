"""The EgoProceL-timeline synthetic data: the real timelines, read as the loader reads them, with
a deterministic appearance; the CLI writes and trains on it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from alignprog.cli import app
from alignprog.config import DataConfig, FpsConfig, SyntheticConfig
from alignprog.data import load_dataset
from alignprog.data.synthetic import generate
from alignprog.data.timelines import real_timelines

from helpers import SETS_TINY, TEST_DATA

runner = CliRunner()
EGO = SyntheticConfig(timelines="egoprocel", dim=16)


@pytest.fixture(scope="module")
def ego():
    return generate(EGO)


def test_every_non_cmu_task_and_video_is_used(ego):
    real = json.loads((TEST_DATA / "egoprocel.json").read_text())
    non_cmu = {t: len(r["handles"]) for t, r in real.items() if not t.endswith(".cmu")}
    assert {t: len(r["handles"]) for t, r in ego.annotations.items()} == non_cmu
    with_cmu = real_timelines(cmu=True)
    assert set(with_cmu) == set(real) and len(with_cmu) > len(non_cmu)


def test_the_segments_are_the_loaders_reading_of_the_real_file(ego, tmp_path: Path):
    """The real JSON with `--fps-preset egoprocel` and features of the timelines' lengths loads
    to the same canonical segments as the generated 1 fps annotation."""
    root = tmp_path / "real"
    (root / "features").mkdir(parents=True)
    real = json.loads((TEST_DATA / "egoprocel.json").read_text())
    (root / "dataset.json").write_text(json.dumps(
        {t: r for t, r in real.items() if not t.endswith(".cmu")}))
    for handle, n in ego.lengths.items():
        np.save(root / "features" / f"{handle}.npy", np.zeros((n, 1), np.float16))
    loaded = load_dataset(DataConfig(root=root, fps=FpsConfig(preset="egoprocel")))
    synth = load_dataset(DataConfig(synthetic=EGO))
    want = {v.handle: v.annotation for v in loaded.videos}
    assert len(want) == len(synth.videos) == 161
    for v in synth.videos:
        a, b = v.annotation, want[v.handle]
        assert (a.labels, a.starts, a.ends) == (b.labels, b.starts, b.ends), v.handle
    assert not synth.repairs.rows()


def test_real_procedural_statistics(ego):
    """Short actions, long background, repeats: EgoProceL's timelines at 1 fps."""
    ds = load_dataset(DataConfig(synthetic=EGO))
    fg_lengths, bg_share, repeats = [], [], 0
    for v in ds.videos:
        a = v.annotation
        fg = a.is_foreground
        fg_lengths += list(np.asarray(a.lengths)[fg])
        bg_share.append(1 - np.asarray(a.lengths)[fg].sum() / a.num_frames)
        labels = [lab for lab, f in zip(a.labels, fg) if f]
        repeats += len(labels) > len(set(labels))
    assert np.median(fg_lengths) <= 6 and np.median(bg_share) > 0.5
    assert repeats > len(ds.videos) // 2


def test_features_are_deterministic_and_seeded(ego):
    handle = next(iter(ego.lengths))
    a = ego.features(handle)
    assert a.shape == (ego.lengths[handle], 16) and a.dtype == np.float32 and (a >= 0).all()
    np.testing.assert_array_equal(a, generate(EGO).features(handle))
    other = generate(EGO.model_copy(update={"seed": 1})).features(handle)
    assert not np.allclose(a, other)


def test_progress_moves_the_features_within_an_action(ego):
    """Within long actions, early and late frames differ more than neighbouring frames do: the
    progress code is there (how hard it is to read is what benchmarks measure)."""
    ds = load_dataset(DataConfig(synthetic=EGO))
    gaps, steps = [], []
    for v in ds.videos[:40]:
        x = ego.latent(v.handle)[:, :32]
        a = v.annotation
        for s, e, f in zip(a.starts, a.ends, a.is_foreground):
            if f and e - s >= 9:
                gaps.append(np.linalg.norm(x[e] - x[s]))
                steps.append(np.linalg.norm(x[s + 1] - x[s]))
    assert len(gaps) > 10 and np.mean(gaps) > 1.2 * np.mean(steps)


def test_cli_writes_checks_and_trains_on_it(tmp_path: Path):
    out = tmp_path / "ego"
    res = runner.invoke(app, ["data", "synth", str(out), "--timelines", "egoprocel",
                              "--dim", "16"])
    assert res.exit_code == 0, res.output
    assert "161 videos" in res.output
    assert runner.invoke(app, ["data", "check", str(out)]).exit_code == 0
    res = runner.invoke(app, ["data", "synth", str(tmp_path / "f"), "--timelines", "egoprocel",
                              "--layout", "frames"])
    assert res.exit_code != 0 and "features layout only" in res.output
    res = runner.invoke(app, ["train", "--runs-dir", str(tmp_path / "runs"), "--name", "r",
                              "--steps", "1", *SETS_TINY, "--set",
                              "data.synthetic.timelines=egoprocel"])
    assert res.exit_code == 0, res.output
