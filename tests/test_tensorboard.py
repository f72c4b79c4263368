"""train.tensorboard: the events under RUN_DIR/tensorboard/ equal metrics.jsonl, also across a
resume; a missing tensorboard package stops the run before it starts."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from alignprog.cli import app
from alignprog.config import load_config
from alignprog.errors import ConfigError
from alignprog.training import RunDir, tblog
from alignprog.training.csvlog import flatten
from alignprog.training.loop import fit

from helpers import SETS_TINY, TINY, stderr_of

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator)

TB = {"train.tensorboard": True}


def _events(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of the run's events: (step, value) in the order TensorBoard reads them."""
    acc = EventAccumulator(str(tblog.log_dir(run_dir)), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _expected(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The numeric values of metrics.jsonl's step, epoch and end records, by tag."""
    out: dict[str, list[tuple[int, float]]] = {}
    for record in RunDir.open(run_dir).read_metrics():
        kind = record.pop("kind")
        if kind not in ("step", "epoch", "end"):
            continue
        for name, value in flatten(record).items():
            if value == "nan":
                value = math.nan
            if name != "step" and isinstance(value, (bool, int, float)):
                out.setdefault(f"{kind}/{name}", []).append((record["step"], float(value)))
    return out


def _check_against_jsonl(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events, want = _events(run_dir), _expected(run_dir)
    assert set(events) == set(want)
    for tag, points in want.items():
        got = events[tag]
        assert [s for s, _ in got] == [s for s, _ in points], tag   # no step twice
        for (_, a), (_, b) in zip(got, points):   # events hold float32
            assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-30) or (
                math.isnan(a) and math.isnan(b)), (tag, a, b)
    return events


def test_scalars_of_a_hand_made_record():
    record = {"step": 3, "val_progress_mae": {"head": 0.25, "frame_count": None},
              "bad_terms": ["progress"], "total": float("nan"), "skipped": True, "stage": "head"}
    got = tblog.scalars(record)
    assert set(got) == {"val_progress_mae.head", "total", "skipped"}
    assert got["val_progress_mae.head"] == 0.25 and got["skipped"] == 1.0
    assert math.isnan(got["total"])


def test_events_equal_the_jsonl_records_and_survive_a_resume(tmp_path: Path):
    fit(load_config(overrides=TINY | TB | {"train.steps": 3}), run=RunDir.create(tmp_path, "r"))
    events = _check_against_jsonl(tmp_path / "r")
    assert [s for s, _ in events["step/alignment"]] == [1, 2, 3]
    assert "epoch/val_progress_mae.head" in events and "end/test_progress_mae.head" in events
    # resumed to 6 steps: every step once, in order, as metrics.jsonl has them
    fit(load_config(overrides=TINY | TB | {"train.steps": 6}),
        run=RunDir.open(tmp_path / "r"), resume=True)
    events = _check_against_jsonl(tmp_path / "r")
    assert [s for s, _ in events["step/alignment"]] == [1, 2, 3, 4, 5, 6]
    names = sorted(p.name for p in (tmp_path / "r").iterdir())
    assert "tensorboard" in names and not [n for n in names if n.startswith(".tensorboard")]


def test_rebuild_replaces_the_folder_and_its_leftovers(tmp_path: Path):
    (tmp_path / ".tensorboard.tmp").mkdir()   # a rebuild interrupted before the swap
    (tmp_path / ".tensorboard.tmp" / "events.out.tfevents.half").write_bytes(b"")
    records = [{"kind": "step", "step": s, "alignment": 1.0 / s} for s in (1, 2)]
    tblog.rebuild(tmp_path, records + [{"kind": "start", "steps": 2}])
    tblog.rebuild(tmp_path, records[:1])   # again, cut at step 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tensorboard"]
    assert _events(tmp_path) == {"step/alignment": [(1, 1.0)]}
    tblog.rebuild(tmp_path, [])   # nothing to show: no folder
    assert not list(tmp_path.iterdir())


def test_no_events_by_default(tmp_path: Path):
    fit(load_config(overrides=TINY | {"train.steps": 1}), run=RunDir.create(tmp_path, "r"))
    assert not tblog.log_dir(tmp_path / "r").exists()


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_the_writer_is_closed_when_training_stops(tmp_path: Path, monkeypatch, error):
    closed = []
    real_close = tblog.TensorBoardLog.close
    monkeypatch.setattr(tblog.TensorBoardLog, "close",
                        lambda self: closed.append(1) or real_close(self))

    def stop_at_the_second_step(kind: str, record: dict) -> None:
        if kind == "step" and record["step"] == 2:
            raise error

    cfg = load_config(overrides=TINY | TB | {"train.steps": 3})
    if error is KeyboardInterrupt:
        result = fit(cfg, run=RunDir.create(tmp_path, "r"), callback=stop_at_the_second_step)
        assert result.interrupted
    else:
        with pytest.raises(RuntimeError):
            fit(cfg, run=RunDir.create(tmp_path, "r"), callback=stop_at_the_second_step)
    assert closed == [1]
    assert [s for s, _ in _events(tmp_path / "r")["step/alignment"]] == [1, 2]


def test_missing_tensorboard_stops_the_run_before_it_starts(tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)   # import fails
    args = ["train", "--steps", "2", "--runs-dir", str(tmp_path), "--name", "r", *SETS_TINY,
            "--set", "train.tensorboard=true"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == ConfigError.exit_code
    message = stderr_of(result).strip()
    assert "pip install 'alignprog[tensorboard]'" in message and "Traceback" not in message
    assert len(message.splitlines()) == 1
    assert not (tmp_path / "r").exists() and "training" not in result.output
    with pytest.raises(ConfigError, match="alignprog\\[tensorboard\\]"):   # the library's check
        fit(load_config(overrides=TINY | TB | {"train.steps": 1}))
