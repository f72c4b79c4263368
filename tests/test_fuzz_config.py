"""Fuzz-style bad inputs: every one is a one-line AlignprogError (CLI: exit code, no traceback)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from alignprog.cli import app
from alignprog.config import load_config, parse_overrides, read_config_file
from alignprog.data.dataset import read_annotation_json
from alignprog.errors import ConfigError, DataError
from alignprog.fileio import load_json_text

BAD_OVERRIDES = [
    ({"train.lr": float("inf")}, "train.lr: Input should be a finite number"),
    ({"progress.lambda_fixed": float("inf")}, "progress.lambda_fixed: Input should be a finite"),
    ({"progress.learnable.weight_cap": float("nan")}, "progress.learnable.weight_cap"),
    ({"loss.vava.zeta": float("nan")}, "loss.vava.zeta: Input should be a finite number"),
    ({"data.fps.tolerance_s": float("nan")}, "data.fps.tolerance_s"),
    ({"data.fps.feature": float("inf")}, "data.fps.feature"),
    ({"loss.vava.delta": 1e-30}, "loss.vava.delta: Input should be greater than or equal to 0.001"),
    ({"loss.vava.zeta": -1.0}, "loss.vava.zeta: Input should be greater than or equal to 0"),
    ({"model.conv_channels": 128}, "model.conv_channels must be model.output_dim times a power"),
    ({"model.conv_channels": 96, "model.output_dim": 128}, "model.conv_channels must be"),
    ({"model.head_layers": [512, 0, 256]}, "model.head_layers.1: Input should be greater than"),
    ({"model.naive_layers": [-1]}, "model.naive_layers.0"),
    ({"model.attn_layers": [0]}, "model.attn_layers.0"),
    ({"model.drop_layers": [0]}, "model.drop_layers.0"),
    ({"model.head_layers": [10 ** 9]}, "model.head_layers.0: Input should be less than or equal"),
    ({"progress.learnable.hidden_dim": 10 ** 9}, "progress.learnable.hidden_dim"),
    ({"data.synthetic.dim": 10 ** 9}, "data.synthetic.dim"),
    ({"data.batch_size": True}, "data.batch_size: expected a number, not a boolean"),
    ({"train.lr": True}, "train.lr: expected a number, not a boolean"),
    ({"model.head_layers": [True, 8]}, "model.head_layers: expected a number, not a boolean"),
    ({"data.fps.source": {"a": True}}, "data.fps.source: expected a number, not a boolean"),
    ({"train": 5}, "train: Input should be a valid dictionary"),
    ({"train": 5, "train.lr": 1e-3}, "'train.lr': 'train' is set to the single value 5"),
    ({"train.lr": 1e-3, "train.lr.x": 1}, "'train.lr.x': 'train.lr' is set to the single value"),
]


@pytest.mark.parametrize("overrides,phrase", BAD_OVERRIDES)
def test_bad_overrides_are_one_line_config_errors(overrides, phrase):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    assert phrase in str(err.value)
    assert "\n" not in str(err.value)


def test_good_config_still_loads():
    cfg = load_config(overrides={"data.batch_size": 3, "model.conv_channels": 512,
                                 "train.cuda_graphs": False})
    assert cfg.data.batch_size == 3 and cfg.train.cuda_graphs == "off"


# A billion laughs: 9 levels of 9 aliases would expand to 9**9 (~3.9e8) strings.
BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))


def test_yaml_alias_bomb_file_fails_fast(tmp_path: Path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    start = time.monotonic()
    with pytest.raises(ConfigError, match="more than 16 YAML aliases"):
        read_config_file(path)
    assert time.monotonic() - start < 2.0


def test_yaml_alias_bomb_override_fails_fast():
    start = time.monotonic()
    flow = "{" + BOMB.strip().replace("\n", ", ") + "}"
    with pytest.raises(ConfigError, match="override 'data.tasks': value is more than 16"):
        parse_overrides([f"data.tasks={flow}"])
    assert time.monotonic() - start < 2.0


def test_yaml_deep_nesting_and_size(tmp_path: Path):
    with pytest.raises(ConfigError, match="nested deeper than 32 levels"):
        parse_overrides(["data.tasks=" + "[" * 5000 + "]" * 5000])
    big = tmp_path / "big.yaml"
    big.write_text("# " + "x" * (2 << 20))
    with pytest.raises(ConfigError, match="larger than 1048576 bytes"):
        read_config_file(big)


def test_small_aliases_still_work(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  head_layers: &w [16, 8, 16]\n  attn_layers: *w\n")
    assert load_config(path).model.attn_layers == [16, 8, 16]


BAD_JSON = [
    ("[" * 100_000 + "]" * 100_000, "nested deeper than 200 levels"),
    ('{"t": ' + "[" * 300 + "]" * 300 + "}", "nested deeper than 200 levels"),
    ('{"t": ' + "9" * 5000 + "}", "a number has more than"),
    ('{"t": NaN}', "non-finite number NaN"),
    ('{"t": [1, 2', "at line 1 column"),
]


@pytest.mark.parametrize("text,phrase", BAD_JSON)
def test_load_json_text(text, phrase):
    with pytest.raises(DataError, match=phrase):
        load_json_text(text, lambda r: DataError(r, file="f.json"))


@pytest.mark.parametrize("text,phrase", BAD_JSON)
def test_bad_dataset_json(tmp_path: Path, text, phrase):
    path = tmp_path / "dataset.json"
    path.write_text(text)
    with pytest.raises(DataError) as err:
        read_annotation_json(path)
    assert f"{path}: unreadable JSON (" in str(err.value) and phrase in str(err.value)


runner = CliRunner()


def _cli(args: list[str]):
    try:
        return CliRunner(mix_stderr=False).invoke(app, args)
    except TypeError:  # click >= 8.2 always separates stderr
        return runner.invoke(app, args)


@pytest.mark.parametrize("args,phrase", [
    (["--lr", "inf"], "train.lr"),
    (["--lambda", "inf"], "progress.lambda_fixed"),
    (["--set", "loss.vava.zeta=.nan"], "loss.vava.zeta"),
    (["--set", "progress.learnable.weight_cap=.nan"], "progress.learnable.weight_cap"),
    (["--set", "data.fps.tolerance_s=.nan"], "data.fps.tolerance_s"),
    (["--set", "data.fps.feature=.inf"], "data.fps.feature"),
    (["--set", "data.batch_size=true"], "data.batch_size"),
    (["--set", "train=5"], "train"),
    (["--set", "train.lr.x=1"], "train.lr"),
    (["--set", "model.head_layers=[0]"], "model.head_layers.0"),
    (["--set", "data.tasks=" + "{" + BOMB.strip().replace("\n", ", ") + "}"], "YAML aliases"),
])
def test_cli_train_bad_settings(tmp_path: Path, args, phrase):
    start = time.monotonic()
    result = _cli(["train", *args, "--set", f"train.runs_dir={tmp_path}"])
    assert time.monotonic() - start < 10
    err = result.stderr
    assert result.exit_code == 2, (result.exit_code, err, result.stdout)
    assert "Traceback" not in err and "Traceback" not in result.stdout
    assert phrase in err and len(err.strip().splitlines()) == 1


def test_cli_config_file_bomb(tmp_path: Path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    result = _cli(["train", "--config", str(path)])
    assert result.exit_code == 2 and "YAML aliases" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("text,phrase", BAD_JSON[:3])
def test_cli_predict_bad_segments(tmp_path: Path, text, phrase):
    seg = tmp_path / "segs.json"
    seg.write_text(text)
    from alignprog.inference import read_segments
    with pytest.raises(DataError, match="cannot read the segments JSON"):
        read_segments(seg)


@pytest.mark.parametrize("text,phrase", BAD_JSON[:4])
def test_export_metadata_config_json(tmp_path: Path, text, phrase):
    from alignprog.export import FORMAT_VERSION, ExportError, _parse_metadata
    with pytest.raises(ExportError) as err:
        _parse_metadata(tmp_path / "m.safetensors",
                        {"format_version": FORMAT_VERSION, "config": text})
    assert "the 'config' metadata is not valid JSON" in str(err.value)
    assert phrase in str(err.value) and "\n" not in str(err.value)
