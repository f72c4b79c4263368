"""`alignprog config show` and `alignprog config validate` through the CLI."""

from __future__ import annotations

from pathlib import Path

import yaml
from typer.testing import CliRunner

from alignprog.cli import app
from alignprog.config import Config, load_config

from helpers import stderr_of

runner = CliRunner()


def test_show_prints_yaml_that_loads_back_to_the_same_config(tmp_path: Path):
    result = runner.invoke(app, ["config", "show"])
    assert result.exit_code == 0, result.output
    assert Config.model_validate(yaml.safe_load(result.stdout)) == load_config()
    saved = tmp_path / "shown.yaml"
    saved.write_text(result.stdout)
    assert load_config(saved) == load_config()


def test_show_applies_config_and_set_as_train_print_config_does(tmp_path: Path):
    base = tmp_path / "base.yaml"
    base.write_text("train:\n  epochs: 7\n  lr: 0.001\n")
    args = ["--config", str(base), "--set", "train.epochs=3"]
    result = runner.invoke(app, ["config", "show", *args])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.stdout)
    assert shown["train"]["epochs"] == 3 and shown["train"]["lr"] == 0.001
    assert Config.model_validate(shown) == load_config(base, {"train.epochs": 3})
    train = runner.invoke(app, ["train", *args, "--print-config"])
    assert train.exit_code == 0, train.output
    assert train.stdout == result.stdout


def test_show_reports_a_bad_override_in_one_line():
    result = runner.invoke(app, ["config", "show", "--set", "train.epochz=3"])
    assert result.exit_code != 0
    err = stderr_of(result).strip().splitlines()
    assert len(err) == 1 and "train.epochz" in err[0] and "train.epochs" in err[0], err
    assert "Traceback" not in result.output


def test_validate_accepts_a_good_file(tmp_path: Path):
    good = tmp_path / "good.yaml"
    good.write_text("train:\n  epochs: 3\ndata:\n  batch_size: 2\n")
    result = runner.invoke(app, ["config", "validate", str(good)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == f"{good}: valid"


def test_validate_names_the_bad_key(tmp_path: Path):
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("train:\n  epochz: 3\n")
    bad_value = tmp_path / "bad_value.yaml"
    bad_value.write_text("train:\n  epochs: -1\n")
    bad_type = tmp_path / "bad_type.json"
    bad_type.write_text('{"data": {"batch_size": "many"}}')
    cases = [(unknown, ["'train.epochz'", "did you mean 'train.epochs'"]),
             (bad_value, ["train.epochs"]),
             (bad_type, ["data.batch_size"])]
    for path, words in cases:
        result = runner.invoke(app, ["config", "validate", str(path)])
        assert result.exit_code == 1, (path, result.output)
        err = stderr_of(result).strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {path}: "), err
        assert all(w in err[0] for w in words), (words, err)
        assert "valid" not in result.stdout and "Traceback" not in result.output


def test_validate_of_a_missing_or_unreadable_file_is_one_line(tmp_path: Path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    for path in (tmp_path / "missing.yaml", broken, tmp_path):
        result = runner.invoke(app, ["config", "validate", str(path)])
        assert result.exit_code == 1, (path, result.output)
        err = stderr_of(result).strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and str(path) in err[0], err
        assert result.exception is None or isinstance(result.exception, SystemExit)
        assert "Traceback" not in result.output


def test_help_shows_examples():
    for command in ("show", "validate"):
        result = runner.invoke(app, ["config", command, "--help"])
        assert result.exit_code == 0, result.output
        assert "Examples:" in result.output and f"alignprog config {command}" in result.output


def test_validate_a_fifo_is_an_error_not_a_hang(tmp_path: Path):
    import os
    fifo = tmp_path / "config.fifo"
    os.mkfifo(fifo)
    result = runner.invoke(app, ["config", "validate", str(fifo)])
    assert result.exit_code == 1 and "not a regular file" in stderr_of(result)
