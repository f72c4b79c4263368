"""train.csv_metrics: metrics_step.csv / metrics_epoch.csv equal metrics.jsonl, also across a
resume."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from alignprog.config import load_config
from alignprog.training import RunDir
from alignprog.training.csvlog import csv_path, flatten
from alignprog.training.loop import fit

from helpers import TINY


def test_flatten_hand_made_record():
    record = {"step": 3, "val_progress_mae": {"head": 0.25, "frame_count": None},
              "bad_terms": ["progress"], "total": float("nan"), "skipped": False}
    assert flatten(record) == {"step": 3, "val_progress_mae.head": 0.25,
                               "val_progress_mae.frame_count": "", "bad_terms": '["progress"]',
                               "total": "nan", "skipped": False}


def _read(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _same(cell: str, value) -> bool:
    if value is None:
        return cell == ""
    if isinstance(value, bool):
        return cell == str(value)
    if isinstance(value, (int, float)):
        return math.isclose(float(cell), value, rel_tol=1e-12) or (
            math.isnan(value) and cell == "nan")
    return cell == str(value)


def _check_against_jsonl(run_dir: Path) -> dict[str, list[dict]]:
    records = RunDir.open(run_dir).read_metrics()
    out = {}
    for kind in ("step", "epoch"):
        rows = _read(csv_path(run_dir, kind))
        want = [flatten({k: v for k, v in r.items() if k != "kind"}) for r in records
                if r["kind"] == kind]
        assert len(rows) == len(want) > 0
        for row, rec in zip(rows, want):
            assert set(rec) <= set(row)            # no key of the record is dropped
            for column, cell in row.items():
                assert _same(cell, rec.get(column)), (kind, column, cell, rec.get(column))
        out[kind] = rows
    return out


def test_csv_files_equal_the_jsonl_records_and_survive_a_resume(tmp_path: Path):
    extra = {"train.csv_metrics": True, "train.steps": 3}
    fit(load_config(overrides=TINY | extra), run=RunDir.create(tmp_path, "r"))
    rows = _check_against_jsonl(tmp_path / "r")
    assert [int(r["step"]) for r in rows["step"]] == [1, 2, 3]
    assert "lambda" in rows["step"][0] and "val_progress_mae.head" in rows["epoch"][0]
    # resumed to 6 steps: every step once, in order, as metrics.jsonl has them
    fit(load_config(overrides=TINY | extra | {"train.steps": 6}),
        run=RunDir.open(tmp_path / "r"), resume=True)
    rows = _check_against_jsonl(tmp_path / "r")
    assert [int(r["step"]) for r in rows["step"]] == [1, 2, 3, 4, 5, 6]


def test_no_csv_by_default(tmp_path: Path):
    fit(load_config(overrides=TINY | {"train.steps": 1}), run=RunDir.create(tmp_path, "r"))
    assert not csv_path(tmp_path / "r", "step").exists()


@pytest.mark.parametrize("kind", ["start", "end"])
def test_other_kinds_are_not_written(tmp_path: Path, kind):
    from alignprog.training.csvlog import append
    append(tmp_path, kind, {"step": 1})
    assert not list(tmp_path.iterdir())


def test_a_key_that_comes_later_gets_its_column(tmp_path: Path):
    # two-stage: the head stage's step records carry "stage", the first records do not
    cfg = load_config(overrides=TINY | {"train.csv_metrics": True, "train.steps": 2,
                                        "train.two_stage": True, "train.head_epochs": 1})
    fit(cfg, run=RunDir.create(tmp_path, "r"))
    rows = _check_against_jsonl(tmp_path / "r")
    assert rows["step"][0]["stage"] == "" and rows["step"][-1]["stage"] == "head"
