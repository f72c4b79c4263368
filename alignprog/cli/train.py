"""`alignprog train`: the joint encoder + progress-head training run."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Group
from rich.live import Live
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)
from rich.table import Table

from alignprog.cli.common import (ConfigOpt, SetOpt, config_choices, console, default_of,
                                   err_console, fail, guarded, print_table, report,
                                   resolve_config, show_number)
from alignprog.config import (DEFAULT_LAMBDA, ENCODER_LAYOUT, HEAD_INPUT, Config,
                              LearnableProgressConfig, ModelConfig, ProgressConfig, TrainConfig,
                              dump_config)


Method = config_choices("Method", TrainConfig, "method")
# progress.method's values, and none (progress.enabled false)
ProgressMethod = config_choices("ProgressMethod", ProgressConfig, "method", extra=("none",))
Head = config_choices("Head", LearnableProgressConfig, "arch")
HeadInput = config_choices("HeadInput", LearnableProgressConfig, "input")
ClipMode = config_choices("ClipMode", TrainConfig, "clip_mode")
LrSchedule = config_choices("LrSchedule", TrainConfig, "lr_schedule")
Balance = config_choices("Balance", ProgressConfig, "balance")
Encoder = config_choices("Encoder", ModelConfig, "encoder")
Precision = config_choices("Precision", TrainConfig, "precision")

# --lambda's default depends on the method: the per-method table.
LAMBDA_DEFAULTS = ", ".join(f"{m} {show_number(v)}" for m, v in DEFAULT_LAMBDA.items())
_AUTO_INPUTS = (f"{next(iter(HEAD_INPUT.values()))} for every method"
                if len(set(HEAD_INPUT.values())) == 1
                else ", ".join(f"{m} {v}" for m, v in HEAD_INPUT.items()))
_CLIPS = (f"encoder at train.encoder_clip = {default_of(Config, 'train.encoder_clip')}, head at "
          f"train.head_clip = {default_of(Config, 'train.head_clip')}")


def _fmt(value, spec: str = ".4g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _balance(record: dict) -> str:
    """How the start record's run balances its objectives, in a few words."""
    if record.get("balance") == "gradient":
        return f"gradient balance, ratio {show_number(record['balance_ratio'])}"
    if record.get("balance") == "fixed":
        return f"lambda {record['lambda']:g}"
    return "alignment only"


def _keep_saved_defaults(saved: Path, sets: list[str] | None, flags: dict) -> None:
    """A run saved before a setting of `SAVED_DEFAULTS` existed (progress.balance, the head's
    input), or with a head input of "auto" saved before training wrote it out, ran with its
    old value (`saved_config_fixes`): resumed, it keeps that value unless a flag or --set
    says otherwise."""
    from alignprog.config import read_config_file, saved_config_fixes
    from alignprog.errors import ConfigError
    try:
        data = read_config_file(saved)
    except ConfigError:
        return   # resolve_config reports it
    given = {item.split("=", 1)[0].strip() for item in sets or []}
    for key, old in saved_config_fixes(data).items():
        if flags.get(key) is None and key not in given:
            flags[key] = old


class Display:
    """Renders the loop's events: a live bar and table on a terminal, JSON lines, or quiet."""

    def __init__(self, mode: str) -> None:
        self.mode = mode  # "live", "plain", "json", "quiet"
        self.live: Live | None = None
        self.progress = Progress(TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                                 TimeElapsedColumn(), TimeRemainingColumn(), console=console)
        self.task = None
        self.rows: list[dict] = []
        self.epochs: list[dict] = []

    def table(self) -> Table:
        t = Table(title="training", title_justify="left")
        for col in ("step", "align", "progress", "λ·prog", "total", "|g| enc", "|g| enc clip",
                    "|g| head", "|g| head clip", "lr", "skip", "videos/s", "frames/s", "GPU MB"):
            t.add_column(col, justify="right")
        for r in self.rows[-8:]:
            rate = r["videos"] / r["seconds"] if r.get("seconds") else None
            frate = r["frames"] / r["seconds"] if r.get("seconds") else None
            t.add_row(str(r["step"]), _fmt(r["alignment"]), _fmt(r["progress"]),
                      _fmt(r.get("weighted_progress")), _fmt(r.get("total")),
                      _fmt(r.get("grad_encoder"), ".2e"),
                      _fmt(r.get("grad_encoder_clipped"), ".2e"),
                      _fmt(r.get("grad_head"), ".2e"), _fmt(r.get("grad_head_clipped"), ".2e"),
                      _fmt(r.get("lr"), ".1e"), str(r.get("skipped_total", 0)), _fmt(rate, ".1f"),
                      _fmt(frate, ".0f"), _fmt(r.get("gpu_memory_mb"), ".0f"))
        if self.epochs:
            e = Table(title="epochs (validation)", title_justify="left")
            for col in ("epoch", "step", "val align", "val progress", "val total",
                        "head MAE", "const 0.5 MAE", "frame-count MAE"):
                e.add_column(col, justify="right")
            for r in self.epochs[-5:]:
                mae = r.get("val_progress_mae") or {}
                e.add_row(str(r["epoch"]), str(r["step"]), _fmt(r.get("val_alignment")),
                          _fmt(r.get("val_progress")), _fmt(r.get("val_total")),
                          _fmt(mae.get("head"), ".4f"), _fmt(mae.get("constant_0.5"), ".4f"),
                          _fmt(mae.get("frame_count"), ".4f"))
            return Group(t, e)
        return t

    def __call__(self, kind: str, record: dict) -> None:
        if self.mode == "json":
            typer.echo(json.dumps({"kind": kind} | record, default=str))
            return
        if kind == "start":
            if self.mode != "quiet":
                err_console.print(
                    f"training {record['method']} on {record['device']}"
                    + (f" x {record['ranks']} ranks" if record.get("ranks", 1) > 1 else "")
                    + f": {record['steps']} steps "
                    f"({record['steps_per_epoch']} per epoch), " + _balance(record),
                    highlight=False)
            if self.mode == "live":
                self.task = self.progress.add_task("train", total=record["steps"], epoch=0,
                                                   rate="")
                if record.get("resumed_at"):
                    self.progress.update(self.task, completed=record["resumed_at"])
                self.live = Live(Group(self.progress, self.table()), console=console,
                                 refresh_per_second=4)
                self.live.start()
            return
        if kind == "step":
            self.rows.append(record)
            if self.mode == "live":
                rate = f"{1 / record['seconds']:.1f} steps/s" if record.get("seconds") else ""
                self.progress.update(self.task, completed=record["step"],
                                     epoch=record["epoch"], rate=rate)
            elif self.mode == "plain":
                console.print(f"step {record['step']}: alignment {_fmt(record['alignment'])} "
                              f"progress {_fmt(record['progress'])} total "
                              f"{_fmt(record.get('total'))}", highlight=False)
        elif kind == "epoch":
            self.epochs.append(record)
            if self.mode == "plain":
                mae = record.get("val_progress_mae") or {}
                console.print(f"epoch {record['epoch']}: val total {_fmt(record.get('val_total'))}"
                              f", progress MAE head {_fmt(mae.get('head'), '.4f')} const-0.5 "
                              f"{_fmt(mae.get('constant_0.5'), '.4f')} frame-count "
                              f"{_fmt(mae.get('frame_count'), '.4f')}", highlight=False)
        elif kind == "end":
            self.stop()
            return
        if self.live is not None:
            self.live.update(Group(self.progress, self.table()))

    def stop(self) -> None:
        if self.live is not None:
            self.live.update(Group(self.progress, self.table()))
            self.live.stop()
            self.live = None


def _result_table(report: dict) -> Table:
    # the last weights; eval-progress scores the `best` checkpoint by default
    t = Table(title=f"progress error of the last weights on the {report.get('split', 'test')} "
              "split (action-level, online, mean absolute error)", title_justify="left")
    t.add_column("predictor", no_wrap=True, min_width=14)
    for col in ("MAE (mean over videos)", "MAE (all frames)", "early", "mid", "late",
                "monotonic"):
        t.add_column(col, justify="right")
    for name, res in report.get("predictors", {}).items():
        res = res["metrics"]
        bins = res.get("by_progress") or {}
        t.add_row(name, _fmt(res["mae"]["mean_over_videos"], ".4f"),
                  _fmt(res["mae"]["pooled"], ".4f"),
                  *(_fmt((bins.get(b) or {}).get("mae"), ".4f") for b in ("early", "mid", "late")),
                  _fmt((res.get("monotonicity") or {}).get("share"), ".3f"))
    return t


@guarded
def train(
    method: Annotated[Optional[Method], typer.Option(
        help="Alignment method.", show_default=default_of(Config, "train.method"))] = None,
    dataset: Annotated[Optional[Path], typer.Option(
        help="Dataset root (see `alignprog data check`). Unset: the embedded synthetic dataset.",
        show_default=False)] = None,
    epochs: Annotated[Optional[int], typer.Option(
        help="Epochs.", show_default=default_of(Config, "train.epochs"))] = None,
    steps: Annotated[Optional[int], typer.Option(
        help="Optimizer steps in all; overrides --epochs.", show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option(
        help="Videos per batch (one task per batch).",
        show_default=default_of(Config, "data.batch_size"))] = None,
    lr: Annotated[Optional[float], typer.Option(
        help="Adam learning rate of the encoder.",
        show_default=default_of(Config, "train.lr"))] = None,
    head_lr: Annotated[Optional[float], typer.Option(
        help="Learning rate of the progress head.",
        show_default=default_of(Config, "train.head_lr"))] = None,
    lr_schedule: Annotated[Optional[LrSchedule], typer.Option(
        help="After --warmup-steps: constant, or cosine down to train.min_lr_ratio times each "
        "learning rate at the last step (each stage of --two-stage its own).",
        show_default=default_of(Config, "train.lr_schedule"))] = None,
    warmup_steps: Annotated[Optional[int], typer.Option(
        help="Optimizer steps of linear learning-rate warm-up (0: none).",
        show_default=default_of(Config, "train.warmup_steps"))] = None,
    accumulate: Annotated[Optional[int], typer.Option(
        help="Batches averaged into one optimizer step (gradient accumulation; one process, "
        "eager step); --steps counts optimizer steps.",
        show_default=default_of(Config, "train.accumulate"))] = None,
    progress: Annotated[Optional[ProgressMethod], typer.Option(
        help="Progress predictor trained with the encoder.",
        show_default=default_of(Config, "progress.method"))] = None,
    balance: Annotated[Optional[Balance], typer.Option(
        help="How the objectives share the encoder: gradient (each step, the progress "
        "gradient on the embeddings --balance-ratio times the alignment's, whatever the "
        "alignment loss's scale) or fixed (total = alignment + lambda * progress, --lambda).",
        show_default=default_of(Config, "progress.balance"))] = None,
    balance_ratio: Annotated[Optional[float], typer.Option(
        help="--balance gradient: the progress gradient's norm over the alignment's.",
        show_default=default_of(Config, "progress.balance_ratio"))] = None,
    lambda_: Annotated[Optional[float], typer.Option(
        "--lambda", help="--balance fixed: total = alignment + lambda * progress; given alone "
        "it chooses --balance fixed.",
        show_default=LAMBDA_DEFAULTS)] = None,
    head: Annotated[Optional[Head], typer.Option(
        help="Progress-head architecture.",
        show_default=default_of(Config, "progress.learnable.arch"))] = None,
    head_input: Annotated[Optional[HeadInput], typer.Option(
        help="What the head reads: embeddings (the aligned embeddings), features (the base "
        "encoder's output, before the fusion) or separate (a base encoder of its own, trained "
        f"by the progress loss alone); auto: per method ({_AUTO_INPUTS}).",
        show_default=default_of(Config, "progress.learnable.input"))] = None,
    clip_mode: Annotated[Optional[ClipMode], typer.Option(
        help=f"Gradient clipping: separate ({_CLIPS}), global (one clip over everything at "
        "train.encoder_clip; the pipeline description uses 1e-5), none.",
        show_default=default_of(Config, "train.clip_mode"))] = None,
    encoder: Annotated[Optional[Encoder], typer.Option(
        help="Base encoder; resnet50 reads the frames/ layout.",
        show_default=default_of(Config, "model.encoder"))] = None,
    device: Annotated[Optional[str], typer.Option(
        help="auto, cpu, cuda or cuda:N.", show_default=default_of(Config, "train.device"))
    ] = None,
    precision: Annotated[Optional[Precision], typer.Option(
        help="fp32, or bf16 autocast for the model (losses stay fp32).",
        show_default=default_of(Config, "train.precision"))] = None,
    seed: Annotated[Optional[int], typer.Option(
        help="Seed.", show_default=default_of(Config, "train.seed"))] = None,
    name: Annotated[Optional[str], typer.Option(
        help="Run name under --runs-dir.", show_default="<method>-<timestamp>")] = None,
    runs_dir: Annotated[Optional[Path], typer.Option(
        help="Folder of the runs.", show_default=default_of(Config, "train.runs_dir"))] = None,
    two_stage: Annotated[Optional[bool], typer.Option(
        "--two-stage/--joint", help="Train the head alone on the frozen encoder after the "
        "alignment epochs, instead of jointly only.",
        show_default=default_of(Config, "train.two_stage",
                                {True: "two-stage", False: "joint"}))] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the run --name from its latest checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace an existing run of the same name.")] = False,
    print_config: Annotated[bool, typer.Option(
        "--print-config", help="Print the resolved config and exit.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="Only the final result.")] = False,
    json_logs: Annotated[bool, typer.Option(
        "--json-logs", help="One JSON object per log record on stdout.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Train the aligned encoder and the progress head together.

    Every run writes runs/NAME/ (config.yaml, split.json, meta.json, metrics.jsonl,
    checkpoints/, eval_test.json) and prints the progress error of the trained head on the
    test split beside the constant-0.5 and frame-counting baselines.

    Under torchrun (torchrun --nproc-per-node 2 -m alignprog train ...) every process trains
    on its share of the batches (one GPU each, NCCL; gloo on the CPU) and rank 0 writes the run.
    """
    flags = {
        "train.method": method.value if method else None, "data.root": dataset,
        "train.epochs": epochs, "train.steps": steps, "data.batch_size": batch_size,
        "train.lr": lr, "train.head_lr": head_lr,
        "train.lr_schedule": lr_schedule.value if lr_schedule else None,
        "train.warmup_steps": warmup_steps, "train.accumulate": accumulate,
        "progress.lambda_fixed": lambda_,
        "progress.balance": balance.value if balance else None,
        "progress.balance_ratio": balance_ratio,
        "progress.learnable.arch": head.value if head else None,
        "progress.learnable.input": head_input.value if head_input else None,
        "train.clip_mode": clip_mode.value if clip_mode else None,
        "model.encoder": encoder.value if encoder else None,
        "data.layout": ENCODER_LAYOUT[encoder.value] if encoder else None,
        "train.device": device, "train.precision": precision.value if precision else None,
        "train.seed": seed, "train.name": name, "train.runs_dir": runs_dir,
        "train.two_stage": two_stage,
    }
    if progress is not None:
        flags["progress.enabled"] = progress is not ProgressMethod.none
        if progress is not ProgressMethod.none:
            flags["progress.method"] = progress.value
    if resume:
        # A resumed run continues with its own saved config; flags given now override it.
        if not name:
            fail("--resume needs --name RUN (the run directory to continue)", 2)
        saved = Path(runs_dir or "runs") / name / "config.yaml"
        if config is None and saved.is_file():
            config = saved
            _keep_saved_defaults(saved, set_, flags)
    cfg = resolve_config(config, set_, flags)
    from alignprog.training import distributed

    if print_config:
        if distributed.is_main_process():
            typer.echo(dump_config(cfg), nl=False)
        return
    if distributed.launched_by_torchrun():
        with distributed.process_group(cfg.train.device) as dist:
            _train(cfg, dist, resume=resume, overwrite=overwrite, json_logs=json_logs,
                   quiet=quiet)
    else:
        _train(cfg, distributed.SINGLE, resume=resume, overwrite=overwrite, json_logs=json_logs,
               quiet=quiet)


def _create_run(cfg, dist, dataset, device, *, resume: bool, overwrite: bool):
    """Rank 0 checks that the largest step fits, then creates (or reopens) the run directory and
    picks its name; the other ranks learn the name, or rank 0's error, so that none of them
    waits for a run that never starts."""
    from alignprog.training import RunDir
    from alignprog.training.trainer import TrainingError
    from alignprog.training.memory import memory_problem
    from alignprog.training.rundir import claim_run_name

    if not dist.is_main:
        answer = json.loads(dist.broadcast_text(None))
        if "error" in answer:  # rank 0 reports it
            raise typer.Exit(1)
        return None, answer["name"]
    try:
        problem = memory_problem(dataset, cfg, device) if cfg.train.memory_check else None
        if problem:
            raise TrainingError(problem)
        claimed = not cfg.train.name
        run_name = cfg.train.name or claim_run_name(cfg.train.method, cfg.train.runs_dir)
        run = RunDir.create(Path(cfg.train.runs_dir), run_name, overwrite=overwrite,
                            resume=resume, claimed=claimed)
    except Exception as exc:
        dist.broadcast_text(json.dumps({"error": str(exc)}))
        raise
    dist.broadcast_text(json.dumps({"name": run_name}))
    return run, run_name


def _train(cfg, dist, *, resume: bool, overwrite: bool, json_logs: bool, quiet: bool) -> None:
    from alignprog.runtime import resolve_device
    from alignprog.training.loop import check_config, fit

    from alignprog.data import load_dataset

    # a bad device fails before any run directory exists
    device = dist.device if dist.active else resolve_device(cfg.train.device)
    # The dataset is loaded before the run directory is created or replaced: a typo in
    # --dataset must not cost the old run of --overwrite.
    dataset = load_dataset(cfg.data)
    from alignprog.data.dataset import training_problems
    for line in training_problems(dataset, cfg.data):   # what data check warns about, too
        if dist.is_main and not quiet:
            report("warning", line)
    check_config(cfg, dist)

    run, run_name = _create_run(cfg, dist, dataset, device, resume=resume,
                                overwrite=overwrite)
    mode = ("json" if json_logs else "quiet" if quiet
            else "live" if sys.stdout.isatty() else "plain")
    display = Display(mode) if dist.is_main else None   # rank 0 alone shows the run
    try:
        result = fit(cfg, dataset=dataset, run=run, resume=resume, callback=display, dist=dist)
    except BaseException:
        if run is not None:
            run.discard_if_unstarted()   # a failed start leaves no stale runs/NAME/
        raise
    finally:
        if display is not None:
            display.stop()
    if not dist.is_main:
        if result.interrupted:
            raise typer.Exit(130)
        return
    if result.interrupted:
        err_console.print(f"interrupted at step {result.step}: checkpoint saved; continue with "
                          f"--name {escape(run_name)} --resume", highlight=False)
        raise typer.Exit(130)
    if mode != "json" and result.test_report:
        print_table(_result_table(result.test_report))
    if mode != "json":
        console.print(f"run directory: {escape(str(run.path))}", highlight=False)
