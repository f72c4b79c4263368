"""progress.learnable.input (docs/algorithms.md#head-input-and-gradient-flow): what the head
reads, its per-method default, training, evaluation and predict on the base features, and saved
configs from before the setting."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from safetensors import safe_open
from typer.testing import CliRunner

from alignprog.cli import app
from alignprog.config import (HEAD_INPUT, SAVED_AUTO_INPUT, SAVED_DEFAULTS, Config, ModelConfig,
                              ProgressConfig, load_config, saved_config_fixes,
                              with_saved_config_fixes)
from alignprog.evaluation import online_progress
from alignprog.evaluation.embed import embed_videos, embed_with_head_inputs
from alignprog.export import export_run, load_with_config
from alignprog.inference import predict_progress
from alignprog.models import build_model
from alignprog.training import RunDir
from alignprog.training.loop import fit
from alignprog.training.restore import load_trained_model, resolve_checkpoint

from helpers import SETS_TINY, TINY, annotation, tiny_section, tiny_synthetic


def test_auto_reads_the_per_method_choice_and_explicit_values_win():
    assert HEAD_INPUT == {m: "separate" for m in ("tcc", "gtcc", "lav", "vava")}
    lc = ProgressConfig().learnable
    assert lc.input == "auto"
    for method, want in HEAD_INPUT.items():
        assert lc.input_for(method) == want
    assert lc.input_for(None) == "embeddings"
    for value in ("embeddings", "features", "separate"):
        lc = load_config(overrides={"progress.learnable.input": value}).progress.learnable
        assert all(lc.input_for(m) == value for m in HEAD_INPUT)
    with pytest.raises(Exception, match="input"):
        load_config(overrides={"progress.learnable.input": "base"})
    # training writes auto out: the saved config says what ran
    cfg = load_config(overrides={"train.method": "gtcc"})
    assert cfg.resolved().progress.learnable.input == "separate"
    assert cfg.progress.learnable.input == "auto"                  # the config itself unchanged
    explicit = load_config(overrides={"progress.learnable.input": "features"})
    assert explicit.resolved() is explicit


def test_saved_auto_reads_as_what_it_meant_before_training_wrote_it_out():
    for method, meant in SAVED_AUTO_INPUT.items():
        data = Config().model_dump(mode="json")
        data["train"]["method"] = method
        assert data["progress"]["learnable"]["input"] == "auto"
        assert saved_config_fixes(data) == {"progress.learnable.input": meant}
        fixed = with_saved_config_fixes(data)
        assert fixed["progress"]["learnable"]["input"] == meant
        assert data["progress"]["learnable"]["input"] == "auto"
    assert SAVED_AUTO_INPUT == {"tcc": "features", "gtcc": "features", "lav": "embeddings",
                                "vava": "embeddings"}
    data = Config().model_dump(mode="json")
    del data["train"]
    assert saved_config_fixes(data) == {"progress.learnable.input": "embeddings"}
    data["progress"]["learnable"]["input"] = "separate"
    assert saved_config_fixes(data) == {}


def _model(head_input: str, *, mcn: bool = True, method: str = "lav",
           progress: dict | None = None):
    torch.manual_seed(0)
    model_cfg = ModelConfig(**tiny_section("model") | {"mcn": mcn})
    pc = ProgressConfig(**(progress or {}), learnable={"hidden_dim": 8, "input": head_input})
    return build_model(model_cfg, pc, input_shape=(TINY["data.synthetic.dim"],), num_tasks=2,
                       method=method)


def test_the_head_reads_the_base_features_or_the_embeddings():
    x = torch.randn(2, 9, TINY["data.synthetic.dim"])
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    model = _model("features")
    out = model(x, mask)
    base = model.encoder.base(x, mask)
    assert model.head_input == "features"
    torch.testing.assert_close(model.head_features(out), base)
    assert not torch.allclose(out.embeddings, base)
    assert float(out.features[1, 6:].detach().abs().max()) == 0.0      # padding stays zero
    assert _model("embeddings").head_features(out) is out.embeddings
    # auto, per method
    assert _model("auto", method="tcc").head_input == "separate"
    assert _model("auto", method="lav").head_input == "separate"
    # without MCN the base output is the embedding: one tensor
    single = _model("features", mcn=False)
    out = single(x, mask)
    assert single.head_features(out) is out.embeddings
    # no head (cumulative_l2): nothing reads the features
    assert _model("features", progress={"method": "cumulative_l2"}).head_input == "embeddings"


@pytest.fixture(scope="module")
def features_run(tmp_path_factory) -> tuple[Path, object]:
    """A TINY TCC run whose head reads the base features."""
    root = tmp_path_factory.mktemp("features")
    cfg = load_config(overrides=TINY | {"train.method": "tcc", "train.steps": 6,
                                        "progress.learnable.input": "features"})
    result = fit(cfg, run=RunDir.create(root, "r"))
    assert result.model.head_input == "features"
    return root / "r", result


def test_predict_and_the_report_run_the_head_on_the_base_features(features_run, tmp_path):
    run_dir, result = features_run
    model = result.model.eval()
    x = torch.randn(1, 30, TINY["data.synthetic.dim"])
    ann = annotation([("0", 5), ("a", 15), ("b", 10)])
    with torch.no_grad():
        out = model.encoder(x, torch.ones(1, 30, dtype=torch.bool))
    want = online_progress(model.progress_head, out.features[0], ann).numpy()
    wrong = online_progress(model.progress_head, out.embeddings[0], ann).numpy()
    got = predict_progress(model, x[0].numpy(), ann)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.abs(got - wrong).max() > 1e-3
    # the export builds the same model again: the same predictions
    path = export_run(run_dir, checkpoint="last", out_dir=tmp_path / "export")
    loaded, info = load_with_config(path)
    assert loaded.head_input == "features" and info.progress.learnable.input == "features"
    assert "head on the base encoder's features" in (path.parent / "README.md").read_text()
    np.testing.assert_allclose(predict_progress(loaded, x[0].numpy(), ann), got, rtol=1e-5,
                               atol=1e-6)
    # the test report's head row: the head on the base features of each test video
    assert result.test_report["predictors"]["head"]["metrics"]


def test_saved_configs_without_the_setting_keep_the_embeddings(features_run, tmp_path):
    run_dir, _ = features_run
    data = Config().resolved().model_dump(mode="json")
    assert saved_config_fixes(data) == {}
    del data["progress"]["learnable"]["input"], data["progress"]["balance"]
    assert saved_config_fixes(data) == SAVED_DEFAULTS
    old = with_saved_config_fixes(data)
    assert old["progress"]["learnable"]["input"] == "embeddings"
    assert "input" not in data["progress"]["learnable"]          # the caller's dict unchanged
    assert with_saved_config_fixes({"model": {}}) == {"model": {}}    # no section, nothing to fill
    # An export written before the setting: its TCC head read the embeddings.
    path = export_run(run_dir, checkpoint="last", out_dir=tmp_path / "export")
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    config = json.loads(metadata["config"])
    del config["progress"]["learnable"]["input"]
    save_file(load_file(str(path)), str(path), metadata=metadata | {"config": json.dumps(config)})
    loaded, _ = load_with_config(path)
    assert loaded.head_input == "embeddings"
    # A checkpoint written before it: the same.
    old_ckpt = tmp_path / "old-checkpoint"
    shutil.copytree(resolve_checkpoint(run_dir, "last"), old_ckpt)
    meta = json.loads((old_ckpt / "meta.json").read_text())
    del meta["meta"]["config"]["progress"]["learnable"]["input"]
    (old_ckpt / "meta.json").write_text(json.dumps(meta))
    _, model, _ = load_trained_model(old_ckpt)
    assert model.head_input == "embeddings"


@pytest.mark.parametrize("flag", ["auto", "embeddings", "features", "separate"])
def test_the_cli_flag_trains_with_each_input(flag, tmp_path):
    args = ["train", "--method", "tcc", "--runs-dir", str(tmp_path), "--name", "r",
            "--steps", "2", "--head-input", flag, "--quiet", *SETS_TINY]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    ran = "separate" if flag == "auto" else flag
    saved = yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())
    assert saved["progress"]["learnable"]["input"] == ran          # auto is written out
    cfg, model, _ = load_trained_model(resolve_checkpoint(tmp_path / "r", "last"))
    assert model.head_input == ran and cfg.progress.learnable.input == ran


@pytest.mark.parametrize("ran,saved_as", [("embeddings", None), ("features", "auto")])
def test_resuming_a_run_saved_before_the_setting_keeps_its_input(ran, saved_as, tmp_path):
    # Saved configs as older versions wrote them: a TCC head on the embeddings with no input
    # setting, and one on the features saved as "auto" (before training wrote auto out).
    runner = CliRunner()
    args = ["train", "--method", "tcc", "--runs-dir", str(tmp_path), "--name", "old", "--quiet",
            *SETS_TINY]
    res = runner.invoke(app, [*args, "--steps", "1", "--head-input", ran])
    assert res.exit_code == 0, res.output
    saved = tmp_path / "old" / "config.yaml"
    lines = saved.read_text().splitlines()
    kept = [ln if not ln.strip().startswith("input:") else ln.replace(ran, saved_as)
            for ln in lines if saved_as or not ln.strip().startswith("input:")]
    assert len(kept) == len(lines) - (saved_as is None) and kept != lines
    saved.write_text("\n".join(kept) + "\n")
    for ckpt in (tmp_path / "old" / "checkpoints").iterdir():
        meta_file = ckpt / "meta.json"
        meta = json.loads(meta_file.read_text())
        learnable = meta["meta"]["config"]["progress"]["learnable"]
        if saved_as is None:
            del learnable["input"]
        else:
            learnable["input"] = saved_as
        meta_file.write_text(json.dumps(meta))
    res = runner.invoke(app, [*args, "--steps", "2", "--resume"])
    assert res.exit_code == 0, res.output
    cfg, model, state = load_trained_model(resolve_checkpoint(tmp_path / "old", "last"))
    assert state["step"] == 2
    assert cfg.progress.learnable.input == ran and model.head_input == ran


def test_one_embedding_pass_gives_the_embeddings_and_the_head_inputs(features_run):
    model, dataset = features_run[1].model, tiny_synthetic()
    idx = [0, 3, 5]
    embs, inputs = embed_with_head_inputs(model, dataset, idx, device="cpu", batch_size=2)
    for i, e, z in zip(idx, embs, inputs):
        x = torch.from_numpy(dataset.load(i))[None]
        with torch.no_grad():
            out = model.eval().encoder(x, torch.ones(x.shape[:2], dtype=torch.bool))
        torch.testing.assert_close(e, out.embeddings[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(z, out.features[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(embs, embed_videos(model, dataset, idx, device="cpu", batch_size=2)):
        torch.testing.assert_close(a, b)
    lav = _model("embeddings")
    embs, inputs = embed_with_head_inputs(lav, dataset, idx, device="cpu")
    assert inputs is embs


@pytest.mark.parametrize("method", ["tcc", "gtcc", "lav", "vava"])
@pytest.mark.parametrize("head_input", ["embeddings", "features", "separate"])
def test_bf16_autocast_trains_with_each_input_and_balance(method, head_input):
    # Under autocast the features are bf16 and the losses read fp32 copies: the balance point
    # must be a tensor on both losses' paths (the fp32 copy of the features is not on the
    # alignment's, and the step failed there with no gradient to measure).
    for balance in ("gradient", "fixed"):
        cfg = load_config(overrides=TINY | {
            "train.method": method, "train.steps": 2, "train.precision": "bf16",
            "progress.balance": balance, "progress.learnable.input": head_input})
        res = fit(cfg)
        steps = [r for r in res.history if r["kind"] == "step"]
        assert len(steps) == 2
        assert all(np.isfinite(r["total"]) and r["grad_encoder"] > 0 and r["grad_head"] > 0
                   for r in steps), (balance, steps)


def test_a_separate_head_reads_its_own_base_encoder():
    x = torch.randn(2, 9, TINY["data.synthetic.dim"])
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    model = _model("separate")
    assert model.head_input == "separate" and model.progress_base is not None
    out = model(x, mask)
    torch.testing.assert_close(model.head_features(out), model.progress_base(x, mask))
    torch.testing.assert_close(out.embeddings, model.encoder(x, mask).embeddings)
    assert not torch.allclose(out.progress_features, out.features)    # its own weights
    assert float(out.progress_features[1, 6:].detach().abs().max()) == 0.0
    # the encoder's initial weights do not depend on the head's base (built after it)
    plain = _model("embeddings").encoder.state_dict()
    assert all(torch.equal(v, plain[k]) for k, v in model.encoder.state_dict().items())
    # no head, no base of its own
    assert _model("separate", progress={"method": "cumulative_l2"}).progress_base is None
    from alignprog.models import AlignmentModel
    with pytest.raises(ValueError, match="separate"):
        AlignmentModel(model.encoder, model.progress_head, head_input="separate")
    with pytest.raises(ValueError, match="separate"):
        AlignmentModel(model.encoder, model.progress_head, progress_base=model.progress_base)


@pytest.mark.parametrize("method", ["tcc", "gtcc", "lav", "vava"])
def test_a_separate_head_leaves_the_alignment_training_as_without_progress(method):
    # Nothing is shared: the alignment encoder takes the same steps as alignment-only training
    # (bit for bit on the CPU) under either balance, and the head's base learns from the
    # progress loss.
    def run(**extra):
        return fit(load_config(overrides=TINY | {"train.method": method, "train.steps": 3}
                               | extra))
    none = run(**{"progress.enabled": False}).model.encoder.state_dict()
    start = _model("separate", method=method).progress_base.state_dict()
    for balance in ("gradient", "fixed"):
        res = run(**{"progress.learnable.input": "separate", "progress.balance": balance})
        enc = res.model.encoder.state_dict()
        assert all(torch.equal(v, none[k]) for k, v in enc.items()), balance
        steps = [r for r in res.history if r["kind"] == "step"]
        assert all(r["progress"] is not None and r["grad_head"] > 0 for r in steps)
        if balance == "gradient":
            assert all(r["lambda"] == 1.0 for r in steps)
        moved = res.model.progress_base.state_dict()
        assert any(not torch.equal(v, start[k]) for k, v in moved.items())


def test_predict_and_export_run_a_separate_head_on_its_own_base(tmp_path):
    cfg = load_config(overrides=TINY | {"train.method": "lav", "train.steps": 3,
                                        "progress.learnable.input": "separate"})
    result = fit(cfg, run=RunDir.create(tmp_path, "r"))
    model = result.model.eval()
    x = torch.randn(1, 30, TINY["data.synthetic.dim"])
    ann = annotation([("0", 5), ("a", 15), ("b", 10)])
    with torch.no_grad():
        own = model.progress_base(x, torch.ones(1, 30, dtype=torch.bool))[0]
    want = online_progress(model.progress_head, own, ann).numpy()
    got = predict_progress(model, x[0].numpy(), ann)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    path = export_run(tmp_path / "r", checkpoint="last", out_dir=tmp_path / "export")
    loaded, _ = load_with_config(path)
    assert loaded.head_input == "separate"
    assert "its own base encoder" in (path.parent / "README.md").read_text()
    for k, v in model.progress_base.state_dict().items():
        assert torch.equal(loaded.progress_base.state_dict()[k], v)
    np.testing.assert_allclose(predict_progress(loaded, x[0].numpy(), ann), got, rtol=1e-5,
                               atol=1e-6)
    _, restored, _ = load_trained_model(resolve_checkpoint(tmp_path / "r", "last"))
    assert restored.progress_base is not None
    assert result.test_report["predictors"]["head"]["metrics"]
