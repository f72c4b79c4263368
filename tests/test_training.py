"""The training loop: gradient rescaling, clip modes, end to end, resume, CLI validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from alignprog.cli import app
from alignprog.config import load_config
from alignprog.data import load_dataset, make_loader
from alignprog.training import RunDir
from alignprog.training.loop import fit
from alignprog.training.step import StepMetrics, take_step
from alignprog.training.trainer import Trainer

from helpers import TINY

TINY_SET = [f"{k}={json.dumps(v)}" for k, v in TINY.items()]


def tiny_config(**extra):
    return load_config(overrides=TINY | extra)


def first_batch(trainer: Trainer):
    loader = make_loader(trainer.dataset, "train", batch_size=2, shuffle=False, drop_last=True)
    return next(iter(loader))


def step_keeping_gradients(trainer: Trainer, batch):
    """One `take_step` on the batch that leaves the (rescaled, clipped) gradients in .grad."""
    trainer.optimizer.zero_grad(set_to_none=True)
    out = trainer.losses(batch, epoch=0, step=0, generators=trainer.generators)
    info = StepMetrics(step=1, epoch=0, lam=trainer.lam, samples=out["samples"],
                       videos=batch.size, frames=int(batch.lengths.sum()),
                       alignment=out["alignment"])
    return take_step(trainer, out["alignment"], out["progress"], info,
                     embeddings=out["embeddings"], release_grads=False)


@pytest.mark.parametrize("method", ["lav", "tcc"])
def test_head_gradients_are_the_progress_loss_alone(method):
    cfg = tiny_config(**{"train.method": method, "progress.lambda_fixed": 1000.0,
                         "train.clip_mode": "none"})
    ds = load_dataset(cfg.data)
    trainer = Trainer(cfg, ds, torch.device("cpu"))
    batch = first_batch(trainer)
    state = {k: g.get_state() for k, g in trainer.generators.items()}

    def loss_terms():
        gens = {k: torch.Generator().set_state(s) for k, s in state.items()}
        out = trainer.losses(batch, epoch=0, step=0, generators=gens)
        return out["alignment"], out["progress"]

    align, prog = loss_terms()
    g_enc_align = torch.autograd.grad(align, trainer.encoder_params, allow_unused=True)
    align, prog = loss_terms()
    g_enc_prog = torch.autograd.grad(prog, trainer.encoder_params, allow_unused=True,
                                     retain_graph=True)
    g_head_prog = torch.autograd.grad(prog, trainer.head_params)

    # the trainer draws the same samples
    trainer.generators = {k: torch.Generator().set_state(s) for k, s in state.items()}
    record = trainer.read(step_keeping_gradients(trainer, batch))
    assert not record["skipped"]
    for p, ga, gp in zip(trainer.encoder_params, g_enc_align, g_enc_prog):
        want = (ga if ga is not None else 0) + 1000.0 * (gp if gp is not None else 0)
        if p.grad is None:
            assert ga is None and gp is None
            continue
        # float32 sums of large terms in another order: compare whole tensors by norm
        err = torch.linalg.vector_norm(p.grad - want) / torch.linalg.vector_norm(want)
        assert err < 1e-3, float(err)  # a missing or double rescale is off by ~lambda
    for p, gp in zip(trainer.head_params, g_head_prog):
        torch.testing.assert_close(p.grad, gp, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("mode", ["global", "separate", "none"])
def test_clip_modes(mode):
    # the pipeline description's encoder clip, 1e-5, so that the global mode starves the head
    # (docs/reference-bugs.md#global-clip-starves-head)
    cfg = tiny_config(**{"train.clip_mode": mode, "progress.lambda_fixed": 100.0,
                         "train.encoder_clip": 1e-5})
    trainer = Trainer(cfg, load_dataset(cfg.data), torch.device("cpu"))
    record = trainer.read(step_keeping_gradients(trainer, first_batch(trainer)))
    enc, head = record["grad_encoder_clipped"], record["grad_head_clipped"]
    assert record["grad_encoder"] > 1e-5 and record["grad_head"] > 1e-3
    if mode == "global":
        assert (enc**2 + head**2) ** 0.5 == pytest.approx(1e-5, rel=1e-3)
        assert head < 1e-5   # the head's share of a global 1e-5 clip
    elif mode == "separate":
        assert enc == pytest.approx(1e-5, rel=1e-3)
        assert head == pytest.approx(min(record["grad_head"], 1.0), rel=1e-3)
    else:
        assert enc == pytest.approx(record["grad_encoder"])
        assert head == pytest.approx(record["grad_head"])


@pytest.mark.parametrize("method", ["tcc", "gtcc", "lav", "vava"])
def test_each_method_trains_end_to_end(tmp_path: Path, method):
    cfg = tiny_config(**{"train.method": method, "train.steps": 3})
    run = RunDir.create(tmp_path, "run")
    res = fit(cfg, run=run)
    names = {p.name for p in run.path.iterdir()}
    assert {"config.yaml", "split.json", "meta.json", "metrics.jsonl", "checkpoints",
            "eval_test.json"} <= names
    steps = [r for r in run.read_metrics() if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3]
    assert all(r["total"] is not None and r["progress"] is not None for r in steps)
    epoch = next(r for r in run.read_metrics() if r["kind"] == "epoch")
    assert set(epoch["val_progress_mae"]) == {"head", "constant_0.5", "frame_count"}
    assert res.test_report["split"] == "test"
    assert run.latest_checkpoint().name == "step-00000003"


def test_resume_equals_an_uninterrupted_run(tmp_path: Path):
    cfg = tiny_config(**{"train.steps": 6, "train.method": "lav"})
    full = fit(cfg, run=RunDir.create(tmp_path, "full"))
    # the same run stopped after 4 steps (mid-epoch: 3 steps per epoch), then resumed to 6
    part = RunDir.create(tmp_path, "part")
    fit(load_config(overrides=TINY | {"train.steps": 4, "train.method": "lav"}), run=part)
    resumed = fit(cfg, run=RunDir.create(tmp_path, "part", resume=True), resume=True)
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa
    full_rows = RunDir.open(tmp_path / "full").read_metrics()
    part_rows = RunDir.open(tmp_path / "part").read_metrics()
    assert strip([r for r in full_rows if r["kind"] == "step"]) == \
        strip([r for r in part_rows if r["kind"] == "step"])


def test_same_seed_same_numbers():
    a = fit(tiny_config(**{"train.steps": 2}))
    b = fit(tiny_config(**{"train.steps": 2}))
    assert [r.get("total") for r in a.history] == [r.get("total") for r in b.history]


runner = CliRunner()


def test_cli_trains_and_refuses_to_reuse_a_run(tmp_path: Path):
    args = ["train", "--steps", "2", "--runs-dir", str(tmp_path), "--name", "r", *sum(
        (["--set", s] for s in TINY_SET), [])]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "constant_0.5" in result.output and "run directory" in result.output
    again = runner.invoke(app, args)
    assert again.exit_code != 0 and "--resume" in again.output and "--overwrite" in again.output
    assert runner.invoke(app, [*args, "--overwrite"]).exit_code == 0


@pytest.mark.parametrize("args,words", [
    (["--method", "dtw"], ["dtw"]),
    (["--set", "train.lr=-1"], ["train.lr"]),
    (["--set", "train.clip_mod=global"], ["train.clip_mode"]),
    (["--device", "cuda:7"], ["cuda"]),
    (["--device", "tpu"], ["tpu"]),
    (["--epochs", "0"], ["train.epochs"]),
])
def test_cli_option_errors(tmp_path: Path, args, words):
    if args[:2] == ["--device", "cuda:7"] and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    result = runner.invoke(app, ["train", "--runs-dir", str(tmp_path), *args])
    assert result.exit_code != 0
    assert "Traceback" not in result.output
    for word in words:
        assert word in result.output
    assert not any(tmp_path.iterdir()), "no run directory for a rejected command"


def test_print_config(tmp_path: Path):
    result = runner.invoke(app, ["train", "--print-config", "--method", "gtcc", "--lambda", "5"])
    assert result.exit_code == 0
    assert "method: gtcc" in result.output and "lambda_fixed: 5.0" in result.output


@pytest.mark.slow
def test_resnet50_trains_on_the_synthetic_frames_variant(tmp_path: Path):
    args = ["train", "--encoder", "resnet50", "--steps", "1", "--runs-dir", str(tmp_path),
            "--set", "data.synthetic.frame_channels=8", "--set", "data.synthetic.frame_size=3",
            "--set", "data.synthetic.tasks=2", "--set", "data.synthetic.videos_per_task=6",
            "--set", "train.log_every=1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "head" in result.output


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["tcc", "gtcc", "lav", "vava"])
def test_each_method_trains_on_cuda(tmp_path: Path, method):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    cfg = tiny_config(**{"train.method": method, "train.steps": 3, "train.device": "cuda"})
    res = fit(cfg, run=RunDir.create(tmp_path, "run"))
    steps = [r for r in res.history if r["kind"] == "step"]
    assert len(steps) == 3 and all(r["total"] is not None for r in steps)
    assert all(r["gpu_memory_mb"] > 0 for r in steps)
    # bf16 autocast runs too
    cfg = tiny_config(**{"train.method": method, "train.steps": 2, "train.device": "cuda",
                         "train.precision": "bf16"})
    assert all(r["total"] is not None for r in fit(cfg).history if r["kind"] == "step")


def test_trained_model_is_rebuilt_from_its_checkpoint(tmp_path: Path):
    from alignprog.training.restore import load_trained_model, resolve_checkpoint
    res = fit(tiny_config(**{"train.steps": 3}), run=RunDir.create(tmp_path, "r"))
    for which in ("best", "last"):
        cfg, model, state = load_trained_model(resolve_checkpoint(tmp_path / "r", which))
        assert state["step"] == 3 and cfg.train.steps == 3
    for a, b in zip(res.model.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_cli_resume_continues_with_the_runs_own_config(tmp_path: Path):
    sets = sum((["--set", s] for s in TINY_SET), [])
    base = ["train", "--runs-dir", str(tmp_path), "--name", "r"]
    assert runner.invoke(app, [*base, "--method", "tcc", "--steps", "2", *sets]).exit_code == 0
    # no --method and no --set: the saved config (tcc, tiny model) is used, --steps extends it
    result = runner.invoke(app, [*base, "--resume", "--steps", "4"])
    assert result.exit_code == 0, result.output
    steps = [r for r in RunDir.open(tmp_path / "r").read_metrics() if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    result = runner.invoke(app, ["train", "--resume", "--runs-dir", str(tmp_path)])
    assert result.exit_code == 2 and "--name" in result.output


def test_cumulative_l2_trains_with_class_normalisers(tmp_path: Path):
    cfg = tiny_config(**{"train.steps": 4, "progress.method": "cumulative_l2"})
    run = RunDir.create(tmp_path, "r")
    res = fit(cfg, run=run)
    steps = [r for r in res.history if r["kind"] == "step"]
    assert all(r["progress"] is not None and 0 <= r["progress"] for r in steps)
    from alignprog.training.checkpoint import load_checkpoint
    state = load_checkpoint(run.latest_checkpoint(), restore_rng=False)
    assert any(state["class_seen"]) and all(v >= 0 for v in state["class_paths"])
    # the reference's self-normalisation still works
    cfg = tiny_config(**{"train.steps": 2, "progress.method": "cumulative_l2",
                         "progress.cumulative_normaliser": "self"})
    assert all(r["progress"] is not None for r in fit(cfg).history if r["kind"] == "step")
