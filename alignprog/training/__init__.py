"""Training: the loop, checkpoints and run directories."""

from alignprog.training.checkpoint import (
    CheckpointError,
    checkpoint_name,
    checkpoint_step,
    load_checkpoint,
    read_checkpoint_meta,
    save_checkpoint,
)
from alignprog.training.rundir import RunDir, RunError, default_run_name

__all__ = [
    "CheckpointError",
    "RunDir",
    "RunError",
    "checkpoint_name",
    "checkpoint_step",
    "default_run_name",
    "load_checkpoint",
    "read_checkpoint_meta",
    "save_checkpoint",
]
