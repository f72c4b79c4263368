"""Multi-process training: 2 ranks against one process that averages by hand.

Each test spawns 2 processes (one thread each) that join a gloo group on localhost, as torchrun's
variables describe it, and run the real Trainer / fit / CLI. A GPU version runs 2 NCCL ranks.
"""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from alignprog.config import load_config
from alignprog.data import load_dataset, make_loader
from alignprog.data.batching import TaskBatchSampler
from alignprog.runtime import deterministic
from alignprog.training import RunDir
from alignprog.training.loop import fit
from alignprog.training.step import backward, clip_gradients
from alignprog.training.trainer import Trainer, rank_seed, training_generators

from helpers import TINY

TINY_SET = sum((["--set", f"{k}={json.dumps(v)}"] for k, v in TINY.items()), [])
STEPS = 3          # 4 training batches per epoch, 2 steps per epoch with 2 ranks: crosses one
WORLD = 2
TIMEOUT_S = 90     # a hung collective fails the test instead of hanging it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(fn, *args, nprocs: int = WORLD) -> None:
    """Run fn(rank, nprocs, port, *args) in `nprocs` fresh processes; fail on a hang."""
    ctx = mp.start_processes(fn, args=(nprocs, free_port(), *args), nprocs=nprocs, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"the ranks did not finish within {TIMEOUT_S} s (a hung collective?)")


def torchrun_env(rank: int, world: int, port: int) -> None:
    """The variables torchrun sets for one process; one thread each (2 CPU cores)."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))


def without_foreground(batch):
    """The batch with every segment marked background: it gives no progress sample."""
    import dataclasses
    return dataclasses.replace(batch, seg_foreground=torch.zeros_like(batch.seg_foreground),
                               foreground=torch.zeros_like(batch.foreground))


# ----------------------------------------------------------------------------------------------
# rank processes (module level, so that spawn can find them)


def _steps_worker(rank: int, world: int, port: int, out: str, device: str,
                  no_foreground_rank: int | None, balance: str = "gradient",
                  nan_step: tuple[int, int] | None = None) -> None:
    """STEPS steps on this rank's share; `nan_step` (rank, step): that rank's batch of that
    step (from 1) holds NaN features."""
    torchrun_env(rank, world, port)
    from alignprog.training import distributed
    with (distributed.process_group(device, timeout=timedelta(seconds=60)) as dist,
          deterministic()):  # as fit runs
        cfg = load_config(overrides=TINY | {"train.device": device,
                                            "progress.balance": balance})
        ds = load_dataset(cfg.data)
        trainer = Trainer(cfg, ds, dist.device, dist)
        trainer.sync()
        loader = make_loader(ds, "train", batch_size=cfg.data.batch_size, shuffle=True,
                             drop_last=True, seed=cfg.train.seed, num_replicas=world, rank=rank)
        snapshots, used, records = {}, [], []
        while trainer.step < STEPS:
            loader.batch_sampler.set_epoch(trainer.epoch)
            for indices in loader.batch_sampler.batches():
                batch = loader.collate_fn([loader.dataset[i] for i in indices])
                if rank == no_foreground_rank:
                    batch = without_foreground(batch)
                if nan_step == (rank, trainer.step + 1):
                    batch.features.fill_(float("nan"))
                if device == "cuda" and trainer.step > 0:
                    # after the first step (Adam's state made): no host-device sync in a step
                    batch = batch.pin_memory()
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    metrics = trainer.step_batch(batch)
                finally:
                    if device == "cuda":
                        torch.cuda.set_sync_debug_mode("default")
                records.append(trainer.read(metrics))
                used.append(indices)
                for i, p in enumerate(trainer.model.parameters()):
                    snapshots[f"{trainer.step}.{i}"] = p.detach().cpu().clone()
                if trainer.step == STEPS:
                    break
            trainer.epoch += 1
        save_file(snapshots, Path(out) / f"params-{rank}.safetensors")
        (Path(out) / f"run-{rank}.json").write_text(json.dumps({
            "batches": used, "records": records, "skipped": int(trainer.skipped_steps)}))


def _fit_worker(rank: int, world: int, port: int, runs: str, name: str, steps: int,
                resume: bool) -> None:
    torchrun_env(rank, world, port)
    from alignprog.training import distributed
    with distributed.process_group("cpu", timeout=timedelta(seconds=60)) as dist:
        cfg = load_config(overrides=TINY | {"train.steps": steps})
        run = RunDir.create(Path(runs), name, resume=resume) if dist.is_main else None
        res = fit(cfg, run=run, resume=resume, dist=dist)
        save_file({k: v.contiguous() for k, v in res.model.state_dict().items()},
                  Path(runs) / f"final-{rank}.safetensors")


def _cli_worker(rank: int, world: int, port: int, runs: str, steps: int) -> None:
    torchrun_env(rank, world, port)
    from typer.testing import CliRunner

    from alignprog.cli import app
    result = CliRunner().invoke(app, ["train", "--steps", str(steps), "--runs-dir", runs,
                                      "--json-logs", *TINY_SET])
    assert result.exit_code == 0, result.output
    if rank:
        assert result.output == "", result.output  # rank 0 alone reports


def _cli_refused_worker(rank: int, world: int, port: int, runs: str) -> None:
    """Rank 0's memory check refuses the run: every rank exits with an error, none waits."""
    torchrun_env(rank, world, port)
    from typer.testing import CliRunner

    from alignprog.cli import app
    from alignprog.training import memory
    memory.free_bytes = lambda device: 1000
    result = CliRunner().invoke(app, ["train", "--steps", "2", "--runs-dir", runs, "--name", "r",
                                      *TINY_SET])
    assert result.exit_code == 1, result.output
    assert ("needs about" in result.output) == (rank == 0), result.output


# ----------------------------------------------------------------------------------------------
# the single process that the ranks must equal


def rank_gradients(ref: Trainer, out: dict, params: list) -> list:
    """One rank's gradients of `params`: balance=fixed written out (alignment + lambda *
    progress; the caller divides the head's by lambda after the averaging); balance=gradient
    from `step.backward` itself, whose weights tests/test_balance.py checks against a float64
    formula (here: the averaging)."""
    alignment, progress = out["alignment"], out["progress"]
    if ref.balance == "gradient":
        ref.optimizer.zero_grad(set_to_none=True)
        backward(ref, alignment, progress, out["embeddings"])
        grads = [p.grad for p in params]
        ref.optimizer.zero_grad(set_to_none=True)
        return grads
    if progress is None:
        return torch.autograd.grad(alignment, params, allow_unused=True)
    return torch.autograd.grad(alignment + ref.lam * progress, params, allow_unused=True)


def reference_run(device: str, no_foreground_rank: int | None = None,
                  balance: str = "gradient"):
    """Per step, the parameters of one process that computes the ranks' two single-task
    batches' losses and gradients separately (each with that rank's random streams,
    `rank_gradients`), averages the gradients, clips and steps; and the batches."""
    cfg = load_config(overrides=TINY | {"train.device": device, "progress.balance": balance})
    ds = load_dataset(cfg.data)
    ref = Trainer(cfg, ds, torch.device(device))
    gens = {r: training_generators(rank_seed(cfg.train.seed, r)) for r in range(WORLD)}
    loader = make_loader(ds, "train", batch_size=cfg.data.batch_size, shuffle=True,
                         drop_last=True, seed=cfg.train.seed)
    params = list(ref.model.parameters())
    head = {id(p) for p in ref.head_params}
    snapshots, shares, samples = [], {r: [] for r in range(WORLD)}, []
    while ref.step < STEPS:
        loader.batch_sampler.set_epoch(ref.epoch)
        batches = loader.batch_sampler.epoch_batches()
        batches += batches[:(-len(batches)) % WORLD]                  # padded to a multiple
        for i in range(0, len(batches), WORLD):
            grads = [None] * len(params)
            for r in range(WORLD):
                indices = batches[i + r]
                shares[r].append(indices)
                batch = loader.collate_fn([loader.dataset[j] for j in indices])
                if r == no_foreground_rank:
                    batch = without_foreground(batch)
                ref.model.train()
                out = ref.losses(batch.to(device), epoch=ref.epoch, step=ref.step,
                                 generators=gens[r])
                samples.append(out["samples"])
                for k, g in enumerate(rank_gradients(ref, out, params)):
                    if g is not None:
                        grads[k] = g if grads[k] is None else grads[k] + g
            for k, p in enumerate(params):
                # contiguous, as .backward() leaves them (fused Adam wants the params' layout;
                # autograd.grad may return, e.g., an einsum's gradient transposed)
                p.grad = None if grads[k] is None else (grads[k] / WORLD).contiguous()
                if p.grad is not None and id(p) in head and ref.balance == "fixed":
                    p.grad = p.grad / ref.lam
            clip_gradients(ref)
            ref.optimizer.step()
            ref.optimizer.zero_grad(set_to_none=True)
            ref.step += 1
            snapshots.append([p.detach().cpu().clone() for p in params])
            if ref.step == STEPS:
                break
        ref.epoch += 1
    return snapshots, shares, samples


def check_against_reference(out: Path, device: str, no_foreground_rank: int | None,
                            balance: str = "gradient", **tolerance) -> list[int]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks: the same summation order in the CPU kernels
    try:
        with deterministic():
            snapshots, shares, samples = reference_run(device, no_foreground_rank, balance)
    finally:
        torch.set_num_threads(threads)
    assert len(snapshots) == STEPS
    ranks = [json.loads((out / f"run-{r}.json").read_text()) for r in range(WORLD)]
    for r in range(WORLD):  # each rank's share is its interleaved slice of the epoch's batches
        assert ranks[r]["batches"] == shares[r]
    # disjoint shares within an epoch (2 steps per epoch here), every batch single-task
    first_epoch = [tuple(b) for r in ranks for b in r["batches"][:2]]
    assert len(set(first_epoch)) == len(first_epoch) == 4
    params = [load_file(out / f"params-{r}.safetensors") for r in range(WORLD)]
    for step, want in enumerate(snapshots, start=1):
        for i, w in enumerate(want):
            for r in range(WORLD):  # every rank holds the same parameters after each step
                torch.testing.assert_close(params[r][f"{step}.{i}"], w, **tolerance,
                                           msg=lambda m: f"step {step}, rank {r}, param {i}: {m}")
    records = ranks[0]["records"]
    assert [rec["step"] for rec in records] == list(range(1, STEPS + 1))
    assert all(rec["ranks"] == WORLD and rec["videos"] == 4 for rec in records)
    assert [rec["samples"] for rec in records] == [
        samples[i] + samples[i + 1] for i in range(0, 2 * STEPS, 2)]
    return samples


# ----------------------------------------------------------------------------------------------
# tests


def test_sampler_shares_are_disjoint_single_task_and_even():
    groups = {"a": list(range(0, 7)), "b": list(range(10, 15)), "c": [20, 21]}
    whole = TaskBatchSampler(groups, 2, shuffle=True, drop_last=True, seed=3)
    shares = [TaskBatchSampler(groups, 2, shuffle=True, drop_last=True, seed=3,
                               num_replicas=3, rank=r) for r in range(3)]
    for epoch in (0, 1):
        for s in [whole, *shares]:
            s.set_epoch(epoch)
        every = whole.batches()                              # 3 + 2 + 1 = 6 batches
        got = [s.batches() for s in shares]
        assert [len(g) for g in got] == [len(s) for s in shares] == [2, 2, 2]
        assert sorted(b for g in got for b in g) == sorted(every)   # each video once
        for g in got:
            assert all(len({i // 10 for i in b}) == 1 for b in g)  # single-task
    four = [TaskBatchSampler(groups, 2, shuffle=True, drop_last=True, seed=3, num_replicas=4,
                             rank=r) for r in range(4)]
    whole.set_epoch(0)
    got = [s.batches() for s in four]                        # 6 batches padded to 8
    assert [len(g) for g in got] == [2, 2, 2, 2]
    assert {tuple(b) for g in got for b in g} == {tuple(b) for b in whole.epoch_batches()}
    with pytest.raises(ValueError, match="rank"):
        TaskBatchSampler(groups, 2, shuffle=True, drop_last=True, num_replicas=2, rank=2)


@pytest.mark.parametrize("balance", ["gradient", "fixed"])
def test_two_ranks_equal_one_process_averaging_by_hand(tmp_path: Path, balance: str):
    spawn(_steps_worker, str(tmp_path), "cpu", None, balance)
    # bitwise: the same kernels on one thread, and the sum of two ranks is a + b == b + a
    samples = check_against_reference(tmp_path, "cpu", None, balance, rtol=0, atol=0)
    assert all(samples)
    # the ranks agree on the step's lambda: the fixed one, or the mean of the ranks' own
    lams = [[r["lambda"] for r in json.loads((tmp_path / f"run-{k}.json").read_text())
             ["records"]] for k in range(WORLD)]
    assert lams[0] == lams[1] and len(lams[0]) == STEPS
    if balance == "fixed":
        assert set(lams[0]) == {1e6}
    else:
        assert all(0 < x < float("inf") and x != 1e6 for x in lams[0])


def test_a_rank_without_progress_samples_does_not_hang_the_others(tmp_path: Path):
    # rank 1's batches have no foreground: its head gets no gradient, yet both ranks reduce
    # every step, and the head's mean gradient is rank 0's over 2
    spawn(_steps_worker, str(tmp_path), "cpu", 1)
    samples = check_against_reference(tmp_path, "cpu", 1, rtol=0, atol=0)
    assert samples[1::2] == [0] * STEPS and all(samples[0::2])


def test_a_non_finite_loss_on_one_rank_skips_the_step_on_every_rank(tmp_path: Path):
    """Rank 1's second batch is NaN: its loss and gradients are not finite, the all_reduce
    carries that to rank 0, and both skip the update on the device (no host agreement); the
    next step trains again, the ranks still equal."""
    spawn(_steps_worker, str(tmp_path), "cpu", None, "gradient", (1, 2))
    params = [load_file(tmp_path / f"params-{r}.safetensors") for r in range(WORLD)]
    runs = [json.loads((tmp_path / f"run-{r}.json").read_text()) for r in range(WORLD)]
    names = sorted({k.split(".", 1)[1] for k in params[0]}, key=int)
    for r in range(WORLD):
        assert [rec["skipped"] for rec in runs[r]["records"]] == [False, True, False]
        assert runs[r]["skipped"] == 1
        assert runs[r]["records"][1]["total"] is None
        for i in names:
            assert torch.equal(params[r][f"2.{i}"], params[r][f"1.{i}"])   # no update
            assert torch.equal(params[r][f"3.{i}"], params[0][f"3.{i}"])   # ranks agree
    assert any(not torch.equal(params[0][f"3.{i}"], params[0][f"2.{i}"]) for i in names)


def test_fit_on_two_ranks_resumes_with_another_number_of_ranks(tmp_path: Path):
    runs = tmp_path / "runs"
    # 1 process, 2 steps; then 2 ranks resume it to 4: rank 0 reads the checkpoint and the
    # others receive its weights, optimizer state and counters
    fit(load_config(overrides=TINY | {"train.steps": 2}), run=RunDir.create(runs, "r"))
    spawn(_fit_worker, str(runs), "r", 4, True)
    final = [load_file(runs / f"final-{r}.safetensors") for r in range(WORLD)]
    for key, value in final[0].items():
        assert torch.equal(value, final[1][key]), key
    steps = [m for m in RunDir.open(runs / "r").read_metrics() if m["kind"] == "step"]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    assert [m.get("ranks") for m in steps] == [None, None, 2, 2]
    assert RunDir.open(runs / "r").latest_checkpoint().name == "step-00000004"
    # the checkpoint holds the global step: one process continues it again
    res = fit(load_config(overrides=TINY | {"train.steps": 5}),
              run=RunDir.create(runs, "r", resume=True), resume=True)
    assert res.step == 5


def test_cli_under_torchrun_a_run_refused_by_rank_0_stops_every_rank(tmp_path: Path):
    runs = tmp_path / "runs"
    spawn(_cli_refused_worker, str(runs))
    assert not (runs / "r").exists()


def test_cli_under_torchrun_rank_0_names_and_writes_the_run(tmp_path: Path):
    runs = tmp_path / "runs"
    spawn(_cli_worker, str(runs), 2)
    made = [p for p in runs.iterdir() if p.is_dir()]
    assert len(made) == 1 and made[0].name.startswith("lav-")   # one run, named by rank 0
    run = RunDir.open(made[0])
    steps = [m for m in run.read_metrics() if m["kind"] == "step"]
    assert [m["step"] for m in steps] == [1, 2] and all(m["ranks"] == 2 for m in steps)
    assert (run.path / "eval_test.json").is_file()
    assert [c.name for _, c in run.checkpoints()] == ["step-00000002"]


@pytest.mark.gpu
def test_two_gpu_ranks_equal_one_process_averaging_by_hand(tmp_path: Path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    # every step after the first runs with any host-device sync raising an error
    spawn(_steps_worker, str(tmp_path), "cuda", None)
    # the reference runs on cuda:0; NCCL's sum and cuDNN may round differently
    check_against_reference(tmp_path, "cuda", None, rtol=1e-4, atol=1e-6)
