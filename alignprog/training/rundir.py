"""Run directories.

::

    runs/<name>/
      config.yaml      the resolved config (write_config)
      split.json       the train/val/test assignment (write_split)
      meta.json        environment: versions, platform, device, git commit, start time
      metrics.jsonl    one JSON object per line, appended and flushed as training goes
      checkpoints/     step-00001234/ ... and best/  (see checkpoint.py)
      <report>.json    anything else written with write_json (evaluation reports)

A new run refuses a non-empty existing directory: pass ``resume=True`` to continue it from its
latest checkpoint or ``overwrite=True`` to replace it. Resuming must reproduce an uninterrupted run,
so metric lines logged after the checkpoint's step are cut with `truncate_metrics_after`.
"""

from __future__ import annotations

import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Mapping

import numpy as np
import torch

import alignprog
from alignprog.config import save_config
from alignprog.data.splits import Splits, write_splits
from alignprog.errors import AlignprogError
from alignprog.fileio import (atomic_write_json, atomic_write_text, load_json_text,
                             read_user_text)
from alignprog.training.checkpoint import BEST_NAME, checkpoint_name, checkpoint_step, is_checkpoint

RUN_SCHEMA_VERSION = 1
RUN_FORMAT = "alignprog-run"
CONFIG_FILE = "config.yaml"
SPLIT_FILE = "split.json"
META_FILE = "meta.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINTS_DIR = "checkpoints"
# The marker alignprog writes into every run directory it creates: --overwrite deletes only a
# directory that has it, or an older run whose meta.json says "format": "alignprog-run".
MARKER_FILE = ".alignprog-run"
MAX_NAME_LEN = 128

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+=@-]*$")
_GIT_TIMEOUT_S = 2.0
# Non-finite floats are written as these strings, so metrics.jsonl stays valid JSON (json.dumps
# would write the bare tokens NaN/Infinity, which other readers reject); read_metrics turns them
# back into floats.
_NONFINITE = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


class RunError(AlignprogError):
    """A run directory cannot be created, resumed or read as asked."""


# ----------------------------------------------------------------------------------------------
# JSON values


def to_json_value(obj: Any, where: str = "value") -> Any:
    """A strict-JSON copy of `obj`: numpy and 0-d torch scalars become Python numbers, arrays and
    tensors lists, paths strings, tuples lists, and NaN/Inf the strings "NaN", "Infinity",
    "-Infinity"."""
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().tolist()
    elif isinstance(obj, np.ndarray):
        obj = obj.tolist()
    elif isinstance(obj, np.generic):
        obj = obj.item()
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        if math.isnan(obj):
            return "NaN"
        if math.isinf(obj):
            return "Infinity" if obj > 0 else "-Infinity"
        return obj
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (list, tuple)):
        return [to_json_value(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        return {str(k): to_json_value(v, f"{where}.{k}") for k, v in obj.items()}
    raise RunError(f"{where}: cannot write a value of type {type(obj).__name__} as JSON")


def _from_json_value(obj: Any) -> Any:
    if isinstance(obj, str):
        return _NONFINITE.get(obj, obj)
    if isinstance(obj, list):
        return [_from_json_value(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _from_json_value(v) for k, v in obj.items()}
    return obj


# ----------------------------------------------------------------------------------------------
# Names and environment


def default_run_name(method: str, root: Path | None = None, *, now: datetime | None = None
                     ) -> str:
    """``"<method>-<YYYYmmdd-HHMMSS>"`` in local time; when `root` already holds a run of that
    name, ``-2``, ``-3``... is appended, so the same command can run twice in one second."""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    base = f"{method}-{stamp}"
    if root is None:
        return base
    root = Path(root)
    name, n = base, 1
    while (root / name).exists():
        n += 1
        name = f"{base}-{n}"
    return name


def claim_run_name(method: str, root: Path, *, now: datetime | None = None) -> str:
    """`default_run_name`, with the directory created atomically (``mkdir``, no exist_ok): of
    two processes racing for the same name, one gets it and the other the next suffix."""
    root = Path(root)
    _make_root(root)
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    base = f"{method}-{stamp}"
    name, n = base, 1
    while True:
        try:
            (root / name).mkdir()
            return name
        except FileExistsError:
            n += 1
            name = f"{base}-{n}"
        except OSError as exc:
            raise RunError(f"cannot create a run directory in {root}: "
                           f"{exc.strerror or exc}") from None


def git_commit(path: Path | None = None) -> str | None:
    """HEAD of the git checkout that holds the alignprog source, or None (an installed package,
    no git, a timeout). The package must be tracked by that checkout: a site-packages inside some
    other repository does not count."""
    pkg = Path(path) if path is not None else Path(alignprog.__file__).resolve().parent
    try:
        tracked = subprocess.run(["git", "ls-files", "--error-unmatch", "__init__.py"], cwd=pkg,
                                 capture_output=True, timeout=_GIT_TIMEOUT_S)
        if tracked.returncode != 0:
            return None
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=pkg, capture_output=True,
                              text=True, timeout=_GIT_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = head.stdout.strip()
    return commit if head.returncode == 0 and re.fullmatch(r"[0-9a-f]{40,64}", commit) else None


def environment_info() -> dict[str, Any]:
    """Versions, platform and source commit, as recorded in a run's meta.json."""
    return {
        "alignprog_version": alignprog.__version__,
        "python_version": platform.python_version(),
        "torch_version": torch.__version__,
        "numpy_version": np.__version__,
        "platform": platform.platform(),
        "executable": sys.executable,
        "git_commit": git_commit(),
    }


# ----------------------------------------------------------------------------------------------
# The run directory


def _validate_name(name: str) -> None:
    if isinstance(name, str) and len(name) > MAX_NAME_LEN:
        raise RunError(f"run name too long ({len(name)} characters, at most {MAX_NAME_LEN})")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise RunError(f"invalid run name {name!r}: use letters, digits and . _ - + = @, "
                       "starting with a letter or digit (no path separators)")


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _make_root(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise RunError(f"--runs-dir {root} exists and is not a directory")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunError(f"cannot create --runs-dir {root}: {exc.strerror or exc}") from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise RunError(f"--runs-dir {root} is not writable")


def is_alignprog_run(path: Path) -> bool:
    """Whether `path` was written by alignprog: it holds the `.alignprog-run` marker, or (runs
    written before the marker existed) a meta.json whose "format" is "alignprog-run". A folder
    that merely holds config.yaml or checkpoints/ is not one, and --overwrite never deletes it."""
    if (path / MARKER_FILE).is_file():
        return True
    try:
        meta = load_json_text(read_user_text(path / META_FILE), ValueError)
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == RUN_FORMAT


def _claim_marker(path: Path) -> None:
    """Create the run's marker exclusively: of two processes claiming `path`, one gets it
    (FileExistsError for the other). An empty marker left by a kill still marks the run."""
    with open(path / MARKER_FILE, "x", encoding="utf-8") as fh:
        json.dump({"format": RUN_FORMAT, "schema_version": RUN_SCHEMA_VERSION}, fh)


@dataclass
class RunDir:
    """One run's directory. Build it with `RunDir.create` (train) or `RunDir.open` (read)."""

    path: Path
    resumed: bool = False
    created: bool = False    # this process made (or replaced) the directory
    replaced: Path | None = None  # the old run of --overwrite, kept aside until a checkpoint

    # -- construction -----------------------------------------------------------------------

    @classmethod
    def create(cls, root: Path, name: str, *, overwrite: bool = False, resume: bool = False,
               claimed: bool = False) -> "RunDir":
        """The directory ``root/name`` for a new run, a replaced one (`overwrite`) or a resumed
        one (`resume`, which needs a checkpoint). Raises RunError with the way out.

        A new directory is claimed with ``mkdir`` (no exist_ok), so two processes creating the
        same run at once cannot both succeed. `claimed`: the (empty) directory was just made by
        `claim_run_name` in this process. `overwrite` replaces only a directory that
        `is_alignprog_run` (the `.alignprog-run` marker, or an older run's meta.json with
        "format": "alignprog-run")."""
        _validate_name(name)
        if overwrite and resume:
            raise RunError("--resume and --overwrite cannot be used together: resume continues "
                           "the run, overwrite deletes it")
        root = Path(root)
        path = root / name
        if path.exists() and not path.is_dir():
            raise RunError(f"{path} exists and is not a directory; choose another run name")

        if resume:
            if not path.is_dir():
                raise RunError(f"cannot resume: no run directory {path}; start a new run "
                               "without --resume")
            run = cls(path, resumed=True)
            if run.latest_checkpoint() is None:
                raise RunError(f"cannot resume {path}: it has no checkpoint in "
                               f"{run.checkpoints_dir} (the run stopped before its first "
                               "checkpoint); use --overwrite to start it again")
            return run

        if path.is_dir() and not _is_empty_dir(path):
            if not overwrite:
                raise RunError(f"run directory {path} already exists; pass --resume to continue "
                               "it, --overwrite to replace it, or choose another --name")
            if not is_alignprog_run(path):
                raise RunError(f"refusing to overwrite {path}: not written by alignprog (no "
                               f"{MARKER_FILE}: it does not look like an alignprog run); delete "
                               "it yourself or "
                               "choose another --name")
            if not os.access(path.parent, os.W_OK | os.X_OK):
                raise RunError(f"--runs-dir {path.parent} is not writable")
            return cls._replace(path)

        _make_root(root)
        created = False
        if not path.is_dir():
            try:
                path.mkdir()          # the claim: of two racing processes one gets it
                created = True
            except FileExistsError:
                raise RunError(f"run directory {path} was just created by another process; "
                               "choose another --name") from None
            except OSError as exc:
                raise RunError(f"cannot create {path}: {exc.strerror or exc}") from None
        elif claimed:
            created = True
        try:
            # The marker is the claim of an empty directory that was already there (or that
            # another process has just made): one process gets it.
            _claim_marker(path)
            (path / CHECKPOINTS_DIR).mkdir(exist_ok=True)
        except FileExistsError:
            raise RunError(f"run directory {path} was just created by another process; "
                           "choose another --name") from None
        except OSError as exc:
            if created:
                shutil.rmtree(path, ignore_errors=True)
            raise RunError(f"cannot write {path}: {exc.strerror or exc}") from None
        return cls(path, created=created)

    @classmethod
    def _replace(cls, path: Path) -> "RunDir":
        """Move the old run aside under a hidden name and set up the new one. The old run stays
        there until the new one writes its first checkpoint (`release_replaced`); a start that
        fails before that puts it back (`discard_if_unstarted`). An interruption leaves the old
        run whole, under its name or the hidden one, never a half-deleted run."""
        for stale in path.parent.glob(f".{path.name}.old-*"):  # leftovers of a killed overwrite
            shutil.rmtree(stale, ignore_errors=True)
        aside = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.rename(path, aside / path.name)
        try:
            path.mkdir()
            (path / CHECKPOINTS_DIR).mkdir()
            _claim_marker(path)
        except BaseException:
            shutil.rmtree(path, ignore_errors=True)
            os.rename(aside / path.name, path)
            shutil.rmtree(aside, ignore_errors=True)
            raise
        return cls(path, created=True, replaced=aside)

    def release_replaced(self) -> None:
        """Delete the run that --overwrite replaced (once the new one has a checkpoint)."""
        if self.replaced is not None:
            shutil.rmtree(self.replaced, ignore_errors=True)
            self.replaced = None

    def discard_if_unstarted(self) -> bool:
        """Remove the directory when this process created it and no checkpoint was written
        yet (a failed start must not leave a stale runs/NAME/ that blocks the next try), and put
        back the run it replaced. Returns whether it was removed."""
        if not self.created or self.resumed or self.checkpoints() or self.best_checkpoint():
            self.release_replaced()
            return False
        shutil.rmtree(self.path, ignore_errors=True)
        if self.replaced is not None:
            os.rename(self.replaced / self.path.name, self.path)
            self.release_replaced()
        return True

    @classmethod
    def open(cls, path: Path) -> "RunDir":
        """An existing run, for reading (evaluation, export)."""
        path = Path(path)
        if not path.is_dir():
            raise RunError(f"no run directory {path}")
        return cls(path)

    # -- paths ------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def split_path(self) -> Path:
        return self.path / SPLIT_FILE

    @property
    def meta_path(self) -> Path:
        return self.path / META_FILE

    @property
    def metrics_path(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / CHECKPOINTS_DIR

    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoints_dir / checkpoint_name(step)

    @property
    def best_path(self) -> Path:
        return self.checkpoints_dir / BEST_NAME

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete ``step-N`` checkpoints, ascending by N as a number, never in glob order
        (docs/reference-bugs.md#checkpoint-chosen-by-glob-order)."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = [(checkpoint_step(p.name), p) for p in self.checkpoints_dir.iterdir()]
        return sorted((step, p) for step, p in found if step is not None and is_checkpoint(p))

    def latest_checkpoint(self) -> Path | None:
        """The complete step checkpoint of the highest step, or None."""
        found = self.checkpoints()
        return found[-1][1] if found else None

    def best_checkpoint(self) -> Path | None:
        """``checkpoints/best`` when it is a complete checkpoint, else None."""
        return self.best_path if is_checkpoint(self.best_path) else None

    def default_checkpoint(self) -> Path | None:
        """The checkpoint to evaluate when none is named: best, else the latest by step number
        (docs/reference-bugs.md#checkpoint-chosen-by-glob-order)."""
        return self.best_checkpoint() or self.latest_checkpoint()

    # -- writers ----------------------------------------------------------------------------

    def write_config(self, cfg) -> Path:
        """The resolved config, as config.yaml."""
        save_config(cfg, self.config_path)
        return self.config_path

    def write_split(self, splits: Splits) -> Path:
        write_splits(splits, self.split_path)
        return self.split_path

    def write_environment(self, extra: Mapping[str, Any] | None = None) -> dict:
        """meta.json: schema, versions, platform, git commit, start time, plus `extra` (device,
        precision, command line...; its keys override the defaults). A resumed run keeps the
        original record and appends one to ``"resumes"``."""
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        record = {**environment_info(), "started_at": now, **to_json_value(dict(extra or {}),
                                                                           "extra")}
        if self.resumed and self.meta_path.is_file():
            meta = self.read_json(META_FILE)
            meta.setdefault("resumes", []).append(record)
        else:
            meta = {"format": RUN_FORMAT, "schema_version": RUN_SCHEMA_VERSION, "name": self.name,
                    **record}
        atomic_write_json(self.meta_path, meta)
        return meta

    def write_json(self, name: str, obj: Any) -> Path:
        """Write `obj` as strict JSON to ``<run>/<name>`` atomically (reports, summaries)."""
        target = self._inside(name)
        text = json.dumps(to_json_value(obj, name), indent=2, allow_nan=False) + "\n"
        atomic_write_text(target, text)
        return target

    def read_json(self, name: str) -> Any:
        target = self._inside(name)
        try:
            return _from_json_value(json.loads(target.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise RunError(f"{target}: no such file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise RunError(f"{target}: cannot read JSON ({exc})") from None

    def _inside(self, name: str) -> Path:
        rel = PurePosixPath(name)
        if rel.is_absolute() or not rel.parts or ".." in rel.parts:
            raise RunError(f"{name!r}: a run file name must be a relative path inside the run")
        return self.path.joinpath(*rel.parts)

    # -- metrics ----------------------------------------------------------------------------

    def log_metrics(self, record: Mapping[str, Any]) -> None:
        """Append `record` as one JSON line to metrics.jsonl and flush it.

        Numbers are written as Python numbers (numpy and 0-d tensor values converted), NaN/Inf
        as "NaN"/"Infinity"/"-Infinity"."""
        line = json.dumps(to_json_value(dict(record), "metrics"), allow_nan=False)
        with open(self.metrics_path, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")
            fh.flush()

    def _metric_lines(self) -> list[tuple[str, dict]]:
        if not self.metrics_path.is_file():
            return []
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
        out = []
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if i == len(lines) - 1:  # the last line of a run killed while writing it
                    break
                raise RunError(f"{self.metrics_path}:{i + 1}: not a JSON line") from None
            if not isinstance(record, dict):
                raise RunError(f"{self.metrics_path}:{i + 1}: expected a JSON object")
            out.append((line, record))
        return out

    def read_metrics(self) -> list[dict]:
        """Every record of metrics.jsonl in order ("NaN"/"Infinity" back to floats; a torn last
        line is skipped)."""
        return [_from_json_value(record) for _, record in self._metric_lines()]

    def truncate_metrics_after(self, step: int) -> int:
        """Cut metrics.jsonl at the first record whose ``step`` is greater than `step` (the
        resumed checkpoint's), so that the resumed run logs those steps again exactly once.
        Returns the number of records removed. Records are appended in step order; the loop must
        save a step's checkpoint after logging that step's records."""
        entries = self._metric_lines()
        keep = len(entries)
        for i, (_, record) in enumerate(entries):
            value = record.get("step")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > step:
                keep = i
                break
        raw = self.metrics_path.read_text(encoding="utf-8") if self.metrics_path.is_file() else ""
        text = "".join(line + "\n" for line, _ in entries[:keep])
        if text != raw:  # also drops a torn last line, which an append would corrupt
            atomic_write_text(self.metrics_path, text)
        return len(entries) - keep
