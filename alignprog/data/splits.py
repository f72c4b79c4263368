"""Train / validation / test splits (docs/data.md#splits).

One split serves every stage, its hash in every result (the fork mixed several test sets:
docs/reference-bugs.md#inconsistent-test-sets), and no global RNG is touched
(docs/reference-bugs.md#global-rng-reseeding).

A split assigns every handle of every task to one of train, val, test. The file format is the
fork's
``data_splits.json`` (fields description, ratios, seed, counts, category_counts, splits), so
that a split written by alignprog can be read by the reference scripts and the other way round
(docs/data.md#split-file-format).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from alignprog.errors import DataError
from alignprog.fileio import atomic_write_json, load_json_text, read_user_text

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class Splits:
    """``assignment[task][split]`` is the tuple of handles of that task in that split."""

    assignment: Mapping[str, Mapping[str, tuple[str, ...]]]
    description: str
    ratios: tuple[float, float, float] | None = None
    seed: int | None = None

    def handles(self, split: str) -> set[str]:
        return {h for parts in self.assignment.values() for h in parts.get(split, ())}

    def split_of(self) -> dict[str, str]:
        """handle -> split name."""
        return {h: name for parts in self.assignment.values() for name in SPLIT_NAMES
                for h in parts.get(name, ())}

    def to_json(self) -> dict:
        per_task = {
            task: {name: len(parts.get(name, ())) for name in SPLIT_NAMES}
            | {"total": sum(len(parts.get(name, ())) for name in SPLIT_NAMES)}
            for task, parts in self.assignment.items()
        }
        counts = {"total": sum(c["total"] for c in per_task.values())}
        counts |= {name: sum(c[name] for c in per_task.values()) for name in SPLIT_NAMES}
        out: dict = {"description": self.description}
        if self.ratios is not None:
            out["ratios"] = dict(zip(SPLIT_NAMES, self.ratios))
        if self.seed is not None:
            out["seed"] = self.seed
        out["counts"] = counts
        out["category_counts"] = per_task
        out["splits"] = {task: {name: list(parts.get(name, ())) for name in SPLIT_NAMES}
                         for task, parts in self.assignment.items()}
        return out

    def sha256(self) -> str:
        """Hash of the assignment alone (not the description), recorded in every result file."""
        canonical = {task: {name: list(parts.get(name, ())) for name in SPLIT_NAMES}
                     for task, parts in sorted(self.assignment.items())}
        blob = json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()


def split_counts(n: int, train: float, val: float, test: float) -> tuple[int, int, int]:
    """The fork's ``utils/data_splits.py``: per-task counts with Python's (banker's) round.

    ``n_train = max(1, round(train n))``, ``n_val = max(1, round(val n))``,
    ``n_test = max(1, n - n_train - n_val)``; while the sum exceeds n, take one from train (while
    it holds more than one), else val, else test. So n = 2 gives 1/0/1 and n = 1 gives 1/0/0.
    A zero fraction gives zero videos for that split.
    """
    if n <= 0:
        return 0, 0, 0
    n_train = max(1, round(train * n))
    n_val = max(1, round(val * n)) if val > 0 else 0
    n_test = max(1, n - n_train - n_val) if test > 0 else 0
    while n_train + n_val + n_test > n:
        if n_train > 1:
            n_train -= 1
        elif n_val > 0:
            n_val -= 1
        else:
            n_test -= 1
    # Fractions that sum to 1 but round down everywhere leave videos over: give them to train.
    n_train += n - (n_train + n_val + n_test)
    return n_train, n_val, n_test


def random_split(task_handles: Mapping[str, Sequence[str]], *, train: float, val: float,
                 test: float, seed: int) -> Splits:
    """Per task in the given order, shuffle a copy of the handles with one local generator.

    One ``random.Random(seed)`` drawn across tasks in JSON order is what the fork's
    ``random.seed(42)`` followed by per-task ``random.shuffle`` does, without touching the global
    RNG (docs/reference-bugs.md#global-rng-reseeding).
    """
    rng = random.Random(seed)
    assignment = {}
    for task, handles in task_handles.items():
        shuffled = list(handles)
        rng.shuffle(shuffled)
        n_tr, n_va, _ = split_counts(len(shuffled), train, val, test)
        assignment[task] = {"train": tuple(shuffled[:n_tr]),
                            "val": tuple(shuffled[n_tr:n_tr + n_va]),
                            "test": tuple(shuffled[n_tr + n_va:])}
    return Splits(assignment, f"random per-task split, seed {seed}", (train, val, test), seed)


def ordered_split(task_handles: Mapping[str, Sequence[str]], *, train: float) -> Splits:
    """The original code's split: first ``round(train n)`` handles in JSON order, the rest test."""
    assignment = {}
    for task, handles in task_handles.items():
        n_tr = round(train * len(handles))
        assignment[task] = {"train": tuple(handles[:n_tr]), "val": (),
                            "test": tuple(handles[n_tr:])}
    return Splits(assignment, f"ordered split: first {train:g} of each task in JSON order",
                  (train, 0.0, round(1.0 - train, 10)), None)


def read_splits(path: Path, task_handles: Mapping[str, Sequence[str]]) -> tuple[Splits, list[str]]:
    """Read a split file and check it against the dataset.

    Returns the splits restricted to the dataset's tasks and a list of warnings (videos of the
    dataset that the file does not assign: they are left out of every split, and said so).
    Errors: unreadable JSON, wrong structure, a handle the dataset lacks or in two splits.
    """
    path = Path(path)
    try:
        text = read_user_text(path)
    except OSError as exc:
        raise DataError(f"cannot read split file ({exc.strerror})", file=str(path)) from None
    except UnicodeDecodeError:
        raise DataError("cannot read split file (not UTF-8 text)", file=str(path)) from None
    data = load_json_text(text, lambda reason: DataError(f"unreadable JSON ({reason})",
                                                         file=str(path)))
    splits = data.get("splits") if isinstance(data, dict) else None
    if not isinstance(splits, dict):
        raise DataError("a split file must be an object with a 'splits' object "
                        "(task -> {train, val, test: [handles]})", file=str(path))
    task_of = {h: t for t, hs in task_handles.items() for h in hs}
    assignment: dict[str, dict[str, tuple[str, ...]]] = {t: {} for t in task_handles}
    seen: dict[str, str] = {}
    for task, parts in splits.items():
        if not isinstance(parts, dict) or set(parts) - set(SPLIT_NAMES):
            raise DataError("each task must map to {train, val, test: [handles]}",
                            file=str(path), task=task)
        for name in SPLIT_NAMES:
            handles = parts.get(name, [])
            if not isinstance(handles, list) or not all(isinstance(h, str) for h in handles):
                raise DataError(f"'{name}' must be a list of handles", file=str(path), task=task)
            for h in handles:
                if h in seen:
                    raise DataError(f"handle is in both '{seen[h]}' and '{name}'",
                                    file=str(path), task=task, handle=h)
                seen[h] = name
                if task not in task_handles:
                    continue  # a task filtered out of this run (data.tasks)
                if task_of.get(h) != task:
                    raise DataError("handle is not a video of this task in the dataset",
                                    file=str(path), task=task, handle=h)
            if task in task_handles:
                assignment[task][name] = tuple(handles)
    warnings = []
    missing = [h for h in task_of if h not in seen]
    if missing:
        warnings.append(f"{path}: {len(missing)} video(s) of the dataset are in no split and are "
                        f"left out (e.g. '{missing[0]}')")
    description = data.get("description", f"split file {path.name}")
    return Splits(assignment, str(description), None, data.get("seed")), warnings


def write_splits(splits: Splits, path: Path) -> None:
    atomic_write_json(path, splits.to_json() | {"sha256": splits.sha256()})
