"""Learning-rate warm-up and cosine schedule; gradient accumulation (`train.accumulate`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from alignprog.cli import app
from alignprog.config import TrainConfig, load_config
from alignprog.data import load_dataset, make_loader
from alignprog.errors import ConfigError
from alignprog.training import RunDir
from alignprog.training.loop import fit
from alignprog.training.schedule import lr_factor
from alignprog.training.step import backward
from alignprog.training.trainer import Trainer

from helpers import SETS_TINY, TINY, stderr_of


def cfg_of(**extra):
    return load_config(overrides=TINY | extra)


# --- the schedule ------------------------------------------------------------------------------

def test_warmup_is_linear_then_constant():
    tc = TrainConfig(warmup_steps=4)
    assert [lr_factor(s, 10, tc) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_after_warmup_by_hand():
    tc = TrainConfig(lr_schedule="cosine", warmup_steps=2, min_lr_ratio=0.1)
    # 7 steps: 2 of warm-up, then t = 0, 1/4, 1/2, 3/4, 1 over the last 5
    got = [lr_factor(s, 7, tc) for s in range(7)]
    want = [0.5, 1.0] + [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(5)]
    assert got == pytest.approx(want, abs=1e-12)
    assert got[-1] == pytest.approx(0.1) and got[4] == pytest.approx(0.55)
    # past the stage's end (a longer resumed run) it stays at the floor
    assert lr_factor(20, 7, tc) == pytest.approx(0.1)


def test_cosine_without_warmup_and_one_step():
    tc = TrainConfig(lr_schedule="cosine")
    assert lr_factor(0, 3, tc) == 1.0 and lr_factor(1, 3, tc) == pytest.approx(0.5)
    assert lr_factor(2, 3, tc) == pytest.approx(0.0, abs=1e-15)
    assert lr_factor(0, 1, tc) == 1.0


def test_a_run_logs_the_scheduled_rates_of_every_group():
    cfg = cfg_of(**{"train.steps": 5, "train.lr_schedule": "cosine", "train.warmup_steps": 2,
                    "train.min_lr_ratio": 0.2, "train.lr": 1e-3, "train.head_lr": 4e-3})
    trainer = Trainer(cfg, load_dataset(cfg.data), torch.device("cpu"))
    trainer.set_schedule(0, 5)
    loader = make_loader(trainer.dataset, "train", batch_size=2, shuffle=False, drop_last=True)
    batches = list(loader)
    seen = []
    for step in range(5):
        record = trainer.read(trainer.step_batch(batches[step % len(batches)]))
        seen.append([g["lr"] for g in trainer.optimizer.param_groups])
        factor = lr_factor(step, 5, cfg.train)
        assert record["lr"] == pytest.approx(1e-3 * factor)
    # groups: the encoder, the head (head_lr), the head's own base encoder (lr)
    for step, rates in enumerate(seen):
        factor = lr_factor(step, 5, cfg.train)
        assert rates == pytest.approx([1e-3 * factor, 4e-3 * factor, 1e-3 * factor])
    assert seen[-1][0] == pytest.approx(2e-4)


def test_constant_schedule_keeps_the_old_numbers():
    # warm-up 0 and constant: the same steps as a config without the settings
    a = fit(cfg_of(**{"train.steps": 3}))
    b = fit(cfg_of(**{"train.steps": 3, "train.lr_schedule": "constant",
                      "train.warmup_steps": 0, "train.min_lr_ratio": 0.5}))
    assert [r.get("total") for r in a.history] == [r.get("total") for r in b.history]
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        assert torch.equal(p, q)


def test_two_stage_schedules_each_stage_over_its_own_steps():
    cfg = cfg_of(**{"train.epochs": 1, "train.two_stage": True, "train.head_epochs": 2,
                    "train.lr_schedule": "cosine", "train.lr": 1e-3, "train.head_lr": 2e-3})
    result = fit(cfg)
    steps = [r for r in result.history if "lr" in r]
    first = [r["lr"] for r in steps if r.get("stage") != "head"]
    second = [r["lr"] for r in steps if r.get("stage") == "head"]
    assert first[0] == pytest.approx(1e-3) and first[-1] == pytest.approx(0.0, abs=1e-12)
    # stage 2 starts again at its own rate (the head's, group 0 of its optimizer)
    assert second[0] == pytest.approx(2e-3) and second[-1] == pytest.approx(0.0, abs=1e-12)
    assert len(second) == 2 * len(first)


# --- gradient accumulation ---------------------------------------------------------------------

def _captured_gradients(trainer: Trainer) -> list:
    """Wrap the optimizer's step so that it records the gradients it applies."""
    seen: list = []
    step = trainer.optimizer.step

    def recording(*args, **kwargs):
        seen.append([None if p.grad is None else p.grad.clone()
                     for p in trainer.model.parameters()])
        return step(*args, **kwargs)

    trainer.optimizer.step = recording
    return seen


@pytest.mark.parametrize("balance,head_input", [("gradient", "separate"),
                                                ("gradient", "embeddings"),
                                                ("fixed", "embeddings")])
def test_accumulated_gradient_is_the_mean_of_the_batches(balance, head_input):
    extra = {"train.clip_mode": "none", "progress.balance": balance,
             "progress.learnable.input": head_input}
    if balance == "fixed":
        extra["progress.lambda_fixed"] = 100.0
    cfg = cfg_of(**extra)
    data = load_dataset(cfg.data)
    acc = Trainer(cfg, data, torch.device("cpu"))
    loader = make_loader(data, "train", batch_size=2, shuffle=False, drop_last=True)
    b1, b2 = list(loader)[:2]
    seen = _captured_gradients(acc)
    record = acc.read(acc.step_batches([b1, b2]))
    assert not record["skipped"] and record["batches"] == 2
    assert record["videos"] == b1.size + b2.size
    # the same batches one at a time, each from zero gradients, on a twin trainer
    twin = Trainer(cfg, data, torch.device("cpu"))
    twin.model.train()
    per_batch, losses = [], []
    for batch in (b1, b2):
        twin.optimizer.zero_grad(set_to_none=True)
        out = twin.losses(batch, epoch=0, step=0, generators=twin.generators)
        losses.append(float(out["alignment"].detach()))
        backward(twin, out["alignment"], out["progress"], out["embeddings"])
        per_batch.append([None if p.grad is None else p.grad.double().clone()
                          for p in twin.model.parameters()])
    head = {id(p) for p in twin.head_params}
    rescale = 100.0 if balance == "fixed" else 1.0
    for p, got, g1, g2 in zip(twin.model.parameters(), seen[0], *per_batch):
        if g1 is None and g2 is None:
            assert got is None
            continue
        want = ((g1 if g1 is not None else 0) + (g2 if g2 is not None else 0)) / 2
        if id(p) in head:
            want = want / rescale
        # float32 sums in another order: an absolute tolerance at the tensor's own scale
        scale = float(want.abs().max())
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6 * scale + 1e-12)
    assert record["alignment"] == pytest.approx(sum(losses) / 2, rel=1e-6)


def test_accumulation_counts_optimizer_steps_and_resumes_exactly(tmp_path: Path):
    extra = {"train.accumulate": 2, "train.lr_schedule": "cosine", "train.warmup_steps": 1}
    full = fit(cfg_of(**extra, **{"train.epochs": 4}), run=RunDir.create(tmp_path, "full"))
    rows = [r for r in full.history if r.get("kind") == "step"]
    data = load_dataset(cfg_of().data)
    n = len(make_loader(data, "train", batch_size=2, shuffle=True, drop_last=True))
    assert n % 2 == 0 and n >= 4
    per_epoch = n // 2
    assert [r["step"] for r in rows] == list(range(1, 4 * per_epoch + 1))
    assert all(r["batches"] == 2 and r["videos"] == 4 for r in rows)
    epochs = [r["step"] for r in full.history if r.get("kind") == "epoch"]
    assert epochs == [per_epoch * (k + 1) for k in range(4)]
    # the same run interrupted mid-epoch (after the first step of epoch 2), then resumed

    def interrupt(kind: str, record: dict) -> None:
        if kind == "step" and record["step"] == per_epoch + 1:
            raise KeyboardInterrupt

    stopped = fit(cfg_of(**extra, **{"train.epochs": 4}), run=RunDir.create(tmp_path, "part"),
                  callback=interrupt)
    assert stopped.interrupted and stopped.step == per_epoch + 1
    resumed = fit(cfg_of(**extra, **{"train.epochs": 4}),
                  run=RunDir.create(tmp_path, "part", resume=True), resume=True)
    for a, b in zip(full.model.state_dict().values(), resumed.model.state_dict().values()):
        assert torch.equal(a, b)


def test_an_epochs_batches_short_of_a_step_drop():
    data = load_dataset(cfg_of().data)
    n = len(make_loader(data, "train", batch_size=2, shuffle=True, drop_last=True))
    result = fit(cfg_of(**{"train.accumulate": n - 1, "train.epochs": 2}))
    rows = [r for r in result.history if r.get("kind") == "step"]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["batches"] == n - 1 and r["videos"] == 2 * (n - 1) for r in rows)


def test_accumulation_larger_than_an_epoch_is_a_config_error():
    with pytest.raises(ConfigError, match="fewer than train.accumulate=5"):
        fit(cfg_of(**{"train.accumulate": 5, "train.steps": 1}))


def test_accumulation_under_several_processes_is_a_config_error():
    from alignprog.training.distributed import Dist
    with pytest.raises(ConfigError, match="one process only"):
        fit(cfg_of(**{"train.accumulate": 2}), dist=Dist(rank=0, world_size=2))


def test_accumulation_in_the_head_only_stage():
    result = fit(cfg_of(**{"train.epochs": 1, "train.two_stage": True, "train.head_epochs": 1,
                           "train.accumulate": 2}))
    head_steps = [r for r in result.history if r.get("stage") == "head" and "batches" in r]
    assert head_steps and all(not r["skipped"] for r in head_steps)


runner = CliRunner()


def test_cli_flags_reach_the_config(tmp_path: Path):
    args = ["train", *SETS_TINY, "--set", "train.steps=2", "--runs-dir", str(tmp_path),
            "--name", "r", "--lr-schedule", "cosine", "--warmup-steps", "1",
            "--accumulate", "2", "--quiet"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, stderr_of(result)
    tc = load_config(tmp_path / "r" / "config.yaml").train
    assert (tc.lr_schedule, tc.warmup_steps, tc.accumulate) == ("cosine", 1, 2)
    rows = RunDir.open(tmp_path / "r").read_metrics()
    assert [r["batches"] for r in rows if r["kind"] == "step"] == [2, 2]


@pytest.mark.parametrize("args,words", [
    (["--lr-schedule", "linear"], "linear"),
    (["--accumulate", "0"], "accumulate"),
    (["--warmup-steps", "-1"], "warmup"),
])
def test_cli_refuses_bad_schedule_values(tmp_path: Path, args, words):
    result = runner.invoke(app, ["train", *SETS_TINY, "--runs-dir", str(tmp_path), *args])
    assert result.exit_code != 0
    err = stderr_of(result)
    assert words in err and "Traceback" not in err


def test_accumulation_runs_the_eager_step_and_a_schedule_may_be_graphed():
    # a CUDA graph holds one batch's step; it reads a schedule's rates from device tensors
    from alignprog.training.graphs import unsupported
    cuda = torch.device("cuda")   # unsupported() reads the device type only
    plain = cfg_of(**{"train.device": "cpu"})
    assert unsupported(plain, cuda, several_processes=False, mode="on") is None
    for extra in ({"train.warmup_steps": 3}, {"train.lr_schedule": "cosine"}):
        assert unsupported(cfg_of(**extra), cuda, several_processes=False, mode="auto") is None
    reason = unsupported(cfg_of(**{"train.accumulate": 2}), cuda, several_processes=False,
                         mode="auto")
    assert reason is not None and "accumulate" in reason


def test_tensor_rates_are_refilled_in_place():
    from alignprog.training.schedule import set_learning_rates, use_tensor_rates
    opt = torch.optim.Adam([{"params": [torch.zeros(2, requires_grad=True)], "lr": 1e-3},
                            {"params": [torch.zeros(1, requires_grad=True)], "lr": 3e-3}])
    set_learning_rates(opt, [1e-3, 3e-3], 0.5)
    assert [g["lr"] for g in opt.param_groups] == [5e-4, 1.5e-3]     # floats replaced
    use_tensor_rates(opt, torch.device("cpu"))
    held = [g["lr"] for g in opt.param_groups]
    set_learning_rates(opt, [1e-3, 3e-3], 0.25)
    assert [g["lr"] for g in opt.param_groups] == held                # the same tensors
    assert [float(t) for t in held] == pytest.approx([2.5e-4, 7.5e-4])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graphed_steps_follow_the_schedule():
    # The replay reads the learning rates from device tensors: graphed and eager steps take
    # the same scheduled rates and end at the same weights (tolerances as in test_fast_step).
    from alignprog.runtime import deterministic
    from test_fast_step import GPU, batches

    def run(graphs: str, schedule: str):
        cfg = load_config(overrides=GPU | {
            "train.method": "lav", "train.cuda_graphs": graphs, "loss.reduction": "mean",
            "progress.learnable.input": "embeddings", "train.lr_schedule": schedule,
            "train.warmup_steps": 2, "train.lr": 1e-3})
        with deterministic(True):
            trainer = Trainer(cfg, load_dataset(cfg.data), torch.device("cuda"))
            data = [b.pin_memory() for b in batches(trainer, 6)]
            trainer.set_schedule(0, len(data))   # the last step runs at min_lr_ratio = 0
            records, held = [], []
            for b in data:
                records.append(trainer.read(trainer.step_batch(b)))
                held.append(trainer.optimizer.param_groups[0]["lr"])
        if graphs == "on":
            # from the first replay on, one tensor: the captured graphs read its memory
            assert all(lr is held[1] for lr in held[1:])
        return trainer, records

    eager, rec_e = run("off", "cosine")
    graph, rec_g = run("on", "cosine")
    assert len(rec_g) >= 4 and graph.graphs.replays == len(rec_g) - 1
    assert isinstance(graph.optimizer.param_groups[0]["lr"], torch.Tensor)
    assert [r["lr"] for r in rec_g] == [r["lr"] for r in rec_e]
    assert rec_g[-1]["lr"] == 0.0
    assert float(graph.optimizer.param_groups[0]["lr"]) == 0.0
    for p, q in zip(eager.model.parameters(), graph.model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1.5e-3)
    # the rates reached the replays: a constant-rate graphed run ends elsewhere
    const, _ = run("on", "constant")
    moved = max(float((p - q).abs().max())
                for p, q in zip(const.model.parameters(), graph.model.parameters()))
    assert moved > 1e-3


def test_a_scheduled_resume_with_tensor_rates_continues_the_schedule(tmp_path: Path):
    # A checkpoint of tensor rates (as a graphed run holds them) stores them as tensors and a
    # resume restores the schedule's rate, not the saved one.
    from alignprog.training.schedule import use_tensor_rates
    cfg = cfg_of(**{"train.lr_schedule": "cosine", "train.warmup_steps": 1})
    trainer = Trainer(cfg, load_dataset(cfg.data), torch.device("cpu"))
    from alignprog.training.checkpoint import checkpoint_name
    trainer.set_schedule(0, 6)
    loader = make_loader(trainer.dataset, "train", batch_size=2, shuffle=False, drop_last=True)
    data = list(loader)[:3]
    use_tensor_rates(trainer.optimizer, torch.device("cpu"))
    for b in data[:2]:
        trainer.step_batch(b)
    run = RunDir.create(tmp_path, "r")
    trainer.save(run)
    again = Trainer(cfg, load_dataset(cfg.data), torch.device("cpu"))
    again.set_schedule(0, 6)
    again.restore(run.checkpoints_dir / checkpoint_name(trainer.step))
    assert isinstance(again.optimizer.param_groups[0]["lr"], torch.Tensor)
    rec = again.read(again.step_batch(data[2]))
    assert rec["lr"] == pytest.approx(cfg.train.lr * lr_factor(2, 6, cfg.train))
    assert float(again.optimizer.param_groups[0]["lr"]) == pytest.approx(rec["lr"])
