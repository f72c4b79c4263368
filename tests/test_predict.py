"""`alignprog predict`: online progress of an exported model on feature files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from alignprog.cli import app
from alignprog.config import DataConfig, load_config
from alignprog.data import load_dataset
from alignprog.data.arrays import read_npy_header
from alignprog.errors import DataError
from alignprog.evaluation import embed_videos
from alignprog.export import export_run, load_with_config
from alignprog.inference import embed, read_video_array
from alignprog.training import RunDir
from alignprog.training.loop import fit

from helpers import TINY, stderr_of

runner = CliRunner()
# Trained a bit: 20 steps with a 10x head learning rate make the head's output rise through
# every action of the synthetic data (seeds 0 and 1 checked: 24 of 24 actions >= 4 frames).
TINY = TINY | {"train.steps": 20, "train.head_lr": 0.03}
VIDEOS = ("synth_t0_v00", "synth_t1_v01")


pytestmark = pytest.mark.usefixtures("no_torch_load")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """An export of a model trained a bit, and the same synthetic data written as a root."""
    tmp = tmp_path_factory.mktemp("predict")
    fit(load_config(overrides=TINY), run=RunDir.create(tmp, "r"))
    export = export_run(tmp / "r", checkpoint="last", out_dir=tmp / "ex").parent
    root = tmp / "synth"
    result = runner.invoke(app, ["data", "synth", str(root), "--tasks", "2",
                                 "--videos-per-task", "6", "--dim", "16"])
    assert result.exit_code == 0, result.output
    return export, root


def files(root: Path) -> list[str]:
    return [str(root / "features" / f"{h}.npy") for h in VIDEOS]


def run_json(*args) -> dict:
    result = runner.invoke(app, ["predict", *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_progress_rises_through_each_action(setup):
    export, root = setup
    out = run_json(export, *files(root), "--segments", root / "dataset.json")
    assert out["whole_video_as_one_segment"] is False and out["note"] is None
    ds = load_dataset(DataConfig(root=root))
    by_handle = {v.handle: v.annotation for v in ds.videos}
    rising = 0
    for video in out["videos"]:
        ann = by_handle[video["handle"]]
        pred = np.asarray(video["progress"])
        assert len(pred) == ann.num_frames == video["frames"]
        # The segments are the dataset loader's canonical ones.
        assert [(s["label"], s["start"], s["end"]) for s in video["segments"]] == list(
            zip(ann.labels, ann.starts, ann.ends))
        assert (pred[~ann.foreground_mask()] == 0).all()          # background: 0
        for seg in video["segments"]:
            part = pred[seg["start"]:seg["end"] + 1]
            if seg["foreground"]:
                assert ((part > 0) & (part < 1)).all()
                assert seg["progress_first"] == pytest.approx(part[0], abs=1e-6)
                assert seg["progress_last"] == pytest.approx(part[-1], abs=1e-6)
            if seg["foreground"] and seg["frames"] >= 4:
                half = len(part) // 2
                assert part[half:].mean() > part[:half].mean(), seg
                rising += 1
    assert rising >= 8


def test_each_frame_is_predicted_from_its_prefix(setup):
    """Online: frame t of action [s, e] is the head's output on its input (by default its own
    base encoder's features) of frames s..t alone. (The encoder runs once over the whole video,
    as in evaluation; its temporal convs see a few frames ahead, so the features themselves are
    not causal.)"""
    export, root = setup
    # on the CPU, as the loop below: a GPU's kernels differ in the last digits
    out = run_json(export, files(root)[0], "--segments", root / "dataset.json", "--device", "cpu")
    video = out["videos"][0]
    model, info = load_with_config(export)
    assert model.head_input == "separate"
    emb = embed(model, np.load(video["file"]), head=True)                        # (T, D)
    seg = max((s for s in video["segments"] if s["foreground"]), key=lambda s: s["frames"])
    s = seg["start"]
    for t in range(s, seg["end"] + 1):
        with torch.no_grad():
            y = model.progress_head(emb[None, s:t + 1], torch.tensor([t - s + 1]))  # (1,)
        assert video["progress"][t] == pytest.approx(float(y), abs=1e-5), t


def test_segment_file_forms_agree(setup, tmp_path: Path):
    export, root = setup
    feature = files(root)[0]
    ref = run_json(export, feature, "--segments", root / "dataset.json")["videos"][0]
    segs = ref["segments"]
    triples = [[s["start"], s["end"], s["label"]] for s in segs]
    forms = {
        "dict.json": {VIDEOS[0]: {"labels": [s["label"] for s in segs],
                                  "starts": [s["start"] for s in segs],
                                  "ends": [s["end"] for s in segs]}},
        "triples.json": {VIDEOS[0]: triples},
        "list.json": triples,
    }
    for name, data in forms.items():
        (tmp_path / name).write_text(json.dumps(data))
        got = run_json(export, feature, "--segments", tmp_path / name)["videos"][0]
        assert got["segments"] == segs and got["progress"] == ref["progress"], name

    # Canonicalised like the dataset loader: a leading gap becomes background, a gap between
    # actions goes to the earlier one, the last segment is fitted to the video; each repair is
    # noted on stderr.
    first = next(s for s in segs if s["foreground"])
    (tmp_path / "loose.json").write_text(json.dumps([[first["start"], first["start"] + 2, "x"],
                                                     [first["start"] + 5, 10_000, "y"]]))
    result = runner.invoke(app, ["predict", str(export), feature, "--segments",
                                 str(tmp_path / "loose.json"), "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)["videos"][0]
    assert [(s["label"], s["start"]) for s in got["segments"]] == [
        ("0", 0), ("x", first["start"]), ("y", first["start"] + 5)]
    assert got["segments"][1]["end"] == first["start"] + 4
    assert got["segments"][-1]["end"] == got["frames"] - 1
    err = stderr_of(result)
    assert "leading frames unannotated" in err and "final segment shortened" in err


def test_without_segments_the_whole_video_is_one_segment(setup, tmp_path: Path):
    export, root = setup
    result = runner.invoke(app, ["predict", str(export), *files(root), "--json"])
    assert result.exit_code == 0, result.output
    assert "whole video as one segment" in stderr_of(result)
    out = json.loads(result.stdout)
    assert out["whole_video_as_one_segment"] is True
    assert out["note"] == "whole video as one segment"
    for video in out["videos"]:
        assert video["segments"] == [{"label": "video", "start": 0, "end": video["frames"] - 1,
                                      "frames": video["frames"], "foreground": True,
                                      "progress_first": video["progress"][0],
                                      "progress_last": video["progress"][-1]}]
        assert all(0 < p < 1 for p in video["progress"])

    png = tmp_path / "curves.png"
    result = runner.invoke(app, ["predict", str(export), *files(root), "--plot", str(png)])
    assert result.exit_code == 0, result.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "figure written" in stderr_of(result)
    assert "whole video as one segment" in result.stdout
    assert VIDEOS[1] in result.stdout


def test_table_output_with_segments(setup, tmp_path: Path):
    export, root = setup
    result = runner.invoke(app, ["predict", str(export), files(root)[0], "--segments",
                                 str(root / "dataset.json"), "--plot", str(tmp_path / "p.png")])
    assert result.exit_code == 0, result.output
    assert "segments" in result.stdout and "background (0)" in result.stdout
    assert any(c in result.stdout for c in "▁▂▃▄▅▆▇█")
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_float16_features_are_read(setup, tmp_path: Path):
    export, root = setup
    half = tmp_path / f"{VIDEOS[0]}.npy"
    np.save(half, np.load(files(root)[0]).astype(np.float16))
    out = run_json(export, half, "--segments", root / "dataset.json")
    assert len(out["videos"][0]["progress"]) == len(np.load(half))


def test_big_endian_features_give_the_same_progress(setup, tmp_path: Path):
    export, root = setup
    native = np.load(files(root)[0])
    swapped = tmp_path / f"{VIDEOS[0]}.npy"
    np.save(swapped, native.astype(native.dtype.newbyteorder(">")))
    assert np.load(swapped).dtype.byteorder == ">"
    expected = run_json(export, files(root)[0], "--segments", root / "dataset.json")
    out = run_json(export, swapped, "--segments", root / "dataset.json")
    assert out["videos"][0]["progress"] == expected["videos"][0]["progress"]


def test_a_prediction_that_would_take_too_long_is_refused_first(setup):
    export, root = setup
    feature = files(root)[0]
    frames = len(np.load(feature))
    # TINY's head: GRU with the relative position, which re-runs every prefix
    result = runner.invoke(app, ["predict", str(export), feature, "--max-head-steps", "100"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    err = stderr_of(result)
    assert f"needs {frames * (frames + 1) // 2:.3g} head frame steps" in err
    assert f"actions of up to {frames} frames" in err
    assert "--segments" in err and "position=count" in err
    # with the action bounds, the prefixes are the actions' only: it fits
    bound = str(frames * (frames + 1) // 2 - 1)
    out = run_json(export, feature, "--segments", root / "dataset.json", "--max-head-steps", bound)
    assert len(out["videos"][0]["progress"]) == frames


def test_bad_inputs_give_one_line_errors(setup, tmp_path: Path):
    export, root = setup
    wrong_dim = tmp_path / "wrong.npy"
    np.save(wrong_dim, np.ones((7, 5), dtype=np.float32))
    pickled = tmp_path / "pickled.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    ints = tmp_path / "ints.npy"
    np.save(ints, np.ones((7, 16), dtype=np.int64))
    nan = tmp_path / "nan.npy"
    np.save(nan, np.full((7, 16), np.nan, dtype=np.float32))
    (tmp_path / "segs.json").write_text(json.dumps({"other": [[0, 3, "1"]]}))
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / "badseg.json").write_text(json.dumps([[5, 2, "1"]]))
    feature = files(root)[0]
    cases = [
        ([str(wrong_dim)], "does not fit the model"),
        ([str(pickled)], "holds Python objects"),
        ([str(ints)], "arrays must be float16 or float32"),
        ([str(nan)], "NaN/Inf"),
        ([str(tmp_path / "missing.npy")], "no such file"),
        ([feature, "--segments", str(tmp_path / "segs.json")], "no segments for video"),
        ([feature, "--segments", str(tmp_path / "broken.json")], "cannot read the segments"),
        ([feature, "--segments", str(tmp_path / "badseg.json")], "ends before it starts"),
        ([feature, "--segments", str(tmp_path / "none.json")], "no such segments file"),
        ([feature, "--device", "tpu"], "--device: 'tpu' is not a device"),
    ]
    for args, message in cases:
        result = runner.invoke(app, ["predict", str(export), *args])
        assert result.exit_code != 0, args
        err = [line for line in stderr_of(result).strip().splitlines()
               if not line.startswith("note: ")]
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (args, err)
        assert "Traceback" not in result.output


def test_an_object_array_is_refused_without_suggesting_allow_pickle(setup, tmp_path: Path):
    """A .npy of Python objects gets the dataset loader's one-line error, not numpy's advice to
    pass allow_pickle (predict never unpickles)."""
    export, _ = setup
    pickled = tmp_path / "objects.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    result = runner.invoke(app, ["predict", str(export), str(pickled)])
    assert result.exit_code != 0
    output = result.output + stderr_of(result)
    assert "Python objects" in output
    assert "allow_pickle" not in output
    assert "Traceback" not in output


def test_embed_is_the_evaluation_pass(setup):
    """One array through `embed` gives what evaluation's `embed_videos` gives the same video."""
    export, root = setup
    model, _ = load_with_config(export)
    ds = load_dataset(DataConfig(root=root))
    for i in (0, len(ds.videos) - 1):
        assert torch.equal(embed(model, ds.load(i)),
                           embed_videos(model, ds, [i], device="cpu")[0])      # (T, D)


def test_predict_reads_videos_with_the_dataset_reader(setup, tmp_path: Path):
    """A bad file gets the same message from predict's reader as from the dataset loader's."""
    export, _ = setup
    _, info = load_with_config(export)
    good = tmp_path / "good.npy"
    np.save(good, np.ones((7, 16), dtype=np.float32))
    writes = {
        "ints": lambda p: np.save(p, np.ones((7, 16), dtype=np.int64)),
        "objects": lambda p: np.save(p, np.array([{"a": 1}], dtype=object), allow_pickle=True),
        "truncated": lambda p: p.write_bytes(good.read_bytes()[:-10]),
        "garbage": lambda p: p.write_bytes(b"not a numpy array\n" * 8),
    }
    for name, write in writes.items():
        path = tmp_path / f"{name}.npy"
        write(path)
        with pytest.raises(DataError) as header:
            read_npy_header(path)
        with pytest.raises(DataError) as video:
            read_video_array(path, info)
        assert video.value.what == header.value.what and video.value.file == str(path), name
    assert read_video_array(good, info).dtype == np.float32
