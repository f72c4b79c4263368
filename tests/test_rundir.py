"""Run directories: create / refuse / overwrite / resume, names, metrics, checkpoints, meta.json."""

from __future__ import annotations

import json
import math
import os
import platform
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import alignprog
from alignprog.config import Config
from alignprog.data.splits import Splits
from alignprog.errors import AlignprogError
from alignprog.training.checkpoint import save_checkpoint
from alignprog.training.rundir import RunDir, RunError, default_run_name, git_commit


def _checkpoint(run: RunDir, step: int | None = None, name: str | None = None) -> Path:
    path = run.checkpoints_dir / name if name else run.checkpoint_path(step)
    save_checkpoint(path, model=nn.Linear(2, 1), optimizer=None, state={"step": step}, meta={})
    return path


def test_create_new_run(tmp_path: Path):
    run = RunDir.create(tmp_path / "runs", "tcc-a")
    assert run.path == tmp_path / "runs" / "tcc-a"
    assert run.checkpoints_dir.is_dir() and not run.resumed
    assert run.latest_checkpoint() is None and run.best_checkpoint() is None
    # An existing empty directory is fine for a new run.
    (tmp_path / "runs" / "empty").mkdir()
    RunDir.create(tmp_path / "runs", "empty")


def test_refuses_existing_run(tmp_path: Path):
    run = RunDir.create(tmp_path, "r")
    run.write_config(Config())
    with pytest.raises(RunError, match=r"already exists; pass --resume .* --overwrite") as info:
        RunDir.create(tmp_path, "r")
    assert isinstance(info.value, AlignprogError)
    assert run.config_path.is_file()


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "..", "a b"])
def test_invalid_names(tmp_path: Path, name: str):
    with pytest.raises(RunError, match="invalid run name"):
        RunDir.create(tmp_path, name)


def test_overwrite_replaces_the_run(tmp_path: Path):
    run = RunDir.create(tmp_path, "r")
    run.write_config(Config())
    run.log_metrics({"step": 1, "loss": 1.0})
    _checkpoint(run, 1)
    new = RunDir.create(tmp_path, "r", overwrite=True)
    assert new.path == run.path
    assert sorted(p.name for p in new.path.iterdir()) == [".alignprog-run", "checkpoints"]
    assert new.read_metrics() == [] and new.latest_checkpoint() is None
    # The old run waits, hidden, until the new one has a checkpoint (Trainer.save releases it).
    hidden = [p for p in tmp_path.iterdir() if p.name != "r"]
    assert len(hidden) == 1 and hidden[0].name.startswith(".r.old-")
    assert (hidden[0] / "r" / "checkpoints").is_dir()
    new.release_replaced()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # the old run is gone
    # Overwriting a run that does not exist simply creates it.
    RunDir.create(tmp_path, "fresh", overwrite=True)


def test_an_overwrite_that_never_checkpoints_puts_the_old_run_back(tmp_path: Path):
    run = RunDir.create(tmp_path, "r")
    run.log_metrics({"step": 1, "loss": 1.0})
    _checkpoint(run, 1)
    new = RunDir.create(tmp_path, "r", overwrite=True)
    assert new.discard_if_unstarted()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]
    assert run.read_metrics() == [{"step": 1, "loss": 1.0}] and run.latest_checkpoint()


def test_overwrite_failure_keeps_old_run(tmp_path: Path, monkeypatch):
    run = RunDir.create(tmp_path, "r")
    run.log_metrics({"step": 1})
    real_mkdir = Path.mkdir

    def failing_mkdir(self, *args, **kwargs):
        if self.name == "checkpoints":
            raise OSError("no space")
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", failing_mkdir)
    with pytest.raises(OSError, match="no space"):
        RunDir.create(tmp_path, "r", overwrite=True)
    monkeypatch.undo()
    assert RunDir.open(run.path).read_metrics() == [{"step": 1}]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_overwrite_refuses_a_directory_that_is_not_a_run(tmp_path: Path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "precious.npy").write_bytes(b"x")
    with pytest.raises(RunError, match="does not look like an alignprog run"):
        RunDir.create(tmp_path, "data", overwrite=True)
    assert (tmp_path / "data" / "precious.npy").is_file()


def test_resume(tmp_path: Path):
    with pytest.raises(RunError, match="cannot resume: no run directory"):
        RunDir.create(tmp_path, "r", resume=True)
    run = RunDir.create(tmp_path, "r")
    run.write_config(Config())
    with pytest.raises(RunError, match="has no checkpoint .*--overwrite"):
        RunDir.create(tmp_path, "r", resume=True)
    _checkpoint(run, 5)
    resumed = RunDir.create(tmp_path, "r", resume=True)
    assert resumed.resumed and resumed.latest_checkpoint() == run.checkpoint_path(5)
    with pytest.raises(RunError, match="cannot be used together"):
        RunDir.create(tmp_path, "r", resume=True, overwrite=True)


def test_default_run_name_is_unique(tmp_path: Path):
    now = datetime(2024, 3, 5, 7, 8, 9)
    assert default_run_name("tcc", now=now) == "tcc-20240305-070809"
    first = default_run_name("tcc", tmp_path, now=now)
    RunDir.create(tmp_path, first)
    second = default_run_name("tcc", tmp_path, now=now)
    RunDir.create(tmp_path, second)
    third = default_run_name("tcc", tmp_path, now=now)
    assert (first, second, third) == ("tcc-20240305-070809", "tcc-20240305-070809-2",
                                      "tcc-20240305-070809-3")
    assert default_run_name("lav").startswith("lav-20")


def test_metrics_append_read_and_nan(tmp_path: Path):
    run = RunDir.create(tmp_path, "r")
    assert run.read_metrics() == []
    run.log_metrics({"step": 1, "loss": 0.5, "split": "train"})
    run.log_metrics({"step": 2, "loss": float("nan"), "grad": float("inf"),
                     "low": -math.inf, "np": np.float32(0.25), "t": torch.tensor(1.5),
                     "per_task": {"a": np.float64(2.0)}})
    lines = run.metrics_path.read_text().splitlines()
    assert len(lines) == 2
    for line in lines:  # strict JSON: no bare NaN/Infinity tokens
        json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c}"))
    records = run.read_metrics()
    assert records[0] == {"step": 1, "loss": 0.5, "split": "train"}
    assert math.isnan(records[1]["loss"])
    assert records[1]["grad"] == math.inf and records[1]["low"] == -math.inf
    assert records[1]["np"] == 0.25 and records[1]["t"] == 1.5
    assert records[1]["per_task"] == {"a": 2.0}
    assert isinstance(records[1]["np"], float)


def test_truncate_metrics_after(tmp_path: Path):
    run = RunDir.create(tmp_path, "r")
    for step in range(1, 7):
        run.log_metrics({"step": step, "loss": 1.0 / step})
        if step % 2 == 0:
            run.log_metrics({"step": step, "val_loss": float("nan")})
    run.log_metrics({"event": "interrupted"})
    assert run.truncate_metrics_after(4) == 4  # steps 5, 6, 6-val and the step-less record
    steps = [r["step"] for r in run.read_metrics()]
    assert steps == [1, 2, 2, 3, 4, 4]
    kept_text = run.metrics_path.read_text()
    assert run.truncate_metrics_after(4) == 0
    assert run.metrics_path.read_text() == kept_text  # idempotent, lines kept verbatim

    # A resumed run re-logs steps 5, 6 and equals an uninterrupted one.
    for step in range(5, 7):
        run.log_metrics({"step": step, "loss": 1.0 / step})
        if step % 2 == 0:
            run.log_metrics({"step": step, "val_loss": float("nan")})
    ref = RunDir.create(tmp_path, "ref")
    for step in range(1, 7):
        ref.log_metrics({"step": step, "loss": 1.0 / step})
        if step % 2 == 0:
            ref.log_metrics({"step": step, "val_loss": float("nan")})
    assert run.metrics_path.read_text() == ref.metrics_path.read_text()


def test_torn_last_metrics_line(tmp_path: Path):
    run = RunDir.create(tmp_path, "r")
    run.log_metrics({"step": 1})
    with open(run.metrics_path, "a") as fh:
        fh.write('{"step": 2, "lo')  # killed mid-write
    assert run.read_metrics() == [{"step": 1}]
    assert run.truncate_metrics_after(1) == 0
    run.log_metrics({"step": 2})
    assert run.read_metrics() == [{"step": 1}, {"step": 2}]
    # A damaged line in the middle is an error, not silently skipped.
    run.metrics_path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(RunError, match=r"metrics\.jsonl:2: not a JSON line"):
        run.read_metrics()


def test_latest_checkpoint_sorts_numerically(tmp_path: Path):
    run = RunDir.create(tmp_path, "r")
    for name in ["step-9", "step-10", "step-2"]:
        _checkpoint(run, name=name)
    (run.checkpoints_dir / "step-11").mkdir()  # incomplete: no meta.json
    (run.checkpoints_dir / ".step-12.tmp-x").mkdir()  # a save in progress
    assert run.latest_checkpoint() == run.checkpoints_dir / "step-10"
    assert [s for s, _ in run.checkpoints()] == [2, 9, 10]
    _checkpoint(run, 100)
    assert run.latest_checkpoint() == run.checkpoints_dir / "step-00000100"
    assert run.best_checkpoint() is None
    assert run.default_checkpoint() == run.latest_checkpoint()
    _checkpoint(run, name="best")
    assert run.best_checkpoint() == run.checkpoints_dir / "best"
    assert run.default_checkpoint() == run.best_checkpoint()


def test_environment_file(tmp_path: Path):
    run = RunDir.create(tmp_path, "r")
    meta = run.write_environment({"device": {"type": "cpu", "name": "x86"}, "precision": "fp32"})
    on_disk = json.loads(run.meta_path.read_text())
    assert on_disk == meta
    assert meta["schema_version"] == 1 and meta["format"] == "alignprog-run"
    assert meta["name"] == "r"
    assert meta["alignprog_version"] == alignprog.__version__
    assert meta["python_version"] == platform.python_version()
    assert meta["torch_version"] == torch.__version__
    assert meta["numpy_version"] == np.__version__
    assert meta["platform"] == platform.platform()
    assert meta["device"] == {"type": "cpu", "name": "x86"} and meta["precision"] == "fp32"
    assert datetime.fromisoformat(meta["started_at"])
    commit = meta["git_commit"]
    assert commit is None or (len(commit) == 40 and int(commit, 16) >= 0)

    # A resume keeps the original record and appends one.
    _checkpoint(run, 1)
    resumed = RunDir.create(tmp_path, "r", resume=True)
    meta2 = resumed.write_environment({"device": {"type": "cuda"}})
    assert meta2["started_at"] == meta["started_at"] and meta2["device"] == meta["device"]
    assert [r["device"] for r in meta2["resumes"]] == [{"type": "cuda"}]


def test_git_commit_none_outside_a_checkout(tmp_path: Path, monkeypatch):
    assert git_commit(tmp_path) is None
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable at all
    assert git_commit() is None


def test_write_json_config_split(tmp_path: Path):
    run = RunDir.create(tmp_path, "r")
    path = run.write_json("eval/report.json", {"tau": np.float32(0.5), "ope": float("nan"),
                                               "per_video": np.array([1.0, 2.0])})
    assert path == run.path / "eval" / "report.json"
    json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    report = run.read_json("eval/report.json")
    assert report["tau"] == 0.5 and math.isnan(report["ope"]) and report["per_video"] == [1, 2]
    with pytest.raises(RunError, match="relative path inside the run"):
        run.write_json("../escape.json", {})
    with pytest.raises(RunError, match="bad: cannot write a value of type object"):
        run.write_json("x.json", {"bad": object()})
    assert not (run.path / "x.json").exists()

    run.write_config(Config())
    assert "data:" in run.config_path.read_text()
    splits = Splits({"cook": {"train": ("a", "b"), "val": ("c",), "test": ("d",)}}, "test split")
    run.write_split(splits)
    data = json.loads(run.split_path.read_text())
    assert data["splits"]["cook"]["train"] == ["a", "b"] and "sha256" in data
    assert sorted(os.listdir(run.path)) == [".alignprog-run", "checkpoints", "config.yaml", "eval",
                                         "split.json"]
