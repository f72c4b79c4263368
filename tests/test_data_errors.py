"""Malformed dataset roots: `alignprog data check` and `load_dataset` report each problem clearly.

Every case starts from a valid tiny root (2 tasks x 3 videos, D = 8, 20-37 frames, with
id2action.txt), breaks one thing, and checks that:

* the exit code is non-zero (1 for data problems, 2 for config problems);
* the problem is one line on stderr, ``error: <file>: task '<task>', handle '<handle>': <what>``,
  naming the right file / task / handle and saying what is wrong;
* no Python exception escapes (no traceback).

The tests named ``test_bug_*`` are regressions for library bugs found while writing this file.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import traceback
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from typer.testing import CliRunner

from alignprog.cli import app
from alignprog.config import DataConfig
from alignprog.data.dataset import DatasetErrors, load_dataset, read_npy_header, scan_arrays
from alignprog.errors import DataError

# ----------------------------------------------------------------------------------------------
# A valid tiny root

TASKS = ("t0", "t1")
VIDEOS_PER_TASK = 3
DIM = 8
VOCAB = "0 background\n1 crack egg\n2 whisk\n3 pour\n4 flip\n"


def video_length(task_index: int, video_index: int) -> int:
    """t0: 20, 27, 34 frames; t1: 23, 30, 37 frames."""
    return 20 + 7 * video_index + 3 * task_index


def make_root(base: Path, name: str = "root") -> Path:
    """Write a valid dataset root under `base` and return it.

    Handles are ``t<i>_v<j>``; every video has three segments labelled 0 (background), then two
    actions of its task (t0: 1, 2; t1: 3, 4), with shared boundaries: for T frames, starts
    ``[0, T//4, T//2]`` and ends ``[T//4, T//2, T-1]``. Features are float32 except ``t1_v2``
    (float16), so both accepted dtypes are covered.
    """
    root = base / name
    (root / "features").mkdir(parents=True)
    rng = np.random.default_rng(0)
    data = {}
    for ti, task in enumerate(TASKS):
        record = {"handles": [], "hdl_actions": [], "hdl_start_times": [], "hdl_end_times": []}
        for vi in range(VIDEOS_PER_TASK):
            handle = f"{task}_v{vi}"
            n = video_length(ti, vi)
            a, b = n // 4, n // 2
            record["handles"].append(handle)
            record["hdl_actions"].append(["0", str(2 * ti + 1), str(2 * ti + 2)])
            record["hdl_start_times"].append([0, a, b])
            record["hdl_end_times"].append([a, b, n - 1])
            dtype = np.float16 if handle == "t1_v2" else np.float32
            np.save(root / "features" / f"{handle}.npy",
                    rng.standard_normal((n, DIM)).astype(dtype))
        data[task] = record
    (root / "dataset.json").write_text(json.dumps(data, indent=1), encoding="utf-8")
    (root / "id2action.txt").write_text(VOCAB, encoding="utf-8")
    return root


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_root(tmp_path)


def feature_path(root: Path, handle: str) -> Path:
    return root / "features" / f"{handle}.npy"


def edit_annotations(root: Path, change: Callable[[dict], None]) -> None:
    path = root / "dataset.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    change(data)
    path.write_text(json.dumps(data), encoding="utf-8")


# ----------------------------------------------------------------------------------------------
# Running the CLI

runner = CliRunner()
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Run:
    """A finished `alignprog` invocation with its stderr split into error / warning lines."""

    def __init__(self, result) -> None:
        self.result = result
        self.code = result.exit_code
        self.output = ANSI.sub("", result.output)
        try:  # typer >= 0.14 / click >= 8.2 keep stderr apart (output holds both)
            self.stderr = ANSI.sub("", result.stderr)
            self.stdout = ANSI.sub("", result.stdout)
        except (ValueError, AttributeError):  # older runners mix stderr into output
            self.stderr, self.stdout = self.output, ""
        lines = self.stderr.splitlines() or self.output.splitlines()
        self.errors = [ln for ln in lines if ln.startswith("error: ")]
        self.warnings = [ln for ln in lines if ln.startswith("warning: ")]


def assert_no_traceback(result) -> None:
    exc = result.exception
    if exc is not None and not isinstance(exc, SystemExit):
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        pytest.fail(f"an exception escaped the CLI:\n{tb}")
    assert "Traceback" not in result.output


def invoke(*args: str) -> Run:
    result = runner.invoke(app, [str(a) for a in args])
    assert_no_traceback(result)
    return Run(result)


def check(root: Path, *extra: str) -> Run:
    return invoke("data", "check", str(root), *extra)


def location(file: Path | str, task: str | None = None, handle: str | None = None) -> str:
    """The `file: task 'T', handle 'H': ` prefix of an error line."""
    where = []
    if task is not None:
        where.append(f"task '{task}'")
    if handle is not None:
        where.append(f"handle '{handle}'")
    return f"{file}: " + (", ".join(where) + ": " if where else "")


def assert_fails_with(run: Run, prefix: str, *words: str, code: int = 1) -> str:
    """Exit `code`, exactly one error line, starting with `prefix` and holding every word."""
    assert run.code == code, f"exit code {run.code}, output:\n{run.output}"
    assert len(run.errors) == 1, f"expected one error line, got:\n{run.stderr or run.output}"
    line = run.errors[0]
    assert line.startswith("error: " + prefix), line
    for word in words:
        assert word in line, f"{word!r} not in {line!r}"
    if run.stdout:
        assert "error:" not in run.stdout, "errors must go to stderr"
    return line


# ----------------------------------------------------------------------------------------------
# The valid root


def test_valid_root_passes(root: Path) -> None:
    run = check(root)
    assert run.code == 0, run.output
    assert run.errors == [] and run.warnings == []
    assert "t0" in run.output and "t1" in run.output


def test_valid_root_loads(root: Path) -> None:
    ds = load_dataset(DataConfig(root=root))
    assert ds.tasks == list(TASKS)
    assert len(ds.videos) == len(TASKS) * VIDEOS_PER_TASK
    assert [v.num_frames for v in ds.videos] == [20, 27, 34, 23, 30, 37]
    assert ds.vocabulary is not None and ds.vocabulary["3"] == "pour"
    assert scan_arrays(ds) == []
    assert ds.load(0).shape == (20, DIM)


# ----------------------------------------------------------------------------------------------
# Feature arrays (header problems are found at load, NaN/Inf by the full scan)


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


def _save(array: np.ndarray) -> Callable[[Path], None]:
    return lambda path: np.save(path, array, allow_pickle=array.dtype.hasobject)


def _bad_value(frame: int, value: float, dtype=np.float32) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        array = np.load(path).astype(dtype)
        array[frame, 3] = value
        np.save(path, array)
    return write


T = video_length(0, 1)  # t0_v1, the video every array case breaks

ARRAY_CASES = [
    ("missing", lambda p: p.unlink(), ["features file is missing"]),
    ("truncated", _truncate, ["truncated array", f"({T}, {DIM})", "float32"]),
    ("garbage", lambda p: p.write_bytes(b"this is not a numpy array\n" * 8),
     ["not a readable .npy array"]),
    ("zero-bytes", lambda p: p.write_bytes(b""), ["not a readable .npy array"]),
    ("header-only", lambda p: p.write_bytes(p.read_bytes()[:128]), ["truncated array"]),
    ("rank-1", _save(np.zeros((T,), np.float32)),
     ["expected a (T, D) array", f"got shape ({T},)"]),
    ("rank-3", _save(np.zeros((T, DIM, 1), np.float32)),
     ["expected a (T, D) array", f"got shape ({T}, {DIM}, 1)"]),
    ("dimension", _save(np.zeros((T, DIM + 1), np.float32)),
     [f"feature dimension ({DIM + 1},) differs from ({DIM},)", "other 5 videos"]),
    ("int64", _save(np.zeros((T, DIM), np.int64)), ["dtype int64", "float16 or float32"]),
    ("float64", _save(np.zeros((T, DIM), np.float64)), ["dtype float64", "float16 or float32"]),
    ("object", _save(np.full((T, DIM), None, dtype=object)), ["Python objects"]),
    ("empty-video", _save(np.zeros((0, DIM), np.float32)), ["empty video", "0 frames"]),
    ("nan", _bad_value(7, np.nan), ["NaN/Inf", "first at frame 7"]),
    ("inf", _bad_value(0, np.inf), ["NaN/Inf", "first at frame 0"]),
    ("-inf-last-frame", _bad_value(T - 1, -np.inf), ["NaN/Inf", f"first at frame {T - 1}"]),
    ("inf-float16", _bad_value(4, np.inf, np.float16), ["NaN/Inf", "first at frame 4"]),
]


@pytest.mark.parametrize("breaker, words", [pytest.param(b, w, id=i) for i, b, w in ARRAY_CASES])
def test_bad_feature_array(root: Path, breaker, words) -> None:
    path = feature_path(root, "t0_v1")
    breaker(path)
    run = check(root)
    assert_fails_with(run, location(path, "t0", "t0_v1"), *words)
    assert "1 problem(s) found" in run.stderr


def test_nan_is_not_reported_without_scan(root: Path) -> None:
    _bad_value(7, np.nan)(feature_path(root, "t0_v1"))
    assert check(root, "--no-scan").code == 0


def test_missing_features_folder(root: Path) -> None:
    shutil.rmtree(root / "features")
    assert_fails_with(check(root), location(root), "no 'features/' folder", "present: none")


# ----------------------------------------------------------------------------------------------
# Annotation JSON: one video's lists


def _set(task: str, i: int, key: str, value) -> Callable[[dict], None]:
    def change(data: dict) -> None:
        data[task][key][i] = value
    return change


def _set_item(task: str, i: int, key: str, k: int, value) -> Callable[[dict], None]:
    def change(data: dict) -> None:
        data[task][key][i][k] = value
    return change


def _no_segments(data: dict) -> None:
    for key in ("hdl_actions", "hdl_start_times", "hdl_end_times"):
        data["t0"][key][0] = []


def _decreasing_starts(data: dict) -> None:  # t1_v0: 23 frames, starts [0, 5, 11]
    data["t1"]["hdl_start_times"][0] = [0, 5, 4]


def _also_in_other_task(data: dict) -> None:
    for key in ("handles", "hdl_actions", "hdl_start_times", "hdl_end_times"):
        data["t1"][key].append(copy.deepcopy(data["t0"][key][0]))


ANNOTATION_CASES = [
    # id, change, task, handle, words
    ("inner-unequal", lambda d: d["t0"]["hdl_actions"][2].pop(), "t0", "t0_v2",
     ["unequal list lengths", "2 actions, 3 starts, 3 ends"]),
    ("end-before-start", _set_item("t0", 1, "hdl_end_times", 1, 5), "t0", "t0_v1",
     ["segment 1 ends before it starts", "start 6, end 5"]),
    ("decreasing-starts", _decreasing_starts, "t1", "t1_v0",
     ["starts must not decrease", "segment 2 starts at 4 after 5"]),
    ("unknown-label", _set_item("t1", 1, "hdl_actions", 1, "9"), "t1", "t1_v1",
     ["unknown label '9'", "vocabulary"]),
    ("label-not-string", _set_item("t1", 1, "hdl_actions", 2, 1.5), "t1", "t1_v1",
     ["label 1.5 must be a string"]),
    ("no-segments", _no_segments, "t0", "t0_v0", ["empty video", "no segments"]),
    ("float-frame", _set_item("t1", 2, "hdl_start_times", 1, 2.5), "t1", "t1_v2",
     ["start must be an integer frame", "2.5"]),
    ("string-frame", _set_item("t0", 1, "hdl_end_times", 0, "6"), "t0", "t0_v1",
     ["end must be an integer frame", "'6'"]),
    ("null-frame", _set_item("t0", 1, "hdl_end_times", 2, None), "t0", "t0_v1",
     ["end must be an integer frame", "None"]),
    ("negative-frame", _set_item("t0", 2, "hdl_start_times", 0, -1), "t0", "t0_v2",
     ["start must be in [0, 2**53)", "-1"]),
    ("entry-not-list", _set("t1", 0, "hdl_end_times", 22), "t1", "t1_v0",
     ["hdl_end_times entry must be a list", "int"]),
    ("handle-twice-in-task", _set("t0", 1, "handles", "t0_v0"), "t0", "t0_v0",
     ["handle listed twice"]),
    ("handle-in-two-tasks", _also_in_other_task, "t1", "t0_v0",
     ["also listed under task 't0'"]),
]


@pytest.mark.parametrize("change, task, handle, words",
                         [pytest.param(c, t, h, w, id=i) for i, c, t, h, w in ANNOTATION_CASES])
def test_bad_video_annotation(root: Path, change, task, handle, words) -> None:
    edit_annotations(root, change)
    run = check(root)
    assert_fails_with(run, location(root / "dataset.json", task, handle), *words)
    assert "1 problem(s) found" in run.stderr


def _drop_last(task: str, key: str) -> Callable[[dict], None]:
    return lambda data: data[task][key].pop()


TASK_CASES = [
    ("unequal-outer-lists", _drop_last("t1", "hdl_end_times"),
     ["unequal list lengths", "handles 3, hdl_actions 3, hdl_start_times 3, hdl_end_times 2",
      "--lenient"]),
    ("fewer-handles", _drop_last("t1", "handles"),
     ["unequal list lengths", "handles 2, hdl_actions 3", "--lenient"]),
    ("record-not-object", lambda d: d.__setitem__("t1", [1, 2]),
     ["task record must be an object", "list"]),
    ("record-lacks-key", lambda d: d["t1"].pop("hdl_start_times"),
     ["lacks 'hdl_start_times'"]),
    ("bad-handle-name", _set("t1", 1, "handles", "sub/t1_v1"),
     ["handle #1 must be a non-empty file name", "'sub/t1_v1'"]),
]


@pytest.mark.parametrize("change, words", [pytest.param(c, w, id=i) for i, c, w in TASK_CASES])
def test_bad_task_record(root: Path, change, words) -> None:
    edit_annotations(root, change)
    assert_fails_with(check(root), location(root / "dataset.json", "t1"), *words)


# ----------------------------------------------------------------------------------------------
# Whole files: annotation JSON, vocabulary, split file


def _write(name: str, text: str | bytes) -> Callable[[Path], None]:
    def write(root: Path) -> None:
        path = root / name
        path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    return write


SPLIT_TWICE = {"splits": {"t0": {"train": ["t0_v0", "t0_v1"], "val": [], "test": ["t0_v0"]}}}
SPLIT_UNKNOWN = {"splits": {"t0": {"train": ["t0_v0", "t0_v9"], "val": [], "test": []}}}
SPLIT_WRONG_TASK = {"splits": {"t0": {"train": ["t1_v0"], "val": [], "test": []}}}

FILE_CASES = [
    # id, setup, file name, task, handle, words
    ("json-syntax", _write("dataset.json", '{"t0": {"handles": ['), "dataset.json", None, None,
     ["unreadable JSON", "line 1"]),
    ("json-list", _write("dataset.json", '[{"handles": []}]'), "dataset.json", None, None,
     ["must be an object", "got a list"]),
    ("json-not-utf8", _write("dataset.json", b'{"t0": "\xff"}'), "dataset.json", None, None,
     ["cannot read annotation file"]),
    ("json-empty-object", _write("dataset.json", "{}"), "dataset.json", None, None,
     ["no videos to load"]),
    ("json-missing", lambda r: (r / "dataset.json").unlink(), "dataset.json", None, None,
     ["annotation file not found"]),
    ("id2action-no-name", _write("id2action.txt", "0 background\n1 crack egg\nwhisk\n"),
     "id2action.txt", None, None, ["line 3", "expected '<id> <name>'", "'whisk'"]),
    ("id2action-not-a-number", _write("id2action.txt", "0 background\nx crack egg\n"),
     "id2action.txt", None, None, ["line 2", "expected '<id> <name>'"]),
    ("id2action-duplicate-id", _write("id2action.txt", VOCAB + "2 stir\n"),
     "id2action.txt", None, None, ["line 6", "id 2 defined twice"]),
    ("split-handle-twice", _write("splits.json", json.dumps(SPLIT_TWICE)), "splits.json",
     "t0", "t0_v0", ["in both 'train' and 'test'"]),
    ("split-unknown-handle", _write("splits.json", json.dumps(SPLIT_UNKNOWN)), "splits.json",
     "t0", "t0_v9", ["not a video of this task"]),
    ("split-handle-of-other-task", _write("splits.json", json.dumps(SPLIT_WRONG_TASK)),
     "splits.json", "t0", "t1_v0", ["not a video of this task"]),
    ("split-json-syntax", _write("splits.json", "{"), "splits.json", None, None,
     ["unreadable JSON"]),
    ("split-no-splits-key", _write("splits.json", '{"train": []}'), "splits.json", None, None,
     ["must be an object with a 'splits' object"]),
]


@pytest.mark.parametrize("setup, name, task, handle, words",
                         [pytest.param(s, n, t, h, w, id=i) for i, s, n, t, h, w in FILE_CASES])
def test_bad_file(root: Path, setup, name, task, handle, words) -> None:
    setup(root)
    assert_fails_with(check(root), location(root / name, task, handle), *words)


def test_annotations_option_missing_file(root: Path, tmp_path: Path) -> None:
    missing = tmp_path / "elsewhere.json"
    assert_fails_with(check(root, "--annotations", str(missing)), location(missing),
                      "annotation file not found")


def test_root_is_not_a_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    assert_fails_with(check(missing), location(missing), "dataset root is not a folder")


def test_task_pattern_matching_nothing(root: Path) -> None:
    run = check(root, "--task", "t0", "--task", "cooking*")
    assert_fails_with(run, "data.tasks: ", "'cooking*' matches no task", "t0, t1")


def test_task_pattern_selects(root: Path) -> None:
    """A bad video of a task filtered out by --task is not looked at."""
    feature_path(root, "t1_v0").unlink()
    assert check(root, "--task", "t0").code == 0
    assert check(root, "--task", "t*").code == 1


def test_unknown_config_key(root: Path) -> None:
    run = check(root, "--set", "data.splt.seed=3")
    line = assert_fails_with(run, "", "unknown setting 'data.splt", code=2)
    assert "did you mean 'data.split" in line


def test_unknown_config_key_suggests_full_key(root: Path) -> None:
    run = check(root, "--set", "data.splt.seed=3")
    assert run.code == 2
    assert "data.split.seed" in run.stderr


def test_bad_config_value(root: Path) -> None:
    run = check(root, "--set", "data.split.train=1.5")
    assert_fails_with(run, "", "data.split.train", code=2)


# ----------------------------------------------------------------------------------------------
# Several problems at once


def test_two_missing_files_are_both_reported(root: Path) -> None:
    feature_path(root, "t0_v1").unlink()
    feature_path(root, "t1_v2").unlink()
    run = check(root)
    assert run.code == 1
    assert len(run.errors) == 2, run.stderr
    assert run.errors[0].startswith("error: " + location(feature_path(root, "t0_v1"), "t0",
                                                         "t0_v1"))
    assert run.errors[1].startswith("error: " + location(feature_path(root, "t1_v2"), "t1",
                                                         "t1_v2"))
    assert all("features file is missing" in ln for ln in run.errors)
    assert "2 problem(s) found" in run.stderr


def test_problems_of_different_kinds_are_all_reported(root: Path) -> None:
    feature_path(root, "t0_v1").unlink()
    np.save(feature_path(root, "t0_v2"), np.zeros((34, DIM), np.int64))
    edit_annotations(root, _set_item("t1", 1, "hdl_actions", 1, "9"))
    run = check(root)
    assert run.code == 1
    assert len(run.errors) == 3, run.stderr
    text = "\n".join(run.errors)
    assert "handle 't0_v1': features file is missing" in text
    assert "handle 't0_v2': dtype int64" in text
    assert "handle 't1_v1': unknown label '9'" in text
    assert "3 problem(s) found" in run.stderr


def test_scan_reports_every_bad_array(root: Path) -> None:
    _bad_value(3, np.nan)(feature_path(root, "t0_v0"))
    _bad_value(11, np.inf)(feature_path(root, "t1_v1"))
    run = check(root)
    assert run.code == 1
    assert len(run.errors) == 2, run.stderr
    assert run.errors[0].startswith("error: " + location(feature_path(root, "t0_v0"), "t0",
                                                         "t0_v0"))
    assert "first at frame 3" in run.errors[0]
    assert "first at frame 11" in run.errors[1]
    assert "2 problem(s) found" in run.stderr


# ----------------------------------------------------------------------------------------------
# Library level: load_dataset raises DataError with the location filled in


def _end_before_start(root: Path) -> None:
    edit_annotations(root, _set_item("t0", 1, "hdl_end_times", 1, 5))


LIBRARY_CASES = [
    # id, setup, task, handle, file (relative to root), word
    ("missing-file", lambda r: feature_path(r, "t0_v1").unlink(), "t0", "t0_v1",
     "features/t0_v1.npy", "missing"),
    ("truncated", lambda r: _truncate(feature_path(r, "t1_v0")), "t1", "t1_v0",
     "features/t1_v0.npy", "truncated"),
    ("dimension", lambda r: np.save(feature_path(r, "t1_v2"), np.zeros((37, 3), np.float32)),
     "t1", "t1_v2", "features/t1_v2.npy", "feature dimension"),
    ("end-before-start", _end_before_start, "t0", "t0_v1", "dataset.json", "ends before"),
    ("unknown-label", lambda r: edit_annotations(r, _set_item("t1", 0, "hdl_actions", 0, "77")),
     "t1", "t1_v0", "dataset.json", "unknown label"),
]


@pytest.mark.parametrize("setup, task, handle, file, word",
                         [pytest.param(s, t, h, f, w, id=i) for i, s, t, h, f, w in LIBRARY_CASES])
def test_load_dataset_raises_data_error(root: Path, setup, task, handle, file, word) -> None:
    setup(root)
    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(root=root))
    err = info.value
    assert type(err) is DataError  # the first problem itself, not a wrapper
    assert (err.task, err.handle, err.file) == (task, handle, str(root / file))
    assert word in err.what
    assert str(err).startswith(location(root / file, task, handle))


def test_load_dataset_collect_gathers_all(root: Path) -> None:
    feature_path(root, "t0_v1").unlink()
    _end_before_start(root)  # also t0_v1: the task record fails, so t0's arrays are not read
    feature_path(root, "t1_v2").unlink()
    with pytest.raises(DatasetErrors) as info:
        load_dataset(DataConfig(root=root), collect=True)
    errs = info.value.errors
    assert isinstance(info.value, DataError)
    assert all(type(e) is DataError for e in errs)
    assert [(e.task, e.handle) for e in errs] == [("t0", "t0_v1"), ("t1", "t1_v2")]
    assert (info.value.task, info.value.handle) == ("t0", "t0_v1")
    assert "and 1 more problem(s)" in str(info.value)


def test_load_dataset_file_level_errors(root: Path) -> None:
    (root / "dataset.json").write_text("[]")
    with pytest.raises(DataError) as info:
        load_dataset(DataConfig(root=root))
    assert info.value.file == str(root / "dataset.json")
    assert (info.value.task, info.value.handle) == (None, None)
    shutil.rmtree(root / "features")
    make_root(root.parent, "other")
    with pytest.raises(DataError, match="no 'frames/' folder"):
        load_dataset(DataConfig(root=root.parent / "other", layout="frames"))


def test_nan_found_when_loading_and_scanning(root: Path) -> None:
    _bad_value(9, np.nan)(feature_path(root, "t0_v1"))
    ds = load_dataset(DataConfig(root=root))  # headers only: loads fine
    with pytest.raises(DataError) as info:
        ds.load(1)
    assert (info.value.task, info.value.handle) == ("t0", "t0_v1")
    assert "first at frame 9" in info.value.what
    # The chunked scan reports the right frame index across chunk boundaries.
    for chunk in (1, 4, 256):
        (problem,) = scan_arrays(ds, chunk_frames=chunk)
        assert problem.handle == "t0_v1" and "first at frame 9" in problem.what


def test_read_npy_header(root: Path) -> None:
    path = feature_path(root, "t0_v0")
    assert read_npy_header(path) == ((20, DIM), np.dtype(np.float32))
    _truncate(path)
    with pytest.raises(DataError, match="truncated array"):
        read_npy_header(path)
    with pytest.raises(FileNotFoundError):
        read_npy_header(root / "features" / "absent.npy")


# ----------------------------------------------------------------------------------------------
# Lenient mode


def _extra_annotation(data: dict) -> None:
    """t1 gets a 4th annotation entry with no handle for it."""
    for key in ("hdl_actions", "hdl_start_times", "hdl_end_times"):
        data["t1"][key].append(copy.deepcopy(data["t1"][key][0]))


COUNTS = "handles 3, hdl_actions 4, hdl_start_times 4, hdl_end_times 4"


def test_more_annotations_than_handles_fails_by_default(root: Path) -> None:
    edit_annotations(root, _extra_annotation)
    assert_fails_with(check(root), location(root / "dataset.json", "t1"),
                      "unequal list lengths", COUNTS, "--lenient")


def test_lenient_pairs_by_position_with_a_warning(root: Path) -> None:
    edit_annotations(root, _extra_annotation)
    run = check(root, "--lenient")
    assert run.code == 0, run.output
    assert run.errors == []
    assert len(run.warnings) == 1, run.stderr
    warning = run.warnings[0]
    for word in ("task 't1'", COUNTS, "paired the first 3"):
        assert word in warning
    ds = load_dataset(DataConfig(root=root, strict=False))
    assert len(ds.videos) == 6
    assert any(COUNTS in w for w in ds.warnings)


def test_lenient_does_not_excuse_inner_lists(root: Path) -> None:
    edit_annotations(root, lambda d: d["t0"]["hdl_start_times"][1].pop())
    run = check(root, "--lenient")
    assert_fails_with(run, location(root / "dataset.json", "t0", "t0_v1"), "unequal list lengths")


# ----------------------------------------------------------------------------------------------
# Regressions: library bugs found while writing these tests, now fixed


def test_bug_vocabulary_superscript_digit(root: Path) -> None:
    (root / "id2action.txt").write_text("0 background\n\u00b2 crack egg\n", encoding="utf-8")
    assert_fails_with(check(root), location(root / "id2action.txt"), "line 2")


def test_bug_vocabulary_duplicate_id_with_leading_zero(root: Path) -> None:
    (root / "id2action.txt").write_text(VOCAB + "01 stir\n", encoding="utf-8")
    assert_fails_with(check(root), location(root / "id2action.txt"), "defined twice")


def test_bug_huge_integer_frame(root: Path) -> None:
    edit_annotations(root, _set_item("t0", 0, "hdl_end_times", 2, 10 ** 400))
    assert_fails_with(check(root), location(root / "dataset.json", "t0", "t0_v0"), "end")


def test_bug_split_file_not_utf8(root: Path) -> None:
    (root / "splits.json").write_bytes(b'{"splits": "\xff"}')
    assert_fails_with(check(root), location(root / "splits.json"))


def test_bug_npy_header_size_overflow(root: Path) -> None:
    path = feature_path(root, "t0_v1")
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(
            fh, {"descr": "<f4", "fortran_order": False, "shape": (2 ** 62, DIM)})
        fh.write(b"\0" * 64)
    assert_fails_with(check(root, "--no-scan"), location(path, "t0", "t0_v1"), "truncated")


@pytest.mark.parametrize("name", ["data[old]", "x[/]y"])
def test_bug_brackets_in_paths(tmp_path: Path, name: str) -> None:
    root = make_root(tmp_path, name)
    feature_path(root, "t0_v1").unlink()
    assert_fails_with(check(root), location(feature_path(root, "t0_v1"), "t0", "t0_v1"),
                      "missing")


def test_bug_negative_or_zero_shape_in_header(root: Path) -> None:
    path = feature_path(root, "t0_v1")
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(
            fh, {"descr": "<f4", "fortran_order": False, "shape": (-5, DIM)})
    assert_fails_with(check(root, "--no-scan"), location(path, "t0", "t0_v1"), "invalid shape")
    np.save(path, np.zeros((20, 0), dtype=np.float32))
    assert_fails_with(check(root, "--no-scan"), location(path, "t0", "t0_v1"), "got shape (20, 0)")


def test_bug_empty_vocabulary_is_an_error(root: Path) -> None:
    (root / "id2action.txt").write_text("\n", encoding="utf-8")
    assert_fails_with(check(root), location(root / "id2action.txt"), "vocabulary is empty")


def test_vocabulary_accepts_tab_separated_lines(root: Path) -> None:
    (root / "id2action.txt").write_text(VOCAB.replace(" ", "\t", 1), encoding="utf-8")
    run = check(root)
    assert run.code == 0, run.output


def test_bug_every_bad_video_of_a_task_is_reported(root: Path) -> None:
    edit_annotations(root, _set_item("t0", 0, "hdl_end_times", 2, -3))
    edit_annotations(root, _set_item("t0", 2, "hdl_start_times", 1, 2.5))
    run = check(root)
    assert run.code == 1
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, run.stderr
    assert "handle 't0_v0'" in errors[0] and "handle 't0_v2'" in errors[1]
