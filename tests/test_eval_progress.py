"""`alignprog eval-progress` through the CLI, on a tiny run trained for a few steps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from alignprog.cli import app
from alignprog.config import load_config
from alignprog.training.loop import fit
from alignprog.errors import AlignprogError
from alignprog.training.restore import load_trained_model, open_run, resolve_checkpoint
from alignprog.training.rundir import RunDir

from helpers import TINY

runner = CliRunner()

TINY = TINY | {"train.steps": 4}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    fit(load_config(overrides=TINY), run=RunDir.create(root, "r"))
    return root / "r"


@pytest.fixture
def run_copy(trained_run: Path, tmp_path: Path) -> Path:
    """A private copy, so tests that write reports never see each other's files."""
    return Path(shutil.copytree(trained_run, tmp_path / "r"))


def invoke(*args: str):
    return runner.invoke(app, ["eval-progress", *args])


def test_val_reproduces_what_train_logged_for_the_checkpoint(run_copy: Path):
    epochs = [r for r in RunDir.open(run_copy).read_metrics() if r["kind"] == "epoch"]
    logged = epochs[-1]
    result = invoke(str(run_copy), "--split", "val", "--checkpoint", "last", "--json",
                    "--device", "cpu")
    assert result.exit_code == 0, result.output
    rep = json.loads(result.stdout)
    assert rep["checkpoint"]["step"] == logged["step"]
    assert rep["split"] == "val"
    got = {name: entry["metrics"]["mae"]["mean_over_videos"]
           for name, entry in rep["predictors"].items()}
    assert set(logged["val_progress_mae"]) == {"head", "constant_0.5", "frame_count"}
    for name, value in logged["val_progress_mae"].items():
        assert got[name] == value, name  # exactly, not approximately
    # The report is saved in the run, equal to what was printed.
    assert RunDir.open(run_copy).read_json("evaluation_val.json") == rep


def test_test_split_equals_the_report_train_wrote(run_copy: Path):
    trained = RunDir.open(run_copy).read_json("eval_test.json")
    result = invoke(str(run_copy), "--checkpoint", "last", "--json", "--device", "cpu",
                    "--baselines", "constant_0.5,frame_count")
    assert result.exit_code == 0, result.output
    rep = json.loads(result.stdout)
    assert rep["predictors"].keys() >= trained["predictors"].keys()
    for name, entry in trained["predictors"].items():
        assert rep["predictors"][name] == entry, name
    for key in ("split", "split_sha256", "counts", "convention", "ground_truth", "dataset"):
        assert rep[key] == trained[key], key
    assert rep["priors"]["frame_count"] == trained["priors"]["frame_count"]
    # The extras: cumulative_l2 (clipped, raw, offline) and the video-level OGPE.
    assert {"cumulative_l2", "cumulative_l2_raw", "cumulative_l2_offline"} <= set(rep["predictors"])
    assert rep["priors"]["cumulative_l2"]["split"] == "train"
    vl = rep["video_level"]
    assert vl["normaliser"]["split"] == "train"
    assert {"cumulative_geodesic", "frame_count", "constant_0.5"} == set(vl["predictors"])
    assert rep["trained_predictor"]["predictor"] == "head"
    assert rep["protocol"] and rep["checkpoint"]["requested"] == "last"


def test_tables_render_and_report_is_written(run_copy: Path):
    result = invoke(str(run_copy), "--device", "cpu")
    assert result.exit_code == 0, result.output
    out = result.stdout
    for text in ("action-level progress error on the test split", "per task",
                 "video-level OGPE", "head", "cumulative_l2", "constant_0.5", "frame_count",
                 "random", "protocol", "sha256", "checkpoint", "counts", "synth_t0"):
        assert text in out, text
    saved = RunDir.open(run_copy).read_json("evaluation_test.json")
    assert saved["checkpoint"]["requested"] == "best" and "video_level" in saved
    # best (by validation loss), else the latest: the tiny val split forms no loss batch.
    assert saved["checkpoint"]["path"] == str(resolve_checkpoint(run_copy, "best"))


def test_tables_are_not_truncated_when_piped_narrow(run_copy: Path):
    """Piped output (CliRunner) with COLUMNS=40: every cell of every table prints whole."""
    result = runner.invoke(app, ["eval-progress", str(run_copy), "--device", "cpu",
                                 "--alignment"], env={"COLUMNS": "40"})
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "…" not in out
    rep = RunDir.open(run_copy).read_json("evaluation_test.json")
    rows = {line.split("│")[1].strip(): line
            for line in out.splitlines() if line.count("│") > 3}
    head = rep["predictors"]["head"]["metrics"]
    # the head's row of the main table holds its MAEs, formatted as the table does (4 places)
    for value in (head["mae"]["mean_over_videos"], head["mae"]["pooled"],
                  head["mae"]["mean_over_tasks"]):
        assert f"{value:.4f}" in rows["head"], value
    for name in ("cumulative_l2_offline", "constant_0.5", "frame_count", "synth_t0",
                 "cumulative_geodesic (clipped)"):
        assert name in rows, name


def test_plots_are_png_files(run_copy: Path, tmp_path: Path):
    out = tmp_path / "figs"
    result = invoke(str(run_copy), "--split", "val", "--plots", str(out), "--json",
                    "--device", "cpu")
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in out.iterdir())
    assert files == ["error_by_bin.png", "progress_curves.png"]
    for name in files:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    # The per-frame curves feed the plots but stay out of the report.
    assert "curves" not in json.loads(result.stdout)


def test_alignment_section(run_copy: Path):
    result = invoke(str(run_copy), "--alignment", "--device", "cpu", "--baselines",
                    "constant_0.5")
    try:
        from alignprog.evaluation.alignment import evaluate_alignment  # noqa: F401
    except ImportError:
        assert result.exit_code != 0
        assert "--alignment" in result.output and "Traceback" not in result.output
        return
    assert result.exit_code == 0, result.output
    assert "alignment" in result.stdout
    assert "alignment" in RunDir.open(run_copy).read_json("evaluation_test.json")


@pytest.mark.parametrize("args, message", [
    (["{missing}"], "no run directory"),
    (["{empty}"], "no checkpoint"),
    (["{run}", "--split", "dev"], "--split must be one of"),
    (["{run}", "--checkpoint", "step-99999999"], "no such checkpoint"),
    (["{run}", "--checkpoint", "{broken}"], "cannot"),
    (["{run}", "--baselines", "constant_7"], "--baselines"),
    (["{run}", "--device", "tpu"], "device"),
    (["{run}", "--alignment", "--split", "train"], "train"),
])
def test_bad_inputs_give_one_line_errors(run_copy: Path, tmp_path: Path, args, message):
    empty = tmp_path / "empty"
    (empty / "checkpoints").mkdir(parents=True)
    broken = tmp_path / "broken"
    shutil.copytree(RunDir.open(run_copy).latest_checkpoint(), broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    paths = {"missing": tmp_path / "nope", "empty": empty, "run": run_copy, "broken": broken}
    extra = [] if "--device" in args else ["--device", "cpu"]
    result = invoke(*(a.format(**paths) for a in args), *extra)
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error:") and message in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_open_run_restores_model_config_and_the_run_split(run_copy: Path, tmp_path: Path):
    opened = open_run(run_copy, checkpoint="last")
    assert opened.run.path == run_copy
    assert opened.checkpoint == resolve_checkpoint(run_copy, "last")
    assert opened.device.type == "cpu" and opened.state["step"] == 4
    cfg, model, _ = load_trained_model(opened.checkpoint)
    assert opened.config == cfg and not opened.model.training
    ours = opened.model.state_dict()
    assert all(torch.equal(ours[k], v) for k, v in model.state_dict().items())
    # The run's split.json, not whatever the config would draw today; read on first access.
    assert opened.data_config.split.file == opened.run.split_path
    assert "dataset" not in vars(opened)
    ds = opened.dataset
    assert ds is opened.dataset
    assert ds.splits.sha256() == RunDir.open(run_copy).read_json("eval_test.json")["split_sha256"]
    # Another root is only recorded: nothing is read before `dataset` is asked for.
    other = open_run(run_copy, dataset=tmp_path / "elsewhere")
    assert other.data_config.root == tmp_path / "elsewhere"
    assert other.checkpoint == resolve_checkpoint(run_copy, "best")


@pytest.mark.parametrize("kwargs, message", [
    ({"run_dir": "{missing}"}, "no run directory"),
    ({"checkpoint": "step-99999999"}, "no such checkpoint"),
    ({"device": "tpu"}, "is not a device"),
])
def test_open_run_errors_are_one_line(run_copy: Path, tmp_path: Path, kwargs, message):
    kwargs = {"run_dir": run_copy} | kwargs
    if kwargs["run_dir"] == "{missing}":
        kwargs["run_dir"] = tmp_path / "nope"
    with pytest.raises(AlignprogError, match=message) as info:
        open_run(**kwargs)
    assert "\n" not in str(info.value)


def test_help_documents_every_option():
    result = runner.invoke(app, ["eval-progress", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for option in ("--split", "--dataset", "--checkpoint", "--device", "--alignment", "--json",
                   "--plots", "--baselines"):
        assert option in result.output
    assert "alignprog eval-progress runs/" in result.output


def test_dataset_override_reads_the_same_videos_from_a_root(run_copy: Path, tmp_path: Path):
    from alignprog.data.write import write_synthetic_root

    cfg = load_config(overrides=TINY)
    root = tmp_path / "root"
    write_synthetic_root(cfg.data, root, layouts=["features"])
    base = invoke(str(run_copy), "--split", "val", "--json", "--device", "cpu")
    other = invoke(str(run_copy), "--split", "val", "--json", "--device", "cpu",
                   "--dataset", str(root))
    assert base.exit_code == 0 and other.exit_code == 0, other.output
    a, b = json.loads(base.stdout), json.loads(other.stdout)
    assert b["split_sha256"] == a["split_sha256"]
    assert b["predictors"]["head"] == a["predictors"]["head"]
    assert b["dataset"] == "root"


PHASE_TEXT = ("reading the dataset", "head predictions", "writing the report")


def test_json_stays_clean_and_phases_are_off_when_stderr_is_not_a_terminal(run_copy: Path,
                                                                           tmp_path: Path):
    result = invoke(str(run_copy), "--split", "val", "--json", "--device", "cpu",
                    "--plots", str(tmp_path / "figs"))
    assert result.exit_code == 0, result.output
    rep = json.loads(result.stdout)  # the whole of stdout is the report
    assert rep["split"] == "val"
    for text in PHASE_TEXT:
        assert text not in result.stdout and text not in result.stderr, text
    assert "\x1b" not in result.stdout and "\x1b" not in result.stderr


def test_phases_show_on_a_terminal_stderr_only(run_copy: Path, monkeypatch):
    import io

    from rich.console import Console

    import alignprog.cli.eval_progress as mod

    buf = io.StringIO()
    monkeypatch.setattr(mod, "err_console", Console(file=buf, force_terminal=True, width=120))
    result = invoke(str(run_copy), "--split", "val", "--json", "--device", "cpu",
                    "--alignment")
    assert result.exit_code == 0, result.output
    json.loads(result.stdout)
    shown = buf.getvalue()
    for text in (*PHASE_TEXT, "alignment metrics"):
        assert text in shown, text
        assert text not in result.stdout, text


def test_plots_say_how_many_curves_were_drawn(run_copy: Path, tmp_path: Path):
    from alignprog.cli.eval_progress import PLOT_VIDEOS

    result = invoke(str(run_copy), "--split", "val", "--json", "--device", "cpu",
                    "--plots", str(tmp_path / "figs"))
    assert result.exit_code == 0, result.output
    videos = json.loads(result.stdout)["counts"]["videos"]
    drawn = min(videos, PLOT_VIDEOS)
    note = f"progress curves of {drawn} video"
    assert (note in result.stderr) == (drawn < PLOT_VIDEOS), result.stderr
    assert "note" not in result.stdout
    help_text = " ".join(runner.invoke(app, ["eval-progress", "--help"]).stdout.split())
    assert f"up to {PLOT_VIDEOS} videos" in help_text
