"""Config models: defaults, strictness, precedence file < overrides, readable errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from alignprog.config import (Config, DataConfig, dump_config, load_config, parse_overrides,
                              save_config)
from alignprog.errors import ConfigError


def test_defaults_are_valid_and_documented():
    cfg = load_config()
    assert cfg.data.background_labels == ["0", "SIL", "background"]
    assert (cfg.data.split.train, cfg.data.split.val, cfg.data.split.test) == (0.75, 0.10, 0.15)
    assert cfg.data.split.seed == 42
    assert cfg.data.layout == "features"

    def walk(model):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                walk(ann)
    walk(Config)


def test_unknown_key_suggests_the_closest(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"unknown setting 'data.split.sed' \(did you mean "
                                          r"'data.split.seed'\?\)"):
        load_config(overrides={"data.split.sed": 3})
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  bacth_size: 4\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown setting 'data.bacth_size' \(did you "
                                          r"mean 'data.batch_size'\?\)"):
        load_config(f)


def test_precedence_file_then_overrides(tmp_path: Path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  batch_size: 4\n  split: {seed: 7}\n")
    cfg = load_config(f)
    assert cfg.data.batch_size == 4 and cfg.data.split.seed == 7
    cfg = load_config(f, {"data.batch_size": 8})
    assert cfg.data.batch_size == 8 and cfg.data.split.seed == 7


def test_json_config_file(tmp_path: Path):
    f = tmp_path / "c.json"
    f.write_text('{"data": {"fps": {"preset": "egoprocel"}}}')
    assert load_config(f).data.fps.table()[0] == ("*.egtea", 24.0)


def test_validation_messages():
    with pytest.raises(ConfigError, match="fractions must sum to 1, got train\\+val\\+test = 1.1"):
        load_config(overrides={"data.split.val": 0.2})
    with pytest.raises(ConfigError, match="data.batch_size"):
        load_config(overrides={"data.batch_size": 0})
    with pytest.raises(ConfigError, match="data.fps.feature must be > 0"):
        load_config(overrides={"data.fps.feature": 0})
    with pytest.raises(ConfigError, match="data.layout"):
        load_config(overrides={"data.layout": "pixels"})
    with pytest.raises(ConfigError, match="data.background_labels must name at least one"):
        load_config(overrides={"data.background_labels": []})


def test_bad_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    f = tmp_path / "list.yaml"
    f.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(f)
    f.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(f)


def test_parse_overrides():
    assert parse_overrides(["data.split.seed=3", "data.tasks=[a, '*.cmu']", "data.root=x/y"]) == {
        "data.split.seed": 3, "data.tasks": ["a", "*.cmu"], "data.root": "x/y"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["data.split.seed"])


def test_save_and_reload_round_trip(tmp_path: Path):
    cfg = load_config(overrides={"data.split.seed": 5, "data.tasks": ["*.egtea"],
                                 "data.fps.source": {"tent": 60}})
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert "seed: 5" in dump_config(cfg)


def test_assignment_is_validated():
    cfg = DataConfig()
    with pytest.raises(Exception):
        cfg.batch_size = -1


def test_pipeline_document_names_are_normalised(tmp_path: Path):
    # The user's pipeline description says temporal_stacking and use_gru; the loaded config holds
    # the one name the code reads, so a saved config no longer mentions them.
    f = tmp_path / "c.yaml"
    f.write_text("model:\n  encoder: temporal_stacking\nprogress:\n  learnable:\n"
                 "    use_gru: false\n")
    cfg = load_config(f)
    assert cfg.model.encoder == "stacking"
    assert cfg.progress.learnable.arch == "mean"
    text = dump_config(cfg)
    assert "temporal_stacking" not in text and "use_gru" not in text
    assert load_config(overrides={"progress.learnable.use_gru": True,
                                  "progress.learnable.arch": "transformer"}
                       ).progress.learnable.arch == "transformer"
    mean = load_config(overrides={"progress.learnable.use_gru": False,
                                  "progress.learnable.arch": "mean"})
    assert mean.progress.learnable.arch == "mean"
    with pytest.raises(ConfigError, match="progress.learnable.use_gru=false means arch 'mean', "
                                          "but arch is 'transformer'"):
        load_config(overrides={"progress.learnable.use_gru": False,
                               "progress.learnable.arch": "transformer"})
    with pytest.raises(ConfigError, match="progress.learnable.use_gru must be true or false"):
        load_config(overrides={"progress.learnable.use_gru": "sometimes"})
    with pytest.raises(ConfigError, match="model.encoder: Input should be 'stacking', 'resnet50' "
                                          "or 'naive', got 'resnet'"):
        load_config(overrides={"model.encoder": "resnet"})


def test_encoder_must_read_the_data_layout():
    with pytest.raises(ConfigError) as err:
        load_config(overrides={"model.encoder": "resnet50"})
    assert str(err.value) == ("model.encoder 'resnet50' reads the 'frames' layout but "
                              "data.layout is 'features'")
    with pytest.raises(ConfigError, match="model.encoder 'naive' reads the 'features' layout"):
        load_config(overrides={"model.encoder": "naive", "data.layout": "frames"})
    cfg = load_config(overrides={"model.encoder": "resnet50", "data.layout": "frames"})
    assert cfg.data.layout == "frames"


def test_a_layout_chosen_alone_picks_its_encoder():
    cfg = load_config(overrides={"data.layout": "frames"})
    assert cfg.model.encoder == "resnet50" and cfg.data.layout == "frames"
    assert load_config(overrides={"data.layout": "features"}).model.encoder == "stacking"
    # a saved config (every field set) reloads unchanged
    again = load_config(overrides={"data.layout": "frames"})
    assert Config.model_validate(again.model_dump()).model.encoder == "resnet50"


@pytest.mark.parametrize("overrides, message", [
    ({"data.split.train": 0}, "data.split.train: Input should be greater than 0, got 0"),
    ({"data.split.train": 1.5, "data.split.val": 0},
     "data.split.train: Input should be less than or equal to 1, got 1.5"),
    ({"data.split.val": -0.1}, "data.split.val: Input should be greater than or equal to 0"),
    ({"data.fps.source": {"tent": 0}}, "data.fps.source.tent: Input should be greater than 0"),
    ({"data.fps.tolerance_s": -1}, "data.fps.tolerance_s: Input should be greater than or equal "
                                   "to 0, got -1"),
    ({"progress.learnable.weight_cap": 0.5}, "progress.learnable.weight_cap: Input should be "
                                             "greater than or equal to 1, got 0.5"),
])
def test_range_messages(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=overrides)
    assert message in str(err.value)
