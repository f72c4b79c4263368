"""Damaged checkpoints, tampered exports and hostile inputs: one-line errors, never tracebacks
(issue "Reliability: no tracebacks, no silent nonsense")."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from alignprog.cli import app
from alignprog.export import export_run
from alignprog.training import RunDir

from helpers import stderr_of, tiny_run

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("no_torch_load")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run trained 2 steps and its export."""
    root = tmp_path_factory.mktemp("fuzz")
    path, _, _ = tiny_run(root, 2)
    return path, export_run(path, checkpoint="last", out_dir=root / "ex")


def assert_one_line(args: list[str], message: str) -> None:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    err = [line for line in stderr_of(result).strip().splitlines()
           if line.startswith("error: ")]
    assert len(err) == 1 and message in err[0], stderr_of(result)


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return RunDir.open(dst).latest_checkpoint()


def edit_tensors(file: Path, fn) -> None:
    with safe_open(file, framework="pt") as fh:
        meta = fh.metadata()
    data = load_file(file)
    fn(data)
    save_file(data, file, metadata=meta)


def edit_config(src: Path, dst: Path, fn) -> Path:
    with safe_open(src, framework="pt") as fh:
        meta = dict(fh.metadata())
    cfg = json.loads(meta["config"])
    fn(cfg)
    meta["config"] = json.dumps(cfg)
    save_file(load_file(src), dst, metadata=meta)
    return dst


def video(tmp_path: Path, frames: int = 5) -> Path:
    path = tmp_path / "v.npy"
    np.save(path, np.ones((frames, 16), dtype=np.float32))
    return path


def test_nan_and_huge_checkpoint_weights_are_refused(run, tmp_path: Path):
    run_dir, _ = run
    for name, value, phrase in (("nan", float("nan"), "NaN/Inf"),
                                ("huge", 3e38, "absurd magnitudes")):
        ckpt = copy_run(run_dir, tmp_path / name)

        def poison(t, value=value):
            t["encoder.attention.0.weight"][0, 0] = value
        edit_tensors(ckpt / "model.safetensors", poison)
        assert_one_line(["export", tmp_path / name, "--out", tmp_path / f"{name}-ex"],
                        phrase)
        assert_one_line(["export", tmp_path / name, "--out", tmp_path / f"{name}-ex"],
                        "encoder.attention.0.weight")
        assert not (tmp_path / f"{name}-ex").exists()
        assert_one_line(["eval-progress", tmp_path / name, "--device", "cpu"], phrase)


def test_huge_export_weights_are_refused_by_predict(run, tmp_path: Path):
    _, export = run
    bad = tmp_path / "huge.safetensors"
    shutil.copy(export, bad)

    def poison(t):
        t["encoder.attention.0.weight"][0, 0] = 3e38
    edit_tensors(bad, poison)
    assert_one_line(["predict", bad, video(tmp_path)], "absurd magnitudes")


def test_damaged_checkpoints_give_one_line_export_errors(run, tmp_path: Path):
    run_dir, _ = run
    cases = {
        "truncated": lambda c: (c / "model.safetensors").write_bytes(
            (c / "model.safetensors").read_bytes()[:100]),
        "missing-model": lambda c: (c / "model.safetensors").unlink(),
        "garbage-state": lambda c: (c / "state.json").write_text("{not json"),
        "missing-state": lambda c: (c / "state.json").unlink(),
        "wrong-shape": lambda c: edit_tensors(
            c / "model.safetensors",
            lambda t: t.update({"encoder.attention.0.weight":
                                t["encoder.attention.0.weight"][:1].clone()})),
    }
    for name, damage in cases.items():
        ckpt = copy_run(run_dir, tmp_path / name)
        if name in ("garbage-state", "missing-state") and not (ckpt / "state.json").exists():
            continue
        damage(ckpt)
        assert_one_line(["export", tmp_path / name, "--out", tmp_path / f"{name}-ex"], "")


@pytest.mark.parametrize("edit,phrase", [
    (lambda c: c.update(input_shape=[1_000_000_000]), "out of range"),
    (lambda c: c.update(num_tasks=10_000_000), "out of range"),
    (lambda c: c.update(num_tasks=True), "num_tasks must be a positive integer"),
    (lambda c: c.update(num_tasks=0), "num_tasks must be a positive integer"),
    (lambda c: c.update(input_shape=[16.0]), "input_shape must be a list of positive integers"),
    (lambda c: c.update(input_shape=[]), "input_shape must be a list of positive integers"),
    (lambda c: c.update(input_shape="16"), "input_shape must be a list of positive integers"),
    (lambda c: c.update(input_shape=[17]), "do not match the architecture"),
    (lambda c: c.update(background_labels=5), "background_labels"),
    (lambda c: c.update(method=5), "method"),
    (lambda c: c.update(source="x"), "source"),
])
def test_tampered_metadata_is_refused_before_building(run, tmp_path: Path, edit, phrase):
    _, export = run
    bad = edit_config(export, tmp_path / "bad.safetensors", edit)
    assert_one_line(["predict", bad, video(tmp_path)], phrase)


def test_fifo_and_overlong_videos_are_refused(run, tmp_path: Path):
    _, export = run
    fifo = tmp_path / "fifo.npy"
    os.mkfifo(fifo)
    assert_one_line(["predict", export, fifo], "not a regular file")
    assert_one_line(["predict", export, video(tmp_path, 50), "--max-frames", "10"],
                    "--max-frames")
    result = runner.invoke(app, ["predict", str(export), str(video(tmp_path, 50)), "--json"])
    assert result.exit_code == 0, result.output


# ----------------------------------------------------------------------------------------------
# extract-features: damaged outputs and manifests


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    from test_extract import write_video

    d = tmp_path_factory.mktemp("xvideos")
    write_video(d / "a.mp4", 30, 30)
    root = d / "root"
    args = ["extract-features", str(d), str(root), "--weights", "random", "--fps", "2",
            "--layout", "features", "--batch-size", "4"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return d, root, args


@pytest.mark.slow
def test_extract_damaged_outputs_and_manifests(extracted, tmp_path: Path):
    d, root, args = extracted
    work = tmp_path / "root"
    shutil.copytree(root, work)
    args = [a if a != str(root) else str(work) for a in args]
    manifest = (work / "manifest.json").read_text()
    for garbage in ("[1, 2]", json.dumps(json.loads(manifest) | {"videos": [5]}),
                    json.dumps(json.loads(manifest) | {"settings": "x"}), "{not json"):
        (work / "manifest.json").write_text(garbage)
        assert_one_line(args, "manifest")
    (work / "manifest.json").write_text(manifest)
    for damage in (b"", (work / "features/a.npy").read_bytes()[:200]):
        (work / "features/a.npy").write_bytes(damage)
        result = runner.invoke(app, args + ["--json"])
        assert result.exit_code == 0, result.output
        err = stderr_of(result)
        assert "warning: " in err and "extracting the video again" in err
        assert json.loads(result.stdout)["done"] == 1
        assert np.load(work / "features/a.npy").shape[0] > 0
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        assert_one_line([a if a != str(work) else str(ro / "out") for a in args],
                        "output directory")
