"""examples/ run end to end: the quickstart script, the Python API example on its export, and
the EgoProceL config (a tiny model, so that it takes seconds)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from alignprog.config import load_config

from helpers import TINY

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# TINY's model widths as train flags (the quickstart's data settings stay its own)
TINY_MODEL = [a for k, v in TINY.items() if k.startswith(("model.", "progress."))
              for a in ("--set", f"{k}={json.dumps(v, separators=(',', ':'))}")]


def _env() -> dict[str, str]:
    """The test's interpreter and its `alignprog` script first on PATH."""
    bin_dir = str(Path(sys.executable).parent)
    return dict(os.environ, PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),
                PYTHON=sys.executable, ALIGNPROG_TRAIN_ARGS=" ".join(["--epochs", "1",
                                                                      *TINY_MODEL]))


def test_quickstart_and_python_api(tmp_path: Path):
    work = tmp_path / "with space"   # paths with spaces are quoted throughout
    res = subprocess.run(["bash", str(EXAMPLES / "quickstart.sh"), str(work)], env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    evaluation = json.loads((work / "evaluation.json").read_text())
    assert evaluation["predictors"]["head"]["metrics"]["mae"]["mean_over_videos"] is not None
    assert "kendall_tau" in evaluation["alignment"]["metrics"]
    assert (work / "export" / "model.safetensors").is_file()
    predicted = json.loads((work / "predict.json").read_text())
    assert len(predicted["videos"]) == 2                   # one test video per task
    for video in predicted["videos"]:
        assert 0 <= min(video["progress"]) <= max(video["progress"]) <= 1

    splits = json.loads((work / "data" / "splits.json").read_text())["splits"]
    handle = next(iter(splits.values()))["test"][0]
    features = work / "data" / "features" / f"{handle}.npy"
    frames = len(np.load(features))
    res = subprocess.run([sys.executable, str(EXAMPLES / "python_api.py"), str(work / "export"),
                          str(features), "2:10", f"20:{frames - 1}"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    lines = res.stdout.splitlines()
    assert len(lines) == frames
    values = [float(line.split()[-1]) for line in lines]
    assert values[0] == values[1] == 0.0 and values[11] == 0.0     # outside the actions
    assert all(0 < v <= 1 for v in values[2:11] + values[20:])


def test_egoprocel_config_loads_with_its_preset():
    cfg = load_config(EXAMPLES / "egoprocel.yaml", {"data.root": "/data/egoprocel"})
    assert cfg.data.fps.preset == "egoprocel" and cfg.data.strict is False
    assert cfg.train.epochs == 50 and cfg.model.encoder == "stacking"
    assert str(cfg.data.root) == "/data/egoprocel"


def test_examples_readme_names_every_example():
    text = (EXAMPLES / "README.md").read_text()
    for path in EXAMPLES.iterdir():
        if path.name != "README.md":
            assert f"`{path.name}`" in text, path.name
