"""Rebuilding a trained model from a run directory or a checkpoint (evaluation, export)."""

from __future__ import annotations

from pathlib import Path

from alignprog.config import Config
from alignprog.errors import AlignprogError
from alignprog.models import AlignmentModel, build_model
from alignprog.training.checkpoint import load_checkpoint, read_checkpoint_meta
from alignprog.training.rundir import RunDir


def resolve_checkpoint(run_dir: Path, checkpoint: str = "best") -> Path:
    """``best`` (falls back to the latest when there is none), ``last``, or a path (a
    checkpoint directory, absolute or relative to the run's checkpoints/)."""
    run = RunDir.open(Path(run_dir))
    if checkpoint in ("best", "last"):
        path = run.best_checkpoint() if checkpoint == "best" else None
        path = path or run.latest_checkpoint()
        if path is None:
            raise AlignprogError(f"{run.path}: the run has no checkpoint yet")
        return path
    path = Path(checkpoint)
    if not path.exists() and (run.checkpoints_dir / checkpoint).exists():
        path = run.checkpoints_dir / checkpoint
    return path


def load_trained_model(checkpoint: Path, *, device: str = "cpu"
                       ) -> tuple[Config, AlignmentModel, dict]:
    """The config, the model with its trained weights (eval mode) and the checkpoint's state.

    The architecture comes from the checkpoint's own meta (config, input shape, task count),
    so no dataset is needed; weights are read from safetensors (never unpickled)."""
    meta = read_checkpoint_meta(checkpoint)["meta"]
    for key in ("config", "input_shape", "num_tasks"):
        if key not in meta:
            raise AlignprogError(f"{checkpoint}: the checkpoint's meta lacks '{key}' (written by "
                                 "an older alignprog?)")
    cfg = Config.model_validate(meta["config"])
    model = build_model(cfg.model, cfg.progress, input_shape=meta["input_shape"],
                        num_tasks=meta["num_tasks"], method=cfg.train.method)
    state = load_checkpoint(checkpoint, model=model, restore_rng=False)
    return cfg, model.to(device).eval(), state
