"""What fits: the memory estimate train checks before it starts, its refusal, and one-line
out-of-memory errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from alignprog.cli import app
from alignprog.cli.common import _out_of_memory
from alignprog.config import Config, load_config
from alignprog.data import load_dataset
from alignprog.training import memory
from alignprog.training.memory import (PER_ELEMENT, PER_FRAME, estimate_step_bytes,
                                       largest_batch, longest_that_fits, memory_problem,
                                       pair_count)

from helpers import TINY, tiny_annotations, write_root

runner = CliRunner()
SETS = sum((["--set", f"{k}={json.dumps(v)}"] for k, v in TINY.items()), [])


def cfg_of(method: str, **extra) -> Config:
    """The model PER_FRAME was measured with: 16 heads, the head on the embeddings."""
    return load_config(overrides={"train.method": method, "model.num_heads": 16,
                                  "progress.learnable.input": "embeddings"} | extra)


@pytest.mark.parametrize("method", ["tcc", "gtcc", "lav", "vava"])
@pytest.mark.parametrize("kind", ["cuda", "cpu"])
def test_the_estimate_is_the_documented_formula(method, kind):
    cfg = cfg_of(method)
    got = estimate_step_bytes(cfg, [300, 700, 500], (2048,), kind)
    by_hand = (PER_FRAME[kind][method] * 3 * 700 + PER_ELEMENT[kind][method] * 6 * 701 ** 2
               + 2 * 3 * 700 * 2048 * 4)
    assert got == int(by_hand)


def test_the_heads_own_base_encoder_adds_its_width_per_frame():
    # Per frame of the default model: base 256 * 7 layers, fusion 16 * (512 + 128 + 256 + 128)
    # + (512 + 1024 + 512 + 512), embeddings 128; the default head input (separate) runs a
    # second base encoder beside the first.
    base, fusion, out = 256 * 7, 16 * (512 + 128 + 256 + 128) + 2560, 128
    separate = load_config(overrides={"train.method": "lav", "model.num_heads": 16})
    assert separate.progress.learnable.input_for("lav") == "separate"
    frames = lambda c: (estimate_step_bytes(c, [700, 700], (1,), "cuda")  # noqa: E731
                        - PER_ELEMENT["cuda"]["lav"] * 2 * 701 ** 2 - 2 * 2 * 700 * 4)
    ratio = (2 * base + fusion + out) / (base + fusion + out)
    assert frames(separate) == pytest.approx(ratio * frames(cfg_of("lav")), rel=1e-6)
    assert frames(cfg_of("lav")) == pytest.approx(PER_FRAME["cuda"]["lav"] * 1400, rel=1e-6)


def test_pairs_and_the_quadratic_growth():
    assert pair_count(cfg_of("lav"), 4) == 12
    assert pair_count(cfg_of("tcc"), 4) == 12
    assert pair_count(cfg_of("tcc", **{"loss.compat": "reference"}), 4) == 16
    cfg = cfg_of("vava")
    matrices = lambda t: (estimate_step_bytes(cfg, [t, t], (1,), "cuda")  # noqa: E731
                          - 2 * t * PER_FRAME["cuda"]["vava"] - 2 * 2 * t * 4)
    assert matrices(20_000) == pytest.approx(4 * matrices(10_000), rel=1e-3)


def test_narrower_and_bf16_encoders_cost_less_per_frame():
    narrow, wide = cfg_of("lav"), cfg_of("lav", **{"model.conv_channels": 512})
    assert estimate_step_bytes(narrow, [100] * 2) < estimate_step_bytes(wide, [100] * 2)
    half = cfg_of("lav", **{"train.precision": "bf16"})
    assert estimate_step_bytes(half, [100] * 2) < estimate_step_bytes(narrow, [100] * 2)


def test_longest_that_fits_is_the_largest_length_within_the_budget():
    cfg = cfg_of("lav")
    budget = 8 * 2**30
    t = longest_that_fits(cfg, 2, budget, (2048,))
    assert estimate_step_bytes(cfg, [t, t]) <= budget < estimate_step_bytes(cfg, [t + 1] * 2)


def long_root(tmp_path: Path) -> Path:
    """The tiny root, with video build_1 lengthened to 400 frames (its last segment too)."""
    ann, lengths = tiny_annotations()
    ann["build"]["hdl_end_times"][1][-1] = 399
    lengths["build_1"] = 400
    return write_root(tmp_path / "long", ann, lengths)


def test_the_largest_batch_is_the_longest_videos_of_one_task(tmp_path):
    root = long_root(tmp_path)
    cfg = load_config(overrides={"data.root": str(root), "data.split.train": 1.0,
                                 "data.split.val": 0.0, "data.split.test": 0.0})
    ds = load_dataset(cfg.data)
    task, lengths, need = largest_batch(ds, cfg)
    assert need == estimate_step_bytes(cfg, lengths, (8,))
    build = sorted((v.num_frames for v in ds.videos if v.task == "build"), reverse=True)
    assert task == "build" and lengths == build[:2] and lengths[0] == 400


def test_memory_problem_says_what_fits_and_the_way_out(tmp_path):
    root = long_root(tmp_path)
    cfg = load_config(overrides={"data.root": str(root), "data.split.train": 1.0,
                                 "data.split.val": 0.0, "data.split.test": 0.0})
    ds = load_dataset(cfg.data)
    cpu = torch.device("cpu")
    need = estimate_step_bytes(cfg, largest_batch(ds, cfg, "cpu")[1], (8,), "cpu")
    assert memory_problem(ds, cfg, cpu, available=2 * need) is None
    message = memory_problem(ds, cfg, cpu, available=need // 2)
    assert "task build: 2 videos of up to 400 frames" in message
    assert memory.gib(need // 2) + " free" in message
    assert "train.memory_check=false" in message and "data.batch_size" in message


def test_train_refuses_a_run_that_cannot_fit_before_creating_it(tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "free_bytes", lambda device: 1000)
    runs = tmp_path / "runs"
    res = runner.invoke(app, ["train", "--runs-dir", str(runs), "--name", "r", "--steps", "1",
                              *SETS])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "needs about" in res.output and "0.0 GiB free" in res.output
    assert not (runs / "r").exists()
    res = runner.invoke(app, ["train", "--runs-dir", str(runs), "--name", "r", "--steps", "1",
                              *SETS, "--set", "train.memory_check=false"])
    assert res.exit_code == 0, res.output


def test_out_of_memory_is_one_line():
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB\nmore text")
    line = _out_of_memory(oom)
    assert line.startswith("out of memory (CUDA out of memory. Tried to allocate 20.00 GiB)")
    assert "data.batch_size" in line and "\n" not in line
    assert _out_of_memory(MemoryError("Unable to allocate 238. GiB")).startswith("out of memory")
    assert _out_of_memory(RuntimeError("shape mismatch")) is None


def test_an_allocation_failure_during_training_is_one_line(tmp_path, monkeypatch):
    from alignprog.training import loop

    def boom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(loop.Trainer, "step_batch", boom)
    res = runner.invoke(app, ["train", "--runs-dir", str(tmp_path), "--name", "r",
                              "--steps", "2", *SETS])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "error: out of memory (CUDA out of memory. Tried to allocate 9.00 GiB)" in res.output
    assert not (tmp_path / "r").exists()      # it never wrote a checkpoint


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["tcc", "gtcc", "lav", "vava"])
def test_the_estimate_covers_the_measured_peak_on_cuda(method):
    from benchmarks.memory_fit import peak_cuda
    from benchmarks.train_step import make_config

    cfg = make_config(method, "stacking", "cuda", "fp32", {"train.cuda_graphs": "off"})
    peak = peak_cuda(method, 2, 3072, "cuda", {})
    assert peak <= estimate_step_bytes(cfg, [3072, 3072], (2048,), "cuda") <= 2 * peak

