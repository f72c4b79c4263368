"""Bad datasets: train reports what data check reports and refuses what cannot train; no hang
on non-regular files, no allocation for absurd lengths. Each case is one clear line and a
non-zero exit, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from alignprog.cli import app
from alignprog.config import DataConfig
from alignprog.data import load_dataset
from alignprog.data.dataset import training_problems
from alignprog.errors import DataError

from helpers import TINY, tiny_annotations, write_root

VOCAB = {0: "background", 1: "a", 2: "b", 3: "c", 4: "d", 5: "e"}
TRAIN = ["--steps", "1", "--device", "cpu",
         *(a for k in ("model.conv_channels", "model.output_dim", "model.head_layers",
                       "model.attn_layers") for a in ("--set", f"{k}={json.dumps(TINY[k])}"))]
runner = CliRunner()


def cli(*args: str):
    result = runner.invoke(app, list(args))
    assert "Traceback" not in result.output
    return result


def scaled_root(tmp_path: Path, factor: int) -> Path:
    """The tiny root with every annotation bound multiplied by `factor` (annotations counted in
    source-video frames at `factor` x the feature rate) and features of the real length."""
    ann, lengths = tiny_annotations()
    for rec in ann.values():
        for key in ("hdl_start_times", "hdl_end_times"):
            rec[key] = [[t * factor for t in times] for times in rec[key]]
    return write_root(tmp_path / "scaled", ann, lengths, vocab=VOCAB)


def test_annotations_in_source_frames_are_refused_by_train_and_check(tmp_path):
    root = scaled_root(tmp_path, 30)
    with pytest.raises(DataError, match="--fps-preset egoprocel"):
        training_problems(load_dataset(DataConfig(root=root)), DataConfig(root=root))
    res = cli("train", "--dataset", str(root), "--runs-dir", str(tmp_path / "runs"), *TRAIN)
    assert res.exit_code == 1
    assert "end far from the end of their features" in res.output
    assert "data.max_repaired_share=1" in res.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    res = cli("data", "check", str(root))
    assert res.exit_code == 1 and "end far from the end of their features" in res.output


def test_an_explicit_setting_trains_anyway_and_reports_the_repairs(tmp_path):
    root = scaled_root(tmp_path, 2)   # the first half of every video keeps its actions
    res = cli("train", "--dataset", str(root), "--runs-dir", str(tmp_path / "runs"), *TRAIN,
              "--set", "data.max_repaired_share=1", "--set", "data.batch_size=1")
    assert res.exit_code == 0, res.output
    assert "warning:" in res.output and "dropped" in res.output


def test_a_few_repairs_are_warnings_only(tmp_path):
    ann, lengths = tiny_annotations()
    ann["cook"]["hdl_end_times"][0][-1] += 40    # one video's last segment ends far too late
    root = write_root(tmp_path / "r", ann, lengths, vocab=VOCAB)
    lines = training_problems(load_dataset(DataConfig(root=root)), DataConfig(root=root))
    assert any("annotated length differs" in line for line in lines)


def test_a_train_split_without_foreground_is_refused(tmp_path):
    ann, lengths = tiny_annotations()
    for rec in ann.values():
        rec["hdl_actions"] = [["0"] * len(labels) for labels in rec["hdl_actions"]]
    root = write_root(tmp_path / "bg", ann, lengths, vocab=VOCAB)
    with pytest.raises(DataError, match="has no foreground segment"):
        training_problems(load_dataset(DataConfig(root=root)), DataConfig(root=root))
    res = cli("train", "--dataset", str(root), "--runs-dir", str(tmp_path / "runs"), *TRAIN)
    assert res.exit_code == 1 and "has no foreground segment" in res.output
    res = cli("data", "check", str(root))
    assert res.exit_code == 1 and "has no foreground segment" in res.output


def test_videos_longer_than_max_frames_are_refused_from_the_header(tmp_path):
    ann, lengths = tiny_annotations()
    root = write_root(tmp_path / "r", ann, lengths, vocab=VOCAB)
    # a sparse file of 1e9 frames (16 GB that take no disk): refused before anything is read
    path = root / "features" / "cook_0.npy"
    header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 8), np.float16))
    header["shape"] = (10**9, 8)
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        fh.truncate(fh.tell() + 10**9 * 8 * 2)
    res = cli("data", "check", str(root))
    assert res.exit_code == 1 and "more than data.max_frames = 100000" in res.output
    res = cli("train", "--dataset", str(root), "--runs-dir", str(tmp_path / "runs"), *TRAIN)
    assert res.exit_code == 1 and "more than data.max_frames" in res.output
    with pytest.raises(DataError, match="more than data.max_frames = 20"):
        load_dataset(DataConfig(root=write_root(tmp_path / "s", ann, lengths), max_frames=20))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_as_feature_file_fails_at_once(tmp_path):
    ann, lengths = tiny_annotations()
    root = write_root(tmp_path / "r", ann, lengths, vocab=VOCAB)
    path = root / "features" / "cook_1.npy"
    path.unlink()
    os.mkfifo(path)
    # in a child process: a hang would otherwise hang the suite
    proc = subprocess.run([sys.executable, "-m", "alignprog", "data", "check", str(root)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "not a regular file" in proc.stderr and "Traceback" not in proc.stderr


def test_big_endian_arrays_load_as_their_native_values(tmp_path):
    ann, lengths = tiny_annotations()
    root = write_root(tmp_path / "r", ann, lengths, vocab=VOCAB)
    path = root / "features" / "cook_0.npy"
    native = np.load(path)
    np.save(path, native.astype(native.dtype.newbyteorder(">")))
    assert np.load(path).dtype.byteorder == ">"
    ds = load_dataset(DataConfig(root=root))
    got = ds.load(next(v.index for v in ds.videos if v.handle == "cook_0"))
    assert got.dtype == np.float32 and got.dtype.isnative
    np.testing.assert_array_equal(got, native)
    assert cli("data", "check", str(root)).exit_code == 0


@pytest.mark.parametrize("name", ["id2action.txt", "splits.json"])
def test_a_folder_named_like_a_dataset_file_is_an_error_not_skipped(tmp_path, name):
    ann, lengths = tiny_annotations()
    root = write_root(tmp_path / "r", ann, lengths)
    (root / name).mkdir()
    with pytest.raises(DataError, match="a folder, not a file"):
        load_dataset(DataConfig(root=root))
    res = cli("data", "check", str(root))
    assert res.exit_code == 1 and "a folder, not a file" in res.output


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
@pytest.mark.parametrize("name", ["id2action.txt", "splits.json", "dataset.json"])
def test_a_fifo_as_dataset_text_file_fails_at_once(tmp_path, name):
    ann, lengths = tiny_annotations()
    root = write_root(tmp_path / "r", ann, lengths, vocab=VOCAB)
    (root / name).unlink(missing_ok=True)
    os.mkfifo(root / name)
    proc = subprocess.run([sys.executable, "-m", "alignprog", "data", "check", str(root)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "not a regular file" in proc.stderr and "Traceback" not in proc.stderr
