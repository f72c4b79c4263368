"""`alignprog data synth` and `alignprog data check` through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from alignprog.cli import app
from alignprog.config import DataConfig
from alignprog.data import load_dataset

runner = CliRunner()
SMALL = ["--tasks", "2", "--videos-per-task", "4", "--dim", "16", "--seed", "3"]


def test_synth_writes_a_root_that_check_and_the_loader_read(tmp_path: Path):
    out = tmp_path / "synth"
    result = runner.invoke(app, ["data", "synth", str(out), *SMALL])
    assert result.exit_code == 0, result.output
    assert "wrote 8 videos" in result.output
    assert {p.name for p in out.iterdir()} == {".alignprog-dataset", "dataset.json",
                                                "id2action.txt", "splits.json", "features"}
    assert len(list((out / "features").glob("*.npy"))) == 8
    assert not list(tmp_path.glob(".synth*")), "no temporary folder may be left behind"

    result = runner.invoke(app, ["data", "check", str(out), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["total"]["videos"] == 8 and summary["shapes"] == {"features": [16]}
    assert summary["repairs"] == [] and summary["problems"] == []

    # The root on disk equals the in-memory synthetic dataset of the same config.
    on_disk = load_dataset(DataConfig(root=out))
    in_memory = load_dataset(DataConfig.model_validate(
        {"synthetic": {"tasks": 2, "videos_per_task": 4, "dim": 16, "seed": 3}}))
    assert [v.annotation for v in on_disk.videos] == [v.annotation for v in in_memory.videos]
    assert on_disk.splits.sha256() == in_memory.splits.sha256()
    for i in range(len(on_disk.videos)):
        np.testing.assert_array_equal(on_disk.load(i), in_memory.load(i))


def test_synth_refuses_to_overwrite(tmp_path: Path):
    out = tmp_path / "synth"
    assert runner.invoke(app, ["data", "synth", str(out), *SMALL]).exit_code == 0
    first = (out / "dataset.json").read_text()
    result = runner.invoke(app, ["data", "synth", str(out), *SMALL[:-1], "4"])
    assert result.exit_code == 1
    assert "output exists and is not empty" in result.output and "--overwrite" in result.output
    assert (out / "dataset.json").read_text() == first
    result = runner.invoke(app, ["data", "synth", str(out), *SMALL[:-1], "4", "--overwrite"])
    assert result.exit_code == 0, result.output
    assert (out / "dataset.json").read_text() != first


def test_synth_frames_layout(tmp_path: Path):
    out = tmp_path / "frames"
    result = runner.invoke(app, ["data", "synth", str(out), "--tasks", "1", "--videos-per-task",
                                 "2", "--layout", "both", "--dim", "8", "--frame-channels", "4",
                                 "--frame-size", "3"])
    assert result.exit_code == 0, result.output
    handle = json.loads((out / "dataset.json").read_text())
    handle = next(iter(handle.values()))["handles"][0]
    frames = np.load(out / "frames" / f"{handle}.npy")
    features = np.load(out / "features" / f"{handle}.npy")
    assert frames.shape[1:] == (4, 3, 3) and frames.dtype == np.float32
    assert features.shape == (len(frames), 8)
    ds = load_dataset(DataConfig(root=out, layout="frames"), all_layouts=True)
    assert ds.layouts == ["features", "frames"] and ds.load(0).shape[1:] == (4, 3, 3)


def test_check_a_frames_only_root_with_its_layout(tmp_path: Path):
    out = tmp_path / "frames"
    result = runner.invoke(app, ["data", "synth", str(out), "--tasks", "1", "--videos-per-task",
                                 "2", "--layout", "frames", "--frame-channels", "4",
                                 "--frame-size", "2"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["data", "check", str(out)])
    assert result.exit_code != 0 and "no 'features/' folder" in result.output
    result = runner.invoke(app, ["data", "check", str(out), "--set", "data.layout=frames"])
    assert result.exit_code == 0, result.output


def test_check_default_is_the_synthetic_dataset(tmp_path: Path):
    result = runner.invoke(app, ["data", "check", "--json", "--no-scan"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["name"] == "synthetic"
    assert summary["total"]["videos"] == 80
    assert (summary["total"]["train"], summary["total"]["val"], summary["total"]["test"]) == \
        (60, 8, 12)
    result = runner.invoke(app, ["data", "check", "--no-scan"])
    assert result.exit_code == 0
    assert "synthetic" in result.stdout and "total" in result.stdout


def test_check_writes_the_split_used(tiny_root: Path, tmp_path: Path):
    out = tmp_path / "split.json"
    result = runner.invoke(app, ["data", "check", str(tiny_root), "--write-split", str(out),
                                 "--set", "data.split.seed=9"])
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())
    ds = load_dataset(DataConfig.model_validate({"root": str(tiny_root), "split": {"seed": 9}}))
    assert written["sha256"] == ds.splits.sha256() and written["seed"] == 9
    # Reading it back as an explicit split file gives the same split.
    again = load_dataset(DataConfig(root=tiny_root, split={"file": out}))
    assert again.splits.sha256() == written["sha256"]


def test_config_file_and_flags(tiny_root: Path, tmp_path: Path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  root: {tiny_root}\n  tasks: [cook]\n")
    result = runner.invoke(app, ["data", "check", "--config", str(cfg), "--json"])
    assert result.exit_code == 0, result.output
    assert [r["task"] for r in json.loads(result.stdout)["tasks"]] == ["cook"]
    result = runner.invoke(app, ["data", "check", "--config", str(cfg), "--task", "build",
                                 "--json"])
    assert [r["task"] for r in json.loads(result.stdout)["tasks"]] == ["build"]


def test_help_has_examples_and_module_entry_point():
    for cmd in (["data", "check", "--help"], ["data", "synth", "--help"]):
        result = runner.invoke(app, cmd)
        assert result.exit_code == 0 and "Example" in result.output
    proc = subprocess.run([sys.executable, "-m", "alignprog", "--version"], capture_output=True,
                          text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("alignprog ")


def test_check_tables_are_not_truncated_when_piped_narrow(tmp_path: Path):
    """Piped output (CliRunner) with COLUMNS=40: long task and video names stay whole."""
    from helpers import tiny_annotations, write_root

    ann, lengths = tiny_annotations()
    long = {"cook": "assemble_the_kitchen_cabinet_drawers", "build": "build_a_long_bookshelf"}
    renamed, new_lengths = {}, {}
    for task, rec in ann.items():
        handles = [f"{long[task]}_video_{h}" for h in rec["handles"]]
        renamed[long[task]] = rec | {"handles": handles}
        new_lengths |= {new: lengths[old] for new, old in zip(handles, rec["handles"])}
    short = f"{long['cook']}_video_cook_0"
    new_lengths[short] -= 3                     # a length repair, listed with the video's name
    root = write_root(tmp_path / "long", renamed, new_lengths,
                      vocab={0: "background", 1: "a", 2: "b", 3: "c", 4: "d", 5: "e"})
    result = runner.invoke(app, ["data", "check", str(root)], env={"COLUMNS": "40"})
    assert result.exit_code == 0, result.output
    out = result.stdout
    for name in (*long.values(), f"{long['cook']}/{short}", "28/37/43", "fg seg len (med)"):
        assert name in out, name
    assert "…" not in out
