"""One option vocabulary across the commands: --out, --dataset, --split train|val|test and the
dtype names fp32|bf16|fp16, with the older spellings (positional paths, numpy dtype names) still
accepted and bad values refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from alignprog.cli import app
from alignprog.cli.common import dtype_choice, split_choice

from helpers import stderr_of, tiny_run

runner = CliRunner()
SMALL = ["--tasks", "2", "--videos-per-task", "4", "--dim", "8", "--seed", "3"]


def ok(*args: str):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def one_line_error(args: list, message: str, code: int = 2) -> str:
    """The command fails with `code` and exactly one stderr line, `error: ...message...`."""
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == code, (args, result.output)
    err = stderr_of(result).strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert "Traceback" not in result.output and "╭" not in result.output
    return err[0]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A small synthetic root written with the new spelling, --out."""
    out = tmp_path_factory.mktemp("vocab") / "synth"
    ok("data", "synth", "--out", out, *SMALL)
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    return tiny_run(tmp_path_factory.mktemp("runs"), 2)[0]


# ----------------------------------------------------------------------------------------------
# The value parsers


def test_dtype_aliases_parse_case_insensitively():
    parse = dtype_choice("fp32", "bf16", "fp16")["parser"]
    for given, want in (("fp32", "fp32"), ("FP16", "fp16"), ("float32", "fp32"),
                        ("Float16", "fp16"), ("bfloat16", "bf16"), (" bf16 ", "bf16")):
        assert parse(given) == want, given
    assert dtype_choice("fp16", "fp32")["metavar"] == "<fp32|fp16>"   # the order of DTYPES
    assert split_choice()["metavar"] == "<train|val|test>"
    assert split_choice()["parser"]("VAL") == "val"
    assert split_choice()["autocompletion"]("t") == ["train", "test"]


# ----------------------------------------------------------------------------------------------
# --out and --dataset, and the positional forms they replace


def test_synth_out_and_the_positional_write_the_same_root(root: Path, tmp_path: Path):
    ok("data", "synth", tmp_path / "old", *SMALL)
    ok("data", "synth", tmp_path / "both", "--out", tmp_path / "both", *SMALL)  # the same path
    for other in ("old", "both"):
        assert (tmp_path / other / "dataset.json").read_text() == \
            (root / "dataset.json").read_text()
    one_line_error(["data", "synth", *SMALL], "missing --out")
    one_line_error(["data", "synth", tmp_path / "a", "--out", tmp_path / "b", *SMALL],
                   "give --out alone")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    (tmp_path / "file").write_text("x")
    err = one_line_error(["data", "synth", "--out", tmp_path / "file", *SMALL],
                         "choose another --out", code=1)
    assert "OUT_DIR" not in err


def test_check_and_sample_inspect_read_dataset_or_the_positional(root: Path):
    for cmd in (["data", "check", "--json", "--no-scan"], ["sample-inspect", "--json"]):
        new = ok(*cmd, "--dataset", root).stdout
        assert ok(*cmd, root).stdout == new
        assert ok(*cmd, root, "--dataset", root).stdout == new
        assert ok(*cmd).stdout != new                  # unset: the synthetic default
        one_line_error([*cmd, root, "--dataset", root.parent], "give --dataset alone")
    assert json.loads(ok("data", "check", "--dataset", root, "--json").stdout)["name"] == "synth"


def test_annotate_dataset_and_the_positional(tmp_path: Path):
    csv = tmp_path / "segments.csv"
    csv.write_text("task,video,start,end,label\nc,v1,0,9,a\nc,v1,10,29,b\nc,v2,0,19,a\n")
    new, old = tmp_path / "new", tmp_path / "old"
    assert "1 tasks, 2 videos" in ok("data", "annotate", csv, "--dataset", new).stdout
    ok("data", "annotate", csv, old)
    for name in ("dataset.json", "id2action.txt"):
        assert (new / name).read_text() == (old / name).read_text()
    one_line_error(["data", "annotate", csv], "missing --dataset")
    one_line_error(["data", "annotate", csv, old, "--dataset", new], "give --dataset alone")


def test_extract_features_out_and_dtype_alias(tmp_path: Path):
    from test_extract import write_video

    videos = tmp_path / "videos"
    videos.mkdir()
    write_video(videos / "a.mp4", 30, 30)
    out = tmp_path / "root"
    result = ok("extract-features", videos, "--out", out, "--weights", "random",
                "--dtype", "float32", "--json")
    assert json.loads(result.stdout)["done"] == 1
    assert np.load(out / "features" / "a.npy").dtype == np.float32
    assert json.loads((out / "manifest.json").read_text())["settings"]["dtype"] == "fp32"
    # The older positional root resumes the same root; other settings are refused naming --out.
    assert json.loads(ok("extract-features", videos, out, "--weights", "random", "--dtype",
                         "fp32", "--json").stdout)["skipped"] == 1
    err = one_line_error(["extract-features", videos, "--out", out, "--weights", "random"],
                         "another --out")
    assert "OUT_ROOT" not in err
    one_line_error(["extract-features", videos, "--weights", "random"], "missing --out")
    one_line_error(["extract-features", videos, out, "--out", tmp_path / "x"], "give --out alone")
    one_line_error(["extract-features", videos, "--out", out, "--dtype", "bf16"],
                   "--dtype must be one of fp32, fp16, got 'bf16'")


# ----------------------------------------------------------------------------------------------
# dtype and split values


def test_synth_dtype_names_and_aliases(tmp_path: Path):
    for given, want in (("fp16", np.float16), ("float16", np.float16), ("FP32", np.float32),
                        ("float32", np.float32)):
        out = tmp_path / given
        result = ok("data", "synth", "--out", out, *SMALL, "--dtype", given)
        assert f", {np.dtype(want).name.replace('float', 'fp')}," in result.stdout
        assert np.load(next((out / "features").glob("*.npy"))).dtype == want, given
    one_line_error(["data", "synth", "--out", tmp_path / "x", "--dtype", "bf16"],
                   "--dtype must be one of fp32, fp16, got 'bf16'")
    assert not (tmp_path / "x").exists()


def test_export_dtype_aliases(run: Path, tmp_path: Path):
    for given, want in (("bf16", "bf16"), ("float16", "fp16"), ("FP32", "fp32")):
        result = ok("export", run, "--out", tmp_path / given, "--checkpoint", "last",
                    "--dtype", given, "--json")
        assert json.loads(result.stdout)["dtype"] == want, given
    one_line_error(["export", run, "--out", tmp_path / "x", "--dtype", "int8"],
                   "--dtype must be one of fp32, bf16, fp16, got 'int8'")


@pytest.mark.parametrize("cmd", [["sample-inspect"], ["eval-progress", "runs/none"]])
def test_split_bogus_is_a_one_line_error(cmd):
    one_line_error([*cmd, "--split", "bogus"],
                   "--split must be one of train, val, test, got 'bogus'")


def test_split_is_case_insensitive(root: Path, run: Path):
    rep = json.loads(ok("sample-inspect", "--dataset", root, "--split", "VAL", "--json").stdout)
    assert rep["settings"]["split"] == "val"
    result = ok("eval-progress", run, "--split", "Val", "--device", "cpu", "--json")
    assert json.loads(result.stdout)["split"] == "val"


# ----------------------------------------------------------------------------------------------
# --help: the new spellings, one set of dtype names, an example of each


@pytest.mark.parametrize("cmd, shown, example", [
    (["data", "synth"], ["--out", "<fp32|fp16>"], "alignprog data synth --out "),
    (["data", "check"], ["--dataset"], "alignprog data check --dataset "),
    (["data", "annotate"], ["--dataset"], "--dataset data/"),
    (["sample-inspect"], ["--dataset", "<train|val|test>", "--plot", "one PNG"],
     "alignprog sample-inspect --dataset "),
    (["eval-progress"], ["<train|val|test>", "--plots", "several PNG"], "--plots figures/"),
    (["extract-features"], ["--out", "<fp32|fp16>"], "alignprog extract-features videos/ --out "),
    (["export"], ["--out", "<fp32|bf16|fp16>"], "--dtype bf16"),
    (["predict"], ["--plot", "one PNG"], "--plot progress.png"),
])
def test_help_shows_the_vocabulary(cmd, shown, example):
    result = runner.invoke(app, [*cmd, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for text in shown:
        assert text in result.output, (cmd, text)
    assert example in result.output, cmd
    assert "float16" not in result.output and "float32" not in result.output, cmd
    assert "OUT_ROOT" not in result.output and "OUT_DIR" not in result.output, cmd
