"""The training loop: one explicit `fit()` (see docs/algorithms.md#training-step).

Per step: forward -> alignment loss of the method -> progress loss (learnable head on sampled
segments, or cumulative_l2, or none) -> backward of the two, balanced by their gradients on the
embeddings (progress.balance=gradient) or total = alignment + lambda * progress (fixed) ->
(several processes: gradients averaged over the ranks) -> fixed: progress-head gradients
divided by lambda -> clipping -> optimizer step -> zero grads (`step.take_step`).
Reporting goes through a callback (the CLI renders it; tests collect it), so no rich here.

Several processes (torchrun, `alignprog.training.distributed`): every rank holds the same model
and takes its share of each epoch's single-task batches; one step is one batch per rank, so the
effective batch is ranks x data.batch_size (the learning rate is not scaled). Rank 0 alone
writes the run directory and evaluates (validation, test) while the others wait; `fit` calls the
callback on every rank (the CLI passes a display to rank 0 only).
"""

from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from alignprog.config import Config
from alignprog.data import Dataset, load_dataset, make_loader
from alignprog.errors import ConfigError
from alignprog.models import AlignmentModel
from alignprog.runtime import deterministic, device_info, resolve_device
from alignprog.training import csvlog, tblog
from alignprog.training.distributed import SINGLE, Dist
from alignprog.training.rundir import RunDir
from alignprog.training.trainer import Trainer, TrainingError  # noqa: F401 (re-exported)

Callback = Callable[[str, dict], None]


@dataclass
class FitResult:
    model: AlignmentModel
    step: int
    epoch: int
    history: list[dict] = field(default_factory=list)
    test_report: dict | None = None
    interrupted: bool = False


class StepClock:
    """Seconds per step between two logged steps: on a GPU `step_batch` returns before the GPU
    is done, so its own duration says nothing; a logged step has waited for it (`read`)."""

    def __init__(self, step: int) -> None:
        self.restart(step)

    def restart(self, step: int) -> None:
        self.time, self.step = time.perf_counter(), step

    def lap(self, record: dict, step: int) -> dict:
        now = time.perf_counter()
        if step > self.step:
            record["seconds"] = (now - self.time) / (step - self.step)
        self.time, self.step = now, step
        return record


def summarise(report: dict | None) -> dict:
    """Headline numbers of a progress report: mean-over-videos MAE per predictor."""
    if not report:
        return {}
    return {name: res["metrics"]["mae"]["mean_over_videos"]
            for name, res in report.get("predictors", {}).items()}


def _iterate(loader, batches: list[list[int]], skip: int):
    """The epoch's batches from `skip` on (resuming mid-epoch skips loading the done ones)."""
    for indices in batches[skip:]:
        yield loader.collate_fn([loader.dataset[i] for i in indices])


def _groups(batches, size: int):
    """Consecutive lists of `size` batches (a shorter last one is left out)."""
    group: list = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []


def fit(cfg: Config, *, dataset: Dataset | None = None, run: RunDir | None = None,
        resume: bool = False, callback: Callback | None = None,
        dist: Dist = SINGLE) -> FitResult:
    """Train the model `cfg` describes; the same seed and config give the same numbers on
    the same device (deterministic kernels are switched on for the run).

    `dist`: this process's place in a multi-process run (`alignprog.training.distributed.setup`); it
    trains on `dist.device`, and only rank 0 uses `run` (the others may pass None)."""
    cfg = cfg.resolved()   # saved as run: auto written out per method
    with deterministic(cfg.train.deterministic), _sigterm_as_interrupt():
        return _fit(cfg, dataset=dataset, run=run, resume=resume, callback=callback, dist=dist)


class _sigterm_as_interrupt:
    """During fit, SIGTERM raises KeyboardInterrupt in the main thread, so a killed run saves a
    checkpoint as Ctrl-C does; the previous handler is restored afterwards."""

    def __enter__(self):
        self.old = None
        if threading.current_thread() is threading.main_thread():
            def handler(signum, frame):
                raise KeyboardInterrupt
            self.old = signal.signal(signal.SIGTERM, handler)
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)
        return False


def _fit(cfg: Config, *, dataset: Dataset | None, run: RunDir | None, resume: bool,
         callback: Callback | None, dist: Dist) -> FitResult:
    """Train the model `cfg` describes (see the module docstring for one step).

    Every `train.log_every` steps a "step" record, at each epoch end an "epoch" record with the
    validation losses and progress errors, at the end an "end" record with the test errors; each
    goes to `callback(kind, record)` and, with a run directory, to its metrics.jsonl.
    """
    emit = callback or (lambda kind, record: None)
    tc = cfg.train
    check_config(cfg, dist)
    device = dist.device if dist.active else resolve_device(tc.device)
    run = run if dist.is_main else None          # rank 0 alone writes the run directory
    dataset = dataset or load_dataset(cfg.data)
    trainer = Trainer(cfg, dataset, device, dist)
    saved: dict = {}
    if run is not None:
        if resume:
            state = trainer.restore(run.latest_checkpoint())
            saved["world_size"] = state.get("world_size", 1)
            run.truncate_metrics_after(trainer.step)
            if cfg.train.csv_metrics:
                csvlog.rebuild(run.path, run.read_metrics())
            if cfg.train.tensorboard:
                tblog.rebuild(run.path, run.read_metrics())
        else:
            run.write_config(cfg)
            run.write_split(dataset.splits)
            run.write_environment(device_info(device) | {"dataset": dataset.name,
                                                         "videos": len(dataset.videos)})
    saved = trainer.sync(saved)   # rank 0's weights, optimizer and counters on every rank
    tb = tblog.TensorBoardLog(run.path) if run is not None and tc.tensorboard else None
    try:
        return _fit_loop(cfg, trainer, dataset, run, resume, emit, dist, device, saved, tb)
    finally:   # also on an error or an interrupt: no open event file is left behind
        if tb is not None:
            tb.close()


def check_config(cfg: Config, dist: Dist = SINGLE) -> None:
    """The config errors `fit` raises before any work (the CLI calls this before it creates
    or replaces the run directory); the encoder -> data layout rule is the config's own."""
    if not cfg.data.multi_task:
        raise ConfigError("data.multi_task=false (single-task mode) is not supported by train "
                          "yet; train on one task with --set 'data.tasks=[TASK]' instead")
    if cfg.train.accumulate > 1 and dist.active:
        raise ConfigError("train.accumulate > 1 runs in one process only (several processes "
                          "already average their batches' gradients: use more processes or "
                          "a larger data.batch_size instead)")
    if cfg.train.tensorboard:
        tblog.require()


def _fit_loop(cfg: Config, trainer: Trainer, dataset: Dataset, run: RunDir | None, resume: bool,
              emit: Callback, dist: Dist, device: torch.device, saved: dict,
              tb: tblog.TensorBoardLog | None) -> FitResult:
    tc = cfg.train
    loader = make_loader(dataset, "train", batch_size=cfg.data.batch_size, shuffle=True,
                         drop_last=True, seed=tc.seed, num_workers=tc.num_workers,
                         pin_memory=device.type == "cuda", num_replicas=dist.world_size,
                         rank=dist.rank)
    # optimizer steps; with train.accumulate, an epoch's batches beyond a multiple of it drop
    steps_per_epoch = len(loader) // tc.accumulate
    if steps_per_epoch == 0:
        raise ConfigError("the training split forms no batch (a task needs at least two "
                          "training videos)" if len(loader) == 0 else
                          f"the training split forms {len(loader)} batches an epoch, fewer "
                          f"than train.accumulate={tc.accumulate}")
    total_steps = tc.steps or tc.epochs * steps_per_epoch
    if resume and not tc.steps and saved.get("world_size", 1) != dist.world_size:
        # Resumed with another number of ranks: the steps done were counted at the old one;
        # finish the remaining epochs at the new one (checkpoints hold the global step).
        total_steps = (trainer.step + (tc.epochs - trainer.epoch) * steps_per_epoch
                       - trainer.batch_in_epoch // dist.world_size)
    trainer.set_schedule(0, total_steps)
    emit("start", {"steps": total_steps, "epochs": math.ceil(total_steps / steps_per_epoch),
                   "steps_per_epoch": steps_per_epoch, "device": str(device),
                   "lambda": trainer.lam if trainer.balance == "fixed" else None,
                   "balance": trainer.balance if cfg.progress.enabled else None,
                   "balance_ratio": trainer.balance_ratio, "method": tc.method,
                   "ranks": dist.world_size,
                   "resumed_at": trainer.step if resume else None})
    result = FitResult(trainer.model, trainer.step, trainer.epoch)

    def log(kind: str, record: dict) -> None:
        result.history.append(record | {"kind": kind})
        if run is not None:
            run.log_metrics(record | {"kind": kind})
            if tc.csv_metrics:
                csvlog.append(run.path, kind, record)
            if tb is not None:
                tb.append(kind, record)
        emit(kind, record)

    clock = StepClock(trainer.step)
    try:
        while trainer.stage == 1 and trainer.step < total_steps:
            _train_epoch(trainer, loader, log, run, clock, total_steps=total_steps)
            record = {"step": trainer.step, "epoch": trainer.epoch}
            if dist.is_main:  # the others wait at the barrier: no double counting
                record |= trainer.validation_losses("val")
                record["val_progress_mae"] = summarise(trainer.evaluate("val"))
            _end_epoch(trainer, log, run, clock, record, record.get("val_score"))
        if tc.two_stage and trainer.learnable:
            # Second stage: the head alone on the frozen encoder, progress loss only, its own
            # Adam (lr head_lr, else 1e-3) and head clip; `best` is chosen by the head's
            # validation error. A resumed stage-2 run arrives with its optimizer rebuilt.
            if trainer.stage != 2:
                trainer.enter_head_stage()
            trainer.set_schedule(total_steps, tc.head_epochs * steps_per_epoch)
            while trainer.epoch - trainer.head_start < tc.head_epochs:
                _train_epoch(trainer, loader, log, run, clock, head_only=True)
                record = {"step": trainer.step, "epoch": trainer.epoch, "stage": "head"}
                if dist.is_main:
                    record["val_progress_mae"] = summarise(trainer.evaluate("val"))
                _end_epoch(trainer, log, run, clock, record,
                           (record.get("val_progress_mae") or {}).get("head"),
                           first_is_best=True)
    except KeyboardInterrupt:
        if run is not None:
            trainer.save(run)
        result.interrupted = True
        result.step, result.epoch = trainer.step, trainer.epoch
        return result
    test = trainer.evaluate("test") if dist.is_main else None
    dist.barrier()
    if run is not None and test is not None:
        run.write_json("eval_test.json", test)
    log("end", {"step": trainer.step, "epoch": trainer.epoch,
                "test_progress_mae": summarise(test)})
    result.step, result.epoch, result.test_report = trainer.step, trainer.epoch, test
    return result


def _train_epoch(trainer: Trainer, loader, log: Callback, run: RunDir | None,
                 clock: StepClock, *, total_steps: int | None = None,
                 head_only: bool = False) -> None:
    """The rest of the current epoch's batches (all of them, or up to `total_steps`), one
    optimizer step per `train.accumulate` of them (`step_batches`; the epoch's last batches
    short of that drop), logging every `train.log_every` steps and checkpointing every
    `train.checkpoint_every` steps."""
    tc, dist = trainer.cfg.train, trainer.dist
    loader.batch_sampler.set_epoch(trainer.epoch)
    batches = loader.batch_sampler.batches()
    batches = batches[:len(batches) - len(batches) % tc.accumulate]
    # batch_in_epoch counts the batches of all ranks: a run resumed with another number of
    # ranks redoes at most one batch per rank rather than skipping any. Checkpoints fall
    # between steps, so a resumed epoch starts at a step's first batch.
    # Each step's batches are loaded, and their GPU copies started (`prefetch`), while the
    # step before them runs.
    groups = _groups(_iterate(loader, batches, trainer.batch_in_epoch // dist.world_size),
                     tc.accumulate)
    upcoming = next(groups, None)
    while upcoming is not None:
        group, upcoming = upcoming, next(groups, None)
        if upcoming is not None and (total_steps is None or trainer.step + 1 < total_steps):
            trainer.prefetch(upcoming)
        metrics = trainer.step_batches(group, head_only=head_only)
        trainer.batch_in_epoch += dist.world_size * len(group)
        # Reading the metrics waits for the GPU: only at the logged steps, and every
        # max_bad_steps steps to stop a run that keeps skipping.
        if trainer.step % tc.log_every == 0 or trainer.step == total_steps:
            record = clock.lap(trainer.read(metrics), trainer.step)
            log("step", record | ({"stage": "head"} if head_only else {}))
        elif trainer.step % tc.max_bad_steps == 0:
            trainer.read(metrics)
        if run is not None and tc.checkpoint_every and trainer.step % tc.checkpoint_every == 0:
            trainer.save(run)
        if total_steps is not None and trainer.step >= total_steps:
            break
    trainer.uploads.clear()   # a copy started for a step that did not run


def _end_epoch(trainer: Trainer, log: Callback, run: RunDir | None, clock: StepClock,
               record: dict, score: float | None, *, first_is_best: bool = False) -> None:
    """Log the epoch, save a checkpoint, and `best` when `score` (lower is better; rank 0's,
    None elsewhere) improved on the best so far (`first_is_best`: the stage's first epoch is
    best even without a score)."""
    dist = trainer.dist
    improved = False
    if dist.is_main:
        if trainer.best_val is None:
            improved = score is not None or first_is_best
        else:
            improved = score is not None and score < trainer.best_val
    if improved and score is not None:
        trainer.best_val = score
    trainer.epoch += 1
    trainer.batch_in_epoch = 0
    log("epoch", record)
    if run is not None:
        trainer.save(run)
        if improved:
            trainer.save(run, best=True)
    dist.barrier()
    clock.restart(trainer.step)   # evaluation and saving are not training time
