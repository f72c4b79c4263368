"""Rebuilding a trained model from a run directory or a checkpoint (evaluation, export)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from alignprog.checks import check_weights
from alignprog.config import Config, DataConfig, with_saved_config_fixes
from alignprog.errors import AlignprogError
from alignprog.models import AlignmentModel, build_model
from alignprog.training.checkpoint import load_checkpoint, read_checkpoint_meta
from alignprog.training.rundir import RunDir

if TYPE_CHECKING:
    from alignprog.data.dataset import Dataset


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
    cfg = Config.model_validate(with_saved_config_fixes(meta["config"]))
    model = build_model(cfg.model, cfg.progress, input_shape=meta["input_shape"],
                        num_tasks=meta["num_tasks"], method=cfg.train.method)
    state = load_checkpoint(checkpoint, model=model, restore_rng=False)
    return cfg, model.to(device).eval(), state


@dataclass(frozen=True)
class OpenedRun:
    """A trained run ready to evaluate: its checkpoint's model and config, and its data.

    ``data_config`` is the checkpoint's data config with the run's own split.json (the split
    the model was trained with) and, when asked, another dataset root. The dataset is read on
    first access of ``dataset``, so a caller can say what it is about to read first.
    """

    run: RunDir
    checkpoint: Path              # the resolved checkpoint directory
    device: torch.device          # where ``model`` lives
    config: Config                # the checkpoint's config
    model: AlignmentModel         # trained weights, eval mode, on ``device``
    state: dict[str, Any]         # the checkpoint's state (step, epoch, ...)
    data_config: DataConfig

    @cached_property
    def dataset(self) -> "Dataset":
        """The run's dataset, loaded from ``data_config`` once."""
        from alignprog.data.dataset import load_dataset

        return load_dataset(self.data_config)


def open_run(run_dir: Path, *, checkpoint: str = "best", dataset: Path | None = None,
             device: str | torch.device = "cpu") -> OpenedRun:
    """Open a run directory for evaluation: its checkpoint (`resolve_checkpoint`), the model
    with checked weights on ``device`` (``auto``, ``cpu``, ``cuda`` or ``cuda:N``) and the data
    config of the checkpoint, reading ``dataset`` instead of the configured root if given.

    Every failure (no run, no checkpoint, a bad device, a damaged checkpoint or corrupted
    weights) is one AlignprogError line, raised before any dataset is read.
    """
    from alignprog.runtime import resolve_device

    run = RunDir.open(Path(run_dir))
    ckpt = resolve_checkpoint(run.path, checkpoint)
    dev = resolve_device(str(device))
    # One line for a damaged checkpoint; NaN/Inf or absurd weights are refused (they would
    # "evaluate" to head None and a bogus cumulative_l2 MAE).
    cfg, model, state = load_checked_model(ckpt, device=str(dev))

    data_cfg = cfg.data
    updates: dict[str, Any] = {}
    if dataset is not None:
        updates["root"] = dataset
    if run.split_path.is_file():
        # The split the model was trained with, whatever the config would draw today.
        updates["split"] = data_cfg.split.model_dump() | {"file": run.split_path}
    if updates:
        data_cfg = type(data_cfg).model_validate(data_cfg.model_dump() | updates)
    return OpenedRun(run, ckpt, dev, cfg, model, state, data_cfg)


def load_checked_model(checkpoint: Path, *, device: str = "cpu"):
    """`load_trained_model` with its failures as one-line AlignprogErrors and
    the weights checked (`check_weights`): ``(cfg, model, state)``."""
    try:
        cfg, model, state = load_trained_model(checkpoint, device=str(device))
    except AlignprogError:
        raise
    except (ValueError, KeyError, TypeError, OSError, RuntimeError, AttributeError,
            IndexError) as exc:
        # A meta that no longer validates, a damaged file: one line, not a traceback.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise AlignprogError(f"{checkpoint}: cannot load the checkpoint ({first})") from None
    if not isinstance(state, dict):
        raise AlignprogError(f"{checkpoint}: cannot load the checkpoint (its state is a "
                             f"{type(state).__name__}, not an object)")
    check_weights(model.state_dict(), checkpoint)
    return cfg, model, state
