"""Every option value `alignprog train` offers runs: each progress mode with each method, joint
and two-stage, on the CPU and (marked gpu) on CUDA, through the CLI so that the logged records
are read exactly as a user's run reads them (a CPU/CUDA mix there once crashed every
alignment-only GPU run at its first logged step)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from alignprog.cli import app
from alignprog.training.step import StepMetrics

from helpers import TINY

TINY_SET = [a for k, v in TINY.items() for a in ("--set", f"{k}={json.dumps(v)}")]
METHODS = ["tcc", "gtcc", "lav", "vava"]
PROGRESS = ["learnable", "cumulative_l2", "none"]


def run_train(tmp_path: Path, *args: str) -> list[dict]:
    """`alignprog train --json-logs` with the tiny config; its JSON records."""
    result = CliRunner().invoke(app, ["train", "--runs-dir", str(tmp_path), "--name", "r",
                                      "--json-logs", "--set", "train.log_every=1", *TINY_SET,
                                      *args])
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def check_steps(records: list[dict], steps: int, progress: str) -> None:
    logged = [r for r in records if r["kind"] == "step"]
    assert [r["step"] for r in logged] == list(range(1, steps + 1))
    for r in logged:
        assert math.isfinite(r["alignment"]) and math.isfinite(r["total"])
        if progress == "none":
            assert r["progress"] in (None, 0.0)
        else:
            assert math.isfinite(r["progress"])
    end = [r for r in records if r["kind"] == "end"]
    assert len(end) == 1


def test_step_metrics_read_mixes_devices():
    """Scalars of several devices (and plain numbers) read together as Python numbers."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    m = StepMetrics(step=3, epoch=0, lam=1.0, samples=0, videos=2, frames=4,
                    alignment=torch.tensor(1.5, device=devices[-1]), progress=None,
                    total=torch.tensor([0.25]), bad=torch.tensor(False, device=devices[-1]),
                    grad_encoder=torch.tensor(2, device="cpu"))
    out = m.read({"skipped_total": torch.zeros((), dtype=torch.long, device=devices[-1])})
    assert (out["alignment"], out["total"], out["grad_encoder"]) == (1.5, 0.25, 2.0)
    assert all(type(out[k]) is float for k in ("alignment", "total", "grad_encoder"))
    assert out["skipped_total"] == 0 and out["skipped"] is False


@pytest.mark.parametrize("progress", PROGRESS)
@pytest.mark.parametrize("method", METHODS)
def test_every_progress_mode_trains_with_every_method_on_cpu(tmp_path, method, progress):
    records = run_train(tmp_path, "--method", method, "--progress", progress, "--steps", "2",
                        "--device", "cpu")
    check_steps(records, 2, progress)


@pytest.mark.parametrize("clip", ["global", "none"])
def test_clip_modes_without_a_head_on_cpu(tmp_path, clip):
    records = run_train(tmp_path, "--progress", "none", "--steps", "2", "--device", "cpu",
                        "--clip-mode", clip)
    check_steps(records, 2, "none")
    assert all(r["grad_head"] == 0.0 for r in records if r["kind"] == "step")


@pytest.mark.parametrize("method", ["lav", "vava"])
def test_two_stage_trains_on_cpu(tmp_path, method):
    records = run_train(tmp_path, "--method", method, "--two-stage", "--epochs", "1",
                        "--set", "train.head_epochs=1", "--device", "cpu")
    stages = {r.get("stage") for r in records if r["kind"] == "step"}
    assert stages == {None, "head"}


@pytest.mark.gpu
@pytest.mark.filterwarnings("error::UserWarning")   # a failed graph capture is a failure here
@pytest.mark.parametrize("graphs", ["auto", "off"])
@pytest.mark.parametrize("progress", PROGRESS)
@pytest.mark.parametrize("method", METHODS)
def test_every_progress_mode_trains_with_every_method_on_cuda(tmp_path, method, progress,
                                                              graphs):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    records = run_train(tmp_path, "--method", method, "--progress", progress, "--steps", "3",
                        "--device", "cuda", "--set", f"train.cuda_graphs={graphs}")
    check_steps(records, 3, progress)


@pytest.mark.gpu
@pytest.mark.filterwarnings("error::UserWarning")   # a failed graph capture is a failure here
@pytest.mark.parametrize("clip", ["separate", "global", "none"])
@pytest.mark.parametrize("progress", PROGRESS)
def test_every_clip_mode_trains_on_cuda(tmp_path, progress, clip):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    records = run_train(tmp_path, "--method", "lav", "--progress", progress, "--steps", "3",
                        "--device", "cuda", "--clip-mode", clip)
    check_steps(records, 3, progress)


@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
def test_two_stage_trains_on_cuda(tmp_path, method):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    records = run_train(tmp_path, "--method", method, "--two-stage", "--epochs", "1",
                        "--set", "train.head_epochs=1", "--device", "cuda")
    stages = {r.get("stage") for r in records if r["kind"] == "step"}
    assert stages == {None, "head"}


def test_the_live_table_shows_runs_without_a_progress_term():
    """The display reads every step record: none without progress may break it."""
    from rich.console import Console

    from alignprog.cli.train import Display
    from alignprog.config import load_config
    from alignprog.training.loop import fit

    display = Display("live")
    try:
        res = fit(load_config(overrides=TINY | {"train.steps": 2, "progress.enabled": False}),
                  callback=display)
        Console(file=io.StringIO()).print(display.table())
    finally:
        display.stop()
    steps = [r for r in res.history if r["kind"] == "step"]
    assert steps and all(r["weighted_progress"] is None for r in steps)
    assert len(display.rows) == len(steps)
