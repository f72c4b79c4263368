"""`alignprog data annotate`: a CSV of segments becomes dataset.json + id2action.txt that the
loader reads back segment for segment; bad rows are one-line errors naming the line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from alignprog.cli import app
from alignprog.config import DataConfig
from alignprog.data import load_dataset
from alignprog.data.annotate import write_annotations
from alignprog.errors import DataError

BG = ["0", "SIL", "background"]
CSV = """task,video,start,end,label
coffee,v01,12,40,grind beans
coffee,v01,0,11,SIL
coffee,v01,41,70,pour water
coffee,v02,5,30,grind beans
coffee,v02,31,49,pour water
tea,t01,0,9,boil
tea,t01,20,29,steep
tea,t02,0,19,boil
"""
LENGTHS = {"v01": 71, "v02": 50, "t01": 30, "t02": 20}


def _root(tmp_path: Path, text: str = CSV) -> tuple[Path, Path]:
    root = tmp_path / "root"
    (root / "features").mkdir(parents=True)
    for video, n in LENGTHS.items():
        np.save(root / "features" / f"{video}.npy", np.zeros((n, 4), np.float32))
    csv = tmp_path / "segments.csv"
    csv.write_text(text)
    return root, csv


def test_written_annotations_load_back_with_gaps_as_background(tmp_path: Path):
    root, csv = _root(tmp_path)
    counts = write_annotations(csv, root, background=BG)
    assert counts == {"tasks": 2, "videos": 4, "segments": 8, "actions": 4}
    vocab = (root / "id2action.txt").read_text().splitlines()
    assert vocab == ["0 background", "1 grind beans", "2 pour water", "3 boil", "4 steep"]
    raw = json.loads((root / "dataset.json").read_text())
    # v02 starts with a gap (0-4) and t01 has one (10-19): both background
    assert raw["coffee"]["hdl_actions"][1] == ["0", "1", "2"]
    assert raw["coffee"]["hdl_start_times"][1] == [0, 5, 31]
    assert raw["tea"]["hdl_actions"][0] == ["3", "0", "4"]
    assert raw["tea"]["hdl_end_times"][0] == [9, 19, 29]
    ds = load_dataset(DataConfig(root=root))
    by_handle = {v.handle: v.annotation for v in ds.videos}
    v01 = by_handle["v01"]
    assert v01.num_frames == 71 and list(v01.starts) == [0, 12, 41]
    assert [bool(x) for x in v01.is_foreground] == [False, True, True]


@pytest.mark.parametrize("text,words", [
    ("task,video,start,label\nc,v,0,a\n", "missing column(s) end"),
    (CSV + "coffee,v03,zero,4,a\n", "line 10: start and end must be integers"),
    (CSV + "coffee,v03,5,4,a\n", "line 10: the segment [5, 4] is empty"),
    (CSV + "coffee,v01,40,45,a\n", "overlap"),
    (CSV + "tea,v01,80,90,a\n", "listed under tasks 'coffee' and 'tea'"),
    (CSV + "coffee,../x,0,4,a\n", "not a plain file name"),
    (CSV + "coffee,v09,0,4,\n", "line 10: task, video and label must not be empty"),
    (CSV + 'coffee,v09,0,4,"two\nlines"\n', "printable text on one line"),
    (CSV + "coffee,v09,0,4,a,extra\n", "1 more cell(s) than the header"),
    ("task,video,start,end,label,label\nc,v,0,4,a,b\n", "label named twice"),
    (CSV + "coffee,v01,71,80,late\n", "ends past its last feature frame (70)"),
    ("task,video,start,end,label\n", "no segments"),
])
def test_bad_rows_are_one_line_errors(tmp_path: Path, text, words):
    root, csv = _root(tmp_path, text)
    with pytest.raises(DataError) as err:
        write_annotations(csv, root, background=BG)
    assert words in str(err.value) and "\n" not in str(err.value)
    assert not (root / "dataset.json").exists()


def test_cli_writes_refuses_to_replace_and_check_reads_it(tmp_path: Path):
    root, csv = _root(tmp_path)
    runner = CliRunner()
    res = runner.invoke(app, ["data", "check", str(root)])
    assert res.exit_code != 0 and "alignprog data annotate" in res.output   # the hint
    res = runner.invoke(app, ["data", "annotate", str(csv), str(root)])
    assert res.exit_code == 0, res.output
    assert "2 tasks, 4 videos, 8 segments, 4 actions" in res.output
    res = runner.invoke(app, ["data", "annotate", str(csv), str(root)])
    assert res.exit_code != 0 and "--overwrite" in res.output
    assert runner.invoke(app, ["data", "annotate", str(csv), str(root),
                               "--overwrite"]).exit_code == 0
    res = runner.invoke(app, ["data", "check", str(root)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["data", "annotate", str(tmp_path / "missing.csv"), str(root)])
    assert res.exit_code != 0 and "segments file not found" in res.output


def test_bom_crlf_and_capitalised_headers_are_read(tmp_path: Path):
    text = "\ufeff" + CSV.replace("task,video,start,end,label", "Task,Video,Start,End,Label")
    root, csv = _root(tmp_path, text.replace("\n", "\r\n"))
    assert write_annotations(csv, root, background=BG)["segments"] == 8


def test_frames_after_the_last_segment_are_background(tmp_path: Path):
    root, csv = _root(tmp_path)
    np.save(root / "features" / "t02.npy", np.zeros((35, 4), np.float32))   # 15 frames more
    write_annotations(csv, root, background=BG)
    raw = json.loads((root / "dataset.json").read_text())["tea"]
    assert raw["hdl_actions"][1] == ["3", "0"] and raw["hdl_end_times"][1] == [19, 34]
    assert load_dataset(DataConfig(root=root)).videos   # no length repair needed


def test_other_background_labels_are_written_as_they_are_read(tmp_path: Path):
    root, csv = _root(tmp_path)
    write_annotations(csv, root, background=["SIL"])
    raw = json.loads((root / "dataset.json").read_text())
    assert raw["coffee"]["hdl_actions"][1] == ["SIL", "1", "2"]
    assert not (root / "id2action.txt").read_text().startswith("0 ")
    ds = load_dataset(DataConfig(root=root, background_labels=["SIL"]))
    v02 = next(v.annotation for v in ds.videos if v.handle == "v02")
    assert [bool(x) for x in v02.is_foreground] == [False, True, True]


def test_a_root_that_is_a_file_is_a_one_line_error(tmp_path: Path):
    _, csv = _root(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataError, match="Not a directory|cannot write the annotation files"):
        write_annotations(csv, tmp_path / "file", background=BG)
