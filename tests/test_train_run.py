"""benchmarks/train_run.py: a whole run's wall time split into its phases (CPU smoke run)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import train_run

from helpers import TINY


def test_the_phases_add_up_to_the_wall_time(tmp_path: Path):
    out = tmp_path / "run.json"
    sets = [a for k, v in TINY.items() if k != "train.device"
            for a in ("--set", f"{k}={json.dumps(v)}")]
    train_run.main(["--methods", "lav", "--modes", "off", "--epochs", "2", "--device", "cpu",
                    "--synthetic-default", "--json", str(out), *sets])
    (row,) = json.loads(out.read_text())["rows"]
    phases = row["phases_s"]
    assert set(phases) == {"steps", "validation", "checkpoints", "final_evaluation", "startup",
                           "other"}
    assert all(v >= 0 for k, v in phases.items() if k != "other")
    assert sum(phases.values()) == pytest.approx(row["wall_s"])
    assert abs(phases["other"]) < 0.25 * row["wall_s"]
    assert row["steps"] > 0 and phases["steps"] > 0 and phases["validation"] > 0
    assert row["steps_per_s"] == pytest.approx(row["steps"] / phases["steps"])
    assert row["time_to_quality_s"] <= row["wall_s"] and row["test_head_mae"] is not None
    assert "graphs_held" not in row   # no CUDA graphs on the CPU
