"""benchmarks/progress_quality.py: the whole benchmark on a tiny config, and its helpers (ridge
probe, GRU on true segments, table) on hand-made data."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from alignprog.plots import png_bytes
from benchmarks import progress_quality as pq
from helpers import TINY, annotation

# TINY's model widths on the EgoProceL timelines of one short task (tent: 29 videos of 64-366
# frames; 22 train, 3 val, 4 test), 16-wide features.
TINY_SETS = {k: v for k, v in TINY.items() if k.startswith(("model.", "progress."))} | {
    "data.synthetic.dim": 16, "data.tasks": ["tent"], "train.log_every": 5}


@pytest.fixture(scope="module")
def bench(tmp_path_factory, one_thread):
    """One benchmark run: LAV one epoch, its progress-free twin and a one-value sweep."""
    out = tmp_path_factory.mktemp("pq")
    argv = [a for k, v in TINY_SETS.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    argv += ["--methods", "lav", "--epochs", "1", "--device", "cpu", "--gru-steps", "20",
             "--sweep", "progress.lambda_fixed=1e3", "--out", str(out)]
    return out, pq.main(argv)


def test_outputs_and_rows(bench):
    out, result = bench
    for name in pq.FILES.values():
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / pq.FILES["json"]).read_text())
    assert [r["name"] for r in saved["runs"]] == ["lav", "lav none",
                                                  "lav progress.lambda_fixed=1e3"]
    assert all("error" not in r for r in saved["runs"]), [r.get("error") for r in saved["runs"]]
    default, none, sweep = saved["runs"]
    assert default["config"]["data"]["synthetic"]["timelines"] == "egoprocel"
    assert default["config"]["train"]["epochs"] == 1
    assert none["config"]["progress"]["enabled"] is False and none["head_mae"] is None
    assert sweep["config"]["progress"]["lambda_fixed"] == 1e3
    assert 0.0 <= default["head_mae"] <= 1.0
    assert set(default["alignment"]) >= {"kendall_tau", "kendall_tau_wild",
                                         "phase_classification", "enclosed_area_error"}
    assert set(default["alignment_minus_none"]) == set(default["alignment"])
    assert default["seconds"]["total"] > 0
    assert saved["environment"]["torch"] and saved["overrides"]["set"]["data.tasks"] == ["tent"]


def test_baselines_finite(bench):
    _, result = bench
    base = result["baselines"]
    assert set(base) == {"constant_0.5", "frame_count", "random", "ridge", "gru"}
    for name, entry in base.items():
        assert math.isfinite(entry["mae"]) and 0.0 <= entry["mae"] <= 1.0, name
    # the same foreground frames for every predictor
    frames = {entry["metrics"]["mae"]["frames"] for entry in base.values()}
    assert len(frames) == 1
    assert result["trivial_floor"] == min(base["constant_0.5"]["mae"], base["frame_count"]["mae"])


def test_table_has_every_row(bench):
    out, result = bench
    text = (out / pq.FILES["md"]).read_text()
    assert text.strip().endswith(result["table"].strip())
    first = result["table"].split("\n\nSweep:")[0]
    rows = [line for line in first.splitlines() if line.startswith("| ")][1:]
    assert [r.split(" | ")[0][2:] for r in rows] == ["lav", *pq.BASELINE_TITLES.values()]
    assert "| lav progress.lambda_fixed=1e3 |" in result["table"]


def _fabricated(n_videos: int, seed: int, dim: int = 6):
    """Videos whose feature 0 is the action-level progress on foreground frames (noise
    elsewhere and on background)."""
    rng = np.random.default_rng(seed)
    arrays, anns = [], []
    for v in range(n_videos):
        segs = [("0", int(rng.integers(2, 6)))]
        for lab in ("1", "2", "3"):
            segs += [(lab, int(rng.integers(3, 15))), ("0", int(rng.integers(1, 5)))]
        ann = annotation(segs, handle=f"v{v}")
        x = rng.uniform(0, 1, size=(ann.num_frames, dim)).astype(np.float32)
        idx, gt = pq.foreground_targets(ann)
        x[idx, 0] = gt
        arrays.append(x)
        anns.append(ann)
    return pq.SplitData(arrays, anns)


def test_foreground_targets():
    ann = annotation([("0", 2), ("a", 3), ("0", 1), ("b", 1)])
    idx, gt = pq.foreground_targets(ann)
    assert idx.tolist() == [2, 3, 4, 6]
    np.testing.assert_allclose(gt, [1 / 3, 2 / 3, 1.0, 1.0])


def test_ridge_recovers_linear_progress():
    train, val, test = _fabricated(12, 0), _fabricated(3, 1), _fabricated(4, 2)
    res = pq.ridge_probe(train, val, test, transform="none")
    assert res["mae"] < 0.02
    assert res["alpha"] in pq.RIDGE_ALPHAS and set(res["val_mae"]) == {
        f"{a:g}" for a in pq.RIDGE_ALPHAS}
    # no validation videos: RidgeCV on the training frames picks alpha
    res_cv = pq.ridge_probe(train, None, test, transform="none")
    assert res_cv["mae"] < 0.02 and res_cv["alpha_chosen_by"].startswith("RidgeCV")


def test_ridge_scores_like_the_metric_code():
    """The probe's MAE is `progress_metrics` on its clipped per-frame predictions."""
    train, test = _fabricated(8, 3), _fabricated(3, 4)
    res = pq.ridge_probe(train, None, test, transform="log1p")
    assert 0.0 <= res["mae"] <= 1.0
    const = pq.score([np.full(a.num_frames, 0.5) for a in test.annotations], test.annotations)
    assert res["mae"] < pq.headline(const)


def test_gru_baseline_finite_and_deterministic(one_thread):
    train, test = _fabricated(6, 5), _fabricated(2, 6)
    a = pq.gru_baseline(train, test, steps=15, batch=8, hidden=16, seed=3)
    b = pq.gru_baseline(train, test, steps=15, batch=8, hidden=16, seed=3)
    assert math.isfinite(a["mae"]) and 0.0 <= a["mae"] <= 1.0
    assert a["mae"] == b["mae"] and a["train_segments"] == 18


def test_results_table_and_errors():
    def run(name, variant, mae, tau, method="lav", value=None):
        return {"name": name, "method": method, "variant": variant, "value": value,
                "head_mae": mae, "seconds": {"total": 3.0},
                "alignment": {"kendall_tau": tau, "kendall_tau_wild": 0.5,
                              "phase_classification": 0.7, "enclosed_area_error": 0.2}}

    base = {"constant_0.5": {"mae": 0.25}, "frame_count": {"mae": 0.2}}
    runs = [run("lav", "default", 0.1, 0.4), run("lav none", "none", None, 0.3),
            {"name": "tcc", "method": "tcc", "variant": "default", "value": None,
             "error": "boom", "seconds": {"total": 1.0}},
            run("lav k=1", "sweep", 0.3, None, value="1")]
    text = pq.results_table(runs, base)
    lines = text.splitlines()
    assert lines[2] == ("| lav | 0.1000 | 0.500 | 0.400 | 0.300 | 0.500 | 0.700 | 0.700 | "
                        "0.200 | 0.200 | 3 |")
    assert lines[3].startswith("| tcc | error |")
    assert "| constant 0.5 | 0.2500 | 1.250 |" in text
    assert "| lav k=1 | 0.3000 | 1.500 | n/a |" in text.split("Sweep:")[1]
    assert all(len(line.split("|")) == len(pq.COLUMNS) + 2 for line in lines if line[:1] == "|")
    # the sweep plot skips points without a tau; the bar plot draws an error run as a gap
    for fig in (pq.sweep_figure(runs, "k"), pq.mae_figure(runs, base)):
        assert png_bytes(fig).startswith(b"\x89PNG")


def test_parse_sweep():
    assert pq.parse_sweep("progress.lambda_fixed=1e3, 1e6") == ("progress.lambda_fixed",
                                                                ["1e3", "1e6"])
    assert pq.parse_sweep(None) is None
    with pytest.raises(pq.ConfigError, match="KEY=v1,v2"):
        pq.parse_sweep("progress.lambda_fixed")
