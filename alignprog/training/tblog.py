"""TensorBoard scalars of a run's step, epoch and end records (`train.tensorboard`), under
RUN_DIR/tensorboard/.

Every numeric value of a record becomes one scalar tagged `KIND/NAME` at the record's `step`;
nested values are flattened to dotted names as in the CSV files (`epoch/val_progress_mae.head`),
booleans are 0/1, and None, text and lists are left out. Resuming rebuilds the folder from
metrics.jsonl, cut at the resumed step like it, so that no step is written twice.

The tensorboard package is optional: `require` names the install command when it is missing,
and nothing here imports it before a run asks for it.
"""

from __future__ import annotations

import math
import numbers
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from alignprog.errors import ConfigError
from alignprog.training.csvlog import flatten

KINDS = ("step", "epoch", "end")
DIRNAME = "tensorboard"
# The rebuilt history's event file. TensorBoard reads a folder's event files in name order and,
# on a step lower than the last one read, drops the later events as orphaned; the live writer's
# file is named after the current time, so this name must sort before any such name.
REBUILT_NAME = "events.out.tfevents.0000000000.rebuilt"


def log_dir(run_dir: Path) -> Path:
    return Path(run_dir) / DIRNAME


def require() -> None:
    """Raise a one-line `ConfigError` naming the install command if tensorboard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ConfigError("train.tensorboard=true needs the tensorboard package, which is not "
                          "installed: pip install 'alignprog[tensorboard]'") from None


def _writer(path: Path):
    require()
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(path))


def scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """The numeric values of `record` by dotted name; `step` (the x axis) and `kind` are not
    values."""
    out: dict[str, float] = {}
    for name, value in flatten(record).items():
        if name in ("step", "kind"):
            continue
        if isinstance(value, (np.generic, torch.Tensor)) and np.ndim(value) == 0:
            value = value.item()
        if value == "nan":   # flatten writes NaN as this text, for the CSV cell
            value = math.nan
        if isinstance(value, numbers.Real):   # bool included: True is 1
            out[name] = float(value)
    return out


def _write(writer, kind: str, record: Mapping[str, Any]) -> None:
    step = record.get("step")
    if kind not in KINDS or not isinstance(step, int) or isinstance(step, bool):
        return
    for name, value in scalars(record).items():
        writer.add_scalar(f"{kind}/{name}", value, global_step=step)


class TensorBoardLog:
    """The live event writer of one run: `append` each record, `close` at the end (the loop
    closes it also when training stops on an error or an interrupt)."""

    def __init__(self, run_dir: Path) -> None:
        self.writer = _writer(log_dir(run_dir))

    def append(self, kind: str, record: Mapping[str, Any]) -> None:
        """The scalars of a step, epoch or end record; other kinds are not written. Epoch
        and end records are flushed to disk at once."""
        _write(self.writer, kind, record)
        if kind in ("epoch", "end"):
            self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def rebuild(run_dir: Path, records: Iterable[Mapping[str, Any]]) -> None:
    """The folder anew from metrics.jsonl's records (on resume), without the earlier sessions'
    event files. The new history is written to a temporary sibling folder and swapped in, so
    an interrupted rebuild leaves the old folder, or none, never half of a new one."""
    final = log_dir(run_dir)
    tmp = final.with_name(f".{DIRNAME}.tmp")
    old = final.with_name(f".{DIRNAME}.old")
    for leftover in (tmp, old):   # from a rebuild interrupted before
        shutil.rmtree(leftover, ignore_errors=True)
    wanted = [r for r in records if r.get("kind") in KINDS]
    if wanted:
        writer = _writer(tmp)
        try:
            for record in wanted:
                _write(writer, record["kind"], record)
        finally:
            writer.close()
        written = [p for p in tmp.iterdir() if "tfevents" in p.name]
        if len(written) == 1:
            written[0].rename(tmp / REBUILT_NAME)
    if final.exists():
        final.rename(old)
    if wanted:
        tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
