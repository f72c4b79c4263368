"""A whole `alignprog train` run, timed and taken apart, on variable-length data.

    PYTHONPATH=. python -m benchmarks.train_run --methods lav --modes auto,off \
        --epochs 20 --json run.json

Trains with `alignprog.training.loop.fit`, as `alignprog train` does, on the EgoProceL-timeline
synthetic data by default (the real timelines of 161 videos, 121 of them for training, of
89-1527 frames; `data.synthetic.timelines=egoprocel`, `data.synthetic.dim=256`), once per
method and per
`train.cuda_graphs` mode, into a run directory under a temporary folder. The mode `compile` is
`train.cuda_graphs=off` with the model's forward and the alignment loss (not LAV's) under
`torch.compile` (`dynamic=True`, so that new lengths do not recompile; its compilations count as
steps). The
run's wall time is split into:

- start-up: from calling `fit` to its first step (dataset, model, run directory);
- steps: the training epochs' batches (`_train_epoch`, the GPU waited for at its end);
- validation: the validation losses and progress error after every epoch;
- checkpoints: every `Trainer.save`;
- final evaluation: the test-split report at the end;
- other: the rest (records, the display's callback).

Also reported: optimizer steps and videos per second of step time, the CUDA graphs captured and
replayed, the median step time of the logged steps, and the time to quality: the seconds from
calling `fit` to the end of the first epoch whose validation head error is within 10% of the
last epoch's. `--startup` also times `alignprog --help` and `import alignprog.cli` in fresh
processes (the minimum of 3).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from alignprog.config import load_config, parse_overrides
from alignprog.training import loop as loop_module
from alignprog.training import RunDir
from alignprog.training.trainer import Trainer

METHODS = ("tcc", "gtcc", "lav", "vava")
REALISTIC = {"data.synthetic.timelines": "egoprocel", "data.synthetic.dim": 256}


class PhaseClock:
    """Seconds spent in each phase, the GPU waited for at every boundary."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds: dict[str, float] = {}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def phase(self, name: str):
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


def compile_trainer(trainer: Trainer) -> None:
    """The trainer's model forward and alignment loss under `torch.compile` (instance
    attributes: the module, its state dict and checkpoints stay as they are). LAV's loss stays
    eager: its soft-DTW is one Triton kernel already, whose launch dynamo cannot trace with
    symbolic lengths (torch 2.11)."""
    trainer.model.forward = torch.compile(trainer.model.forward, dynamic=True)
    if trainer.cfg.train.method != "lav":
        trainer.alignment_loss = torch.compile(trainer.alignment_loss, dynamic=True)


@contextmanager
def instrumented(clock: PhaseClock, trainers: list, *, compiled: bool = False):
    """Time the phases of `fit` by wrapping the trainer's methods and the epoch loop
    (`compiled`: every trainer made goes through `compile_trainer`)."""
    originals = {"save": Trainer.save, "validation_losses": Trainer.validation_losses,
                 "evaluate": Trainer.evaluate, "__init__": Trainer.__init__}
    train_epoch = loop_module._train_epoch

    def init(self, *args, **kwargs):
        originals["__init__"](self, *args, **kwargs)
        if compiled:
            compile_trainer(self)
        trainers.append(self)

    def save(self, *args, **kwargs):
        with clock.phase("checkpoints"):
            return originals["save"](self, *args, **kwargs)

    def validation_losses(self, *args, **kwargs):
        with clock.phase("validation"):
            return originals["validation_losses"](self, *args, **kwargs)

    def evaluate(self, split, *args, **kwargs):
        with clock.phase("final_evaluation" if split == "test" else "validation"):
            return originals["evaluate"](self, split, *args, **kwargs)

    def epoch(*args, **kwargs):
        with clock.phase("steps"):
            return train_epoch(*args, **kwargs)

    Trainer.__init__, Trainer.save = init, save
    Trainer.validation_losses, Trainer.evaluate = validation_losses, evaluate
    loop_module._train_epoch = epoch
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(Trainer, name, fn)
        loop_module._train_epoch = train_epoch


def run_one(method: str, mode: str, args, folder: Path) -> dict:
    overrides = (REALISTIC if not args.synthetic_default else {}) | {
        "train.method": method, "train.cuda_graphs": "off" if mode == "compile" else mode,
        "train.device": args.device,
        "train.epochs": args.epochs} | parse_overrides(args.set)
    cfg = load_config(overrides=overrides)
    device = torch.device(args.device if args.device != "auto" else
                          ("cuda" if torch.cuda.is_available() else "cpu"))
    clock, trainers, events = PhaseClock(device), [], []

    def callback(kind: str, record: dict) -> None:
        events.append((time.perf_counter(), kind, record))

    run = RunDir.create(folder, f"{method}-{mode}")
    start = time.perf_counter()
    with instrumented(clock, trainers, compiled=mode == "compile"):
        result = loop_module.fit(cfg, run=run, callback=callback)
    clock.sync()
    wall = time.perf_counter() - start
    first_step = next((t for t, kind, _ in events if kind == "step"), None)
    trainer = trainers[-1]
    phases = dict(clock.seconds)
    # start-up: up to the first epoch's start; the first logged step lies inside the steps
    starts = [t for t, kind, _ in events if kind == "start"]
    phases["startup"] = (starts[0] - start) if starts else 0.0
    phases["other"] = wall - sum(phases.values())
    steps = result.step
    logged = [r for _, kind, r in events if kind == "step"]
    step_ms = [1e3 * r["seconds"] for r in logged if r.get("seconds")]
    epochs = [(t - start, r.get("val_progress_mae", {}).get("head"))
              for t, kind, r in events if kind == "epoch"]
    row = {"method": method, "cuda_graphs": mode, "epochs": args.epochs, "steps": steps,
           "wall_s": wall, "phases_s": phases,
           "steps_share": phases.get("steps", 0.0) / wall,
           "steps_per_s": steps / phases["steps"] if phases.get("steps") else None,
           "median_logged_step_ms": statistics.median(step_ms) if step_ms else None,
           "first_step_after_s": None if first_step is None else first_step - start,
           "test_head_mae": (result.test_report or {}).get("predictors", {}).get(
               "head", {}).get("metrics", {}).get("mae", {}).get("mean_over_videos")}
    if phases.get("steps"):
        # only the logged steps carry their counts: every step takes batch_size videos a batch
        per_step = cfg.data.batch_size * cfg.train.accumulate
        row["videos_per_s"] = steps * per_step / phases["steps"]
    graphs = trainer.graphs
    if graphs is not None:
        row["graphs_held"] = len(graphs.graphs)
        row["graph_replays"] = graphs.replays
        row["graph_captures"] = getattr(graphs, "captures", None)
        row["graph_failed"] = graphs.failed
    scores = [(t, mae) for t, mae in epochs if mae is not None]
    if scores:
        final = scores[-1][1]
        row["time_to_quality_s"] = next(t for t, mae in scores if mae <= 1.1 * final)
        row["val_head_mae_final"] = final
    return row


def startup_times() -> dict:
    """Fresh-process seconds of `alignprog --help` and of importing the CLI (min of 3)."""
    out = {}
    for name, cmd in (("help_s", [sys.executable, "-m", "alignprog", "--help"]),
                      ("import_cli_s", [sys.executable, "-c", "import alignprog.cli"])):
        times = []
        for _ in range(3):
            start = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            times.append(time.perf_counter() - start)
        out[name] = min(times)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="lav", help="comma list of tcc, gtcc, lav, vava; all")
    p.add_argument("--modes", default="auto,off",
                   help="train.cuda_graphs values (auto, on, off) and compile (off with "
                   "torch.compile), comma separated")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--synthetic-default", action="store_true",
                   help="the embedded synthetic default instead of the EgoProceL timelines")
    p.add_argument("--startup", action="store_true", help="also time --help and the import")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, as `alignprog train --set` (repeatable)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    methods = METHODS if args.methods == "all" else tuple(args.methods.split(","))
    rows: list[dict] = []
    out = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
           "torch": torch.__version__, "arguments": vars(args) | {"json": str(args.json)},
           "rows": rows}

    def write() -> None:   # after every row: a later failure or time-out keeps the earlier ones
        if args.json:
            args.json.write_text(json.dumps(out, indent=2, default=str))

    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            for mode in args.modes.split(","):
                try:
                    row = run_one(method, mode, args, Path(tmp))
                except Exception as exc:   # e.g. torch.compile failing: report, go on
                    rows.append({"method": method, "cuda_graphs": mode,
                                 "error": f"{type(exc).__name__}: {exc}"[:2000]})
                    print(f"{method:5s} {mode}: failed: {rows[-1]['error'][:300]}", flush=True)
                    write()
                    continue
                rows.append(row)
                write()
                ph = row["phases_s"]
                print(f"{method:5s} graphs={mode:4s} wall {row['wall_s']:6.1f} s: "
                      + ", ".join(f"{k} {v:.1f}" for k, v in ph.items())
                      + f"; steps {row['steps_share']:.0%} of wall, "
                      f"{row.get('videos_per_s') or 0:.0f} videos/s, "
                      f"graphs {row.get('graphs_held')} held / {row.get('graph_replays')} "
                      f"replays; to quality {row.get('time_to_quality_s', float('nan')):.1f} s"
                      f"; test head {row['test_head_mae']}", flush=True)
    if args.startup:
        out["startup"] = startup_times()
        print("start-up:", out["startup"])
    write()


if __name__ == "__main__":
    main()
