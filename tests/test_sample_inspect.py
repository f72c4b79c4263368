"""`alignprog sample-inspect` and `sampling_report`: the report is what training's sampler draws."""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from alignprog.cli import app
from alignprog.config import Config
from alignprog.data import load_dataset, make_loader
from alignprog.evaluation.sampling_report import sampling_report
from alignprog.sampling import sample_segments

from helpers import stderr_of

runner = CliRunner()
PNG = b"\x89PNG\r\n\x1a\n"
STATS = ("videos", "draws", "targets", "short_draws", "videos_without_usable_action",
         "all_background_videos")


@pytest.fixture(scope="module")
def default_report() -> dict:
    return sampling_report(Config())


def test_report_equals_the_training_loop(tmp_path: Path):
    """Recompute the epoch with the real loader (features and all) and the sampler: same seed,
    same numbers, for the stratified and the uniform run."""
    seed = 5
    # Narrow features: the loader really renders them here; the annotations do not depend on dim.
    cfg = Config.model_validate({"data": {"synthetic": {"tasks": 3, "dim": 8},
                                          "batch_size": 3}})
    ds = load_dataset(cfg.data)
    rep = sampling_report(cfg, seed=seed, dataset=ds)
    lp = cfg.progress.learnable
    for mode, stratified in (("stratified", True), ("uniform", False)):
        g = torch.Generator().manual_seed(seed)
        gts, bins, stats = [], [], Counter()
        per_video, per_label, timeline = Counter(), Counter(), []
        loader = make_loader(ds, "train", batch_size=3, shuffle=True, drop_last=True, seed=seed)
        for batch in loader:
            s = sample_segments(batch.seg_start, batch.seg_end, batch.seg_foreground,
                                batch.seg_mask, samples_per_video=lp.samples_per_video,
                                frames_per_segment=lp.frames_per_segment,
                                min_segment_len=lp.min_segment_len, stratified=stratified,
                                generator=g)
            gts += s.gt.tolist()
            bins += s.bin.tolist()
            stats.update(s.stats)
            for row, index in enumerate(batch.indices):
                per_video[index] += int((s.video == row).sum())
                if ds.videos[index].handle == rep["timeline"]["handle"]:
                    timeline = [(int(a), int(t)) for a, t in zip(s.start[s.video == row],
                                                                  s.target[s.video == row])]
            per_label.update(ds.labels[k] for k in batch.seg_label[s.video, s.action].tolist())
        run = rep[mode]
        assert run["samples"] == len(gts) > 0
        assert [b["count"] for b in run["bins"]] == [bins.count(j) for j in range(3)]
        assert run["histogram"]["counts"] == np.histogram(gts, bins=10, range=(0, 1))[0].tolist()
        assert run["stats"] == {k: stats[k] for k in STATS}
        assert run["per_video"] == {"videos": len(per_video),
                                    "mean": pytest.approx(np.mean(list(per_video.values()))),
                                    "min": min(per_video.values()),
                                    "max": max(per_video.values())}
        assert {a["label"]: a["count"] for a in run["per_action"]} == dict(per_label)
        counts = [a["count"] for a in run["per_action"]]
        assert counts == sorted(counts, reverse=True)
        assert run["missing_targets"] == run["stats"]["draws"] * 5 - run["samples"]
        assert run["extra_targets"] == 0
        if stratified:
            assert [(x["start"], x["target"]) for x in rep["timeline"]["samples"]] == timeline
    assert rep["loader"]["videos_visited"] == len(per_video)
    assert rep["settings"] == {"split": "train", "seed": seed, "batch_size": 3,
                               "samples_per_video": 10, "frames_per_segment": 5,
                               "min_segment_len": 3, "weight_cap": 10.0, "weighted_loss": True,
                               "stratified_sampling": True}


def test_stratified_favours_early_and_weights_follow_the_bins(default_report: dict):
    st, un = default_report["stratified"], default_report["uniform"]
    early = [run["bins"][0] for run in (st, un)]
    assert early[0]["count"] > early[1]["count"] and early[0]["share"] > early[1]["share"]
    for run in (st, un):
        early, mid, late = run["bins"]
        # w = min(1/gt, 10): gt <= 0.33 gives w >= 1/0.33 = 3.03; gt > 0.67 gives w < 1.4925.
        assert 3.03 <= early["mean_weight"] <= 10
        assert 1 / 0.67 <= mid["mean_weight"] <= 1 / 0.33
        assert 1 <= late["mean_weight"] <= 1.5
        assert sum(b["weight_share"] for b in run["bins"]) == pytest.approx(1)
        assert sum(b["count"] for b in run["bins"]) == run["samples"]
        # The weighted loss tilts towards early samples: more weight share than sample share.
        assert early["weight_share"] > early["share"] and late["weight_share"] < late["share"]
        assert run["total_weight"] == pytest.approx(
            sum(b["mean_weight"] * b["count"] for b in run["bins"]))
    # 4 tasks x 15 train videos in batches of 2: 7 batches per task, one video left out each.
    assert default_report["loader"] | {"skipped_tasks": None} == {
        "videos_in_split": 60, "batches": 28, "videos_visited": 56, "skipped_tasks": None,
        "videos_skipped": 0, "videos_dropped_incomplete_batch": 4}
    assert st["stats"]["draws"] == 56 * 10 and st["per_video"]["max"] <= 50


def test_unweighted_loss_and_short_actions():
    cfg = Config.model_validate({"progress": {"learnable": {
        "weighted_loss": False, "min_segment_len": 8, "frames_per_segment": 2}}})
    rep = sampling_report(cfg, seed=2)
    assert all(b["mean_weight"] in (None, 1.0) for b in rep["stratified"]["bins"])
    assert rep["actions"]["shorter_than_min_segment_len"] > 0
    st, un = rep["stratified"], rep["uniform"]
    # Uniform: at most frames_per_segment = 2 targets per draw. Stratified: one per non-empty
    # progress bin (k = max(1, 2 // 3) = 1), so up to 3.
    assert un["extra_targets"] == 0 and st["extra_targets"] > 0
    for run in (st, un):
        assert run["samples"] == (2 * run["stats"]["draws"] - run["missing_targets"]
                                  + run["extra_targets"])
    result = runner.invoke(app, ["sample-inspect", "--seed", "2", "--set",
                                 "progress.learnable.min_segment_len=8", "--set",
                                 "progress.learnable.frames_per_segment=2"])
    assert result.exit_code == 0 and "targets beyond 2 per draw" in result.stdout
    gts = [s["gt"] for s in rep["timeline"]["samples"]]
    lengths = [s["end"] - s["start"] + 1 for s in rep["timeline"]["samples"]]
    # Every segment has at least min_segment_len frames.
    assert all(g * n >= 8 - 1e-4 for g, n in zip(gts, lengths))


def test_library_errors():
    with pytest.raises(Exception, match="split must be one of"):
        sampling_report(Config(), split="dev")
    with pytest.raises(Exception, match="no video 'nope'"):
        sampling_report(Config(), video="nope")


# ----------------------------------------------------------------------------------------------
# CLI


def test_cli_tables_and_json(default_report: dict):
    result = runner.invoke(app, ["sample-inspect"])
    assert result.exit_code == 0, result.output
    for text in ("progress bins", "early", "mid", "late", "histogram", "samples per video",
                 "samples per action", "rejected or lost", "timeline of synth_t0_v01", "draw 0"):
        assert text in result.stdout
    result = runner.invoke(app, ["sample-inspect", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == default_report


def test_cli_video_split_and_errors():
    result = runner.invoke(app, ["sample-inspect", "--json", "--split", "test", "--seed", "1",
                                 "--video", "synth_t0_v00"])
    assert result.exit_code == 0, result.output
    rep = json.loads(result.stdout)
    assert rep == sampling_report(Config(), split="test", seed=1, video="synth_t0_v00")
    assert rep["timeline"]["handle"] == "synth_t0_v00"

    for args, message in ((["--video", "nope"], "no video 'nope'"),
                          (["--video", "synth_t0_v00"], "is in the test split"),
                          (["--split", "dev"], "split must be one of"),
                          (["--set", "progress.learnable.weight_cap=0.5"], "weight_cap"),
                          (["--set", "progress.learnable.samples_per_vid=3"],
                           "unknown setting")):
        result = runner.invoke(app, ["sample-inspect", *args])
        assert result.exit_code != 0, args
        err = stderr_of(result).strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
        assert "Traceback" not in result.output and not isinstance(result.exception,
                                                                  (KeyError, ValueError))


def test_cli_plot(tmp_path: Path):
    out = tmp_path / "figs" / "sampling.png"
    result = runner.invoke(app, ["sample-inspect", "--plot", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == PNG and out.stat().st_size > 10_000
    assert [p.name for p in out.parent.iterdir()] == ["sampling.png"], "no temp file left"
    assert "figure written" in stderr_of(result)


def test_cli_plot_without_matplotlib(tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails
    out = tmp_path / "sampling.png"
    result = runner.invoke(app, ["sample-inspect", "--plot", str(out)])
    assert result.exit_code == 1
    assert "pip install 'alignprog[plot]'" in stderr_of(result)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_on_a_synth_root(tmp_path: Path):
    root = tmp_path / "synth"
    result = runner.invoke(app, ["data", "synth", str(root), "--tasks", "2",
                                 "--videos-per-task", "4", "--dim", "8"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["sample-inspect", str(root)])
    assert result.exit_code == 0, result.output
    assert "synth, train split" in result.stdout
    result = runner.invoke(app, ["sample-inspect", str(root), "--json"])
    assert result.exit_code == 0, result.output
    rep = json.loads(result.stdout)
    assert rep["dataset"] == "synth" and rep["stratified"]["samples"] > 0
    # 4 videos a task: 3 train, one batch of 2 each.
    assert rep["loader"]["videos_visited"] == rep["stratified"]["stats"]["videos"] == 4
    # val holds one video per task: no pair, both tasks skipped; --json keeps stdout pure JSON.
    result = runner.invoke(app, ["sample-inspect", str(root), "--split", "val", "--json"])
    assert result.exit_code == 0, result.output
    rep = json.loads(result.stdout)
    assert rep["loader"]["videos_skipped"] == 2 and rep["timeline"] is None
    assert "no samples drawn" in stderr_of(result)
