"""Export to safetensors and loading back: round trip, file format, damaged and mismatched files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import alignprog
from alignprog.cli import app
from alignprog.data import load_dataset, make_loader
from alignprog.errors import AlignprogError
from alignprog.export import ExportError, export_run, load, load_with_config, read_export_info
from alignprog.training import RunDir

from helpers import stderr_of, tiny_run

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("no_torch_load")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run trained 3 steps, its final model and its config."""
    path, res, cfg = tiny_run(tmp_path_factory.mktemp("runs"), 3)
    return path, res.model.eval(), cfg


@pytest.fixture(scope="module")
def batch(trained):
    """Two padded videos of the run's dataset: x (B, T, D), mask (B, T)."""
    ds = load_dataset(trained[2].data)
    b = next(iter(make_loader(ds, "train", batch_size=2, shuffle=False, drop_last=True)))
    return b.features, b.mask


def outputs(model, x, mask):
    """The encoder's embeddings, the head's input and its dense and last-frame outputs on each
    video (the default head reads its own base encoder, which must round-trip too)."""
    with torch.no_grad():
        out = model(x.to(next(model.parameters()).dtype), mask)
        lengths = mask.sum(1)                                                     # (B,)
        inp, head = model.head_features(out), model.progress_head                # (B, T, D)
        return tuple(y.float() for y in (out.embeddings, inp, head(inp, lengths, dense=True),
                                         head(inp, lengths), out.attention))


def test_round_trip_fp32_is_exact(trained, batch, tmp_path: Path):
    run, model, cfg = trained
    path = export_run(run, checkpoint="last", out_dir=tmp_path / "ex")
    assert path == tmp_path / "ex" / "model.safetensors"
    assert {p.name for p in (tmp_path / "ex").iterdir()} == {
        ".alignprog-export", "model.safetensors", "config.json", "README.md"}
    assert not list(tmp_path.glob(".ex*")), "no temporary folder may be left behind"
    loaded = alignprog.load(tmp_path / "ex")          # the lazy top-level entry point
    assert not loaded.training
    for a, b in zip(outputs(model, *batch), outputs(loaded, *batch)):
        assert torch.equal(a, b)
    sd = model.state_dict()
    for name, tensor in load(path).state_dict().items():      # the file itself works too
        assert torch.equal(tensor, sd[name]), name


def test_file_is_plain_safetensors_with_config_metadata(trained, tmp_path: Path):
    run, model, cfg = trained
    path = export_run(run, out_dir=tmp_path / "ex")
    with safe_open(path, framework="pt") as fh:
        meta = fh.metadata()
        names = list(fh.keys())
    assert meta["format_version"] == "1" and meta["dtype"] == "fp32"
    config = json.loads(meta["config"])
    assert config == json.loads((tmp_path / "ex" / "config.json").read_text())
    assert config["input_shape"] == [16] and config["num_tasks"] == 2
    assert config["method"] == cfg.train.method and config["layout"] == "features"
    assert config["model"]["output_dim"] == 16
    assert config["progress"]["learnable"]["hidden_dim"] == 8
    assert config["source"]["step"] == 3
    # Stable names: the model's state_dict names, under encoder., progress_head. and (the
    # default head input, separate) progress_base.
    assert sorted(names) == sorted(model.state_dict())
    assert all(n.startswith(("encoder.", "progress_head.", "progress_base.")) for n in names)
    assert any(n.startswith("progress_head.") for n in names)
    assert any(n.startswith("progress_base.") for n in names)
    card = (tmp_path / "ex" / "README.md").read_text()
    assert f"`{cfg.train.method}`" in card and "3 optimizer steps" in card
    assert "| head |" in card and "constant_0.5" in card  # the run's eval_test.json numbers


def test_card_starts_with_hugging_face_front_matter(trained, tmp_path: Path):
    run, _, cfg = trained
    export_run(run, out_dir=tmp_path / "ex")
    card = (tmp_path / "ex" / "README.md").read_text()
    assert card.startswith("---\n")
    block, sep, rest = card[len("---\n"):].partition("\n---\n")
    assert sep, "the front-matter block must be closed by a --- line"
    meta = yaml.safe_load(block)
    assert isinstance(meta, dict)
    assert meta["library_name"] == "alignprog" and meta["license"] == "mit"
    assert cfg.train.method in meta["tags"] and "alignprog" in meta["tags"]
    assert {"video-alignment", "action-progress"} <= set(meta["tags"])
    assert meta["metrics"] == ["mae"]           # the card's table reports MAE
    # the card itself follows unchanged
    assert rest.lstrip("\n").startswith("# alignprog model: ")
    assert f"`{cfg.train.method}`" in rest and "| head |" in rest
    # the CLI, which reports the card's path, still works on the export
    result = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "ex2"), "--json"])
    assert result.exit_code == 0, result.output
    again = Path(json.loads(result.stdout)["card"]).read_text()
    assert yaml.safe_load(again.split("---\n")[1]) == meta


# Measured max abs errors of the tiny model: bf16 6e-4 (embeddings), fp16 8e-5.
@pytest.mark.parametrize("dtype,stored,tol", [("bf16", torch.bfloat16, 1e-2),
                                              ("fp16", torch.float16, 1e-3)])
def test_half_precision_exports_are_close(trained, batch, tmp_path: Path, dtype, stored, tol):
    run, model, _ = trained
    path = export_run(run, checkpoint="last", out_dir=tmp_path / dtype, dtype=dtype)
    assert read_export_info(path).dtype == dtype
    assert all(t.dtype == stored for t in load_file(path).values())
    assert path.stat().st_size < 0.6 * export_run(run, out_dir=tmp_path / "fp32").stat().st_size
    loaded = load(path)                                        # upcast to float32 by default
    assert next(loaded.parameters()).dtype == torch.float32
    for a, b in zip(outputs(model, *batch), outputs(loaded, *batch)):
        torch.testing.assert_close(b, a, atol=tol, rtol=tol)
    half = load(path, dtype=dtype)                             # or computed in the stored dtype
    assert next(half.parameters()).dtype == stored
    for name, tensor in half.state_dict().items():
        assert torch.equal(tensor, load_file(path)[name]), name


def test_cli_export_overwrite_and_json(trained, tmp_path: Path):
    run = trained[0]
    out = tmp_path / "ex"
    result = runner.invoke(app, ["export", str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "exported r" in result.stdout and (out / "model.safetensors").is_file()
    result = runner.invoke(app, ["export", str(run), "--out", str(out)])
    assert result.exit_code == 1 and "already exists" in result.output
    result = runner.invoke(app, ["export", str(run), "--out", str(out), "--overwrite",
                                 "--dtype", "fp16", "--checkpoint", "last", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["dtype"] == "fp16" and info["config_json"]["source"]["checkpoint"].startswith(
        "step-")
    assert read_export_info(out).dtype == "fp16"
    # A directory that is not an export is never replaced.
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["export", str(run), "--out", str(other), "--overwrite"])
    assert result.exit_code == 1 and "not an alignprog export" in result.output
    assert (other / "keep.txt").read_text() == "mine"
    result = runner.invoke(app, ["export", str(tmp_path / "nope"), "--out", str(out)])
    assert result.exit_code == 1 and "no run directory" in result.output


# ----------------------------------------------------------------------------------------------
# Damaged and mismatched files


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> Path:
    return export_run(trained[0], out_dir=tmp_path_factory.mktemp("ex") / "ex")


def rewrite(src: Path, dst: Path, *, config=None, tensors=None) -> Path:
    """A copy of the export file with its config and/or tensors edited."""
    with safe_open(src, framework="pt") as fh:
        meta = dict(fh.metadata())
    data = load_file(src)
    if config is not None:
        cfg = json.loads(meta["config"])
        config(cfg)
        meta["config"] = json.dumps(cfg)
    if tensors is not None:
        tensors(data)
    dst.parent.mkdir(parents=True, exist_ok=True)
    save_file(data, dst, metadata=meta)
    return dst


def assert_cli_error(path: Path, message: str, tmp_path: Path) -> None:
    """`predict` on a damaged export: one line on stderr, exit code != 0, no traceback."""
    video = tmp_path / "v.npy"
    np.save(video, np.ones((5, 16), dtype=np.float32))
    result = runner.invoke(app, ["predict", str(path), str(video)])
    assert result.exit_code != 0
    err = stderr_of(result).strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_truncated_and_garbage_files_give_clear_errors(exported, tmp_path: Path):
    data = exported.read_bytes()
    cases = {"truncated.safetensors": data[:len(data) // 2],
             "header-cut.safetensors": data[:30],
             "garbage.safetensors": bytes(range(256)) * 8,
             "empty.safetensors": b""}
    for name, blob in cases.items():
        path = tmp_path / name
        path.write_bytes(blob)
        with pytest.raises(ExportError, match="truncated or corrupted"):
            load(path)
        assert_cli_error(path, "truncated or corrupted", tmp_path)
    with pytest.raises(ExportError, match="no such file"):
        load(tmp_path / "missing")
    assert_cli_error(tmp_path / "missing", "no such file", tmp_path)


def test_a_checkpoint_file_is_not_an_export(trained, tmp_path: Path):
    ckpt = RunDir.open(trained[0]).latest_checkpoint() / "model.safetensors"
    with pytest.raises(ExportError, match="not an alignprog export"):
        load(ckpt)
    assert_cli_error(ckpt, "alignprog export RUN_DIR", tmp_path)


def test_wrong_architecture_lists_the_mismatched_tensors(exported, tmp_path: Path):
    # The config says output_dim 8, the tensors were trained with 16.
    path = rewrite(exported, tmp_path / "narrow.safetensors",
                   config=lambda c: c["model"].update(output_dim=8))
    with pytest.raises(ExportError) as err:
        load(path)
    msg = str(err.value)
    assert "do not match the architecture" in msg and "mismatched" in msg
    assert "mismatched 15: encoder.base.convs.2.weight expected (8, 16, 3) got (16, 16, 3)" in msg
    assert "progress_base.convs.3.weight expected (8, 8, 3) got (16, 16, 3)" in msg
    assert "progress_head.gru.weight_ih_l0 expected (24, 9) got (24, 17)" in msg
    assert "\n" not in msg
    assert_cli_error(path, "mismatched", tmp_path)
    # A config the config model refuses (the stacking convs halve conv_channels down to
    # output_dim, so it must be output_dim times a power of two).
    path = rewrite(exported, tmp_path / "wider.safetensors",
                   config=lambda c: c["model"].update(output_dim=32))
    with pytest.raises(ExportError, match=r"the export's config is invalid \(model.conv_channels "
                       "must be model.output_dim times a power of two"):
        load(path)

    # A tensor missing, one unexpected: both named.
    def edit(t):
        t["progress_head.extra.weight"] = t.pop("progress_head.mlp.2.weight")
    path = rewrite(exported, tmp_path / "renamed.safetensors", tensors=edit)
    with pytest.raises(ExportError) as err:
        load(path)
    msg = str(err.value)
    assert "missing 1 (in the model, not the file): progress_head.mlp.2.weight" in msg
    assert "unexpected 1 (in the file, not the model): progress_head.extra.weight" in msg


def test_bad_config_and_poisoned_weights(exported, tmp_path: Path):
    path = rewrite(exported, tmp_path / "bad.safetensors",
                   config=lambda c: c["model"].update(output_dim=1))
    with pytest.raises(ExportError, match=r"config is invalid \(output_dim: "):
        load(path)
    path = rewrite(exported, tmp_path / "version.safetensors")
    with safe_open(path, framework="pt") as fh:
        meta = dict(fh.metadata()) | {"format_version": "99"}
    save_file(load_file(path), path, metadata=meta)
    with pytest.raises(ExportError, match="format_version '99'"):
        load(path)

    def poison(t):
        t["encoder.attention.0.weight"][0, 0] = float("nan")
    path = rewrite(exported, tmp_path / "nan.safetensors", tensors=poison)
    with pytest.raises(ExportError, match="NaN/Inf.*encoder.attention.0.weight"):
        load(path)
    assert issubclass(ExportError, AlignprogError)


def test_load_with_config_reports_the_export(exported):
    model, info = load_with_config(exported.parent)
    assert info.input_shape == (16,) and info.layout == "features" and info.num_tasks == 2
    assert info.format_version == "1" and info.dtype == "fp32"
    assert "0" in info.background_labels
    assert model.progress_head is not None
