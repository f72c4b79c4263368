"""Per-video annotations: parsing, frame-unit mapping, canonical segments and length repairs.

See docs/data.md#annotation-json (format and invariants), #frame-units-and-fps-presets,
#length-repairs and #canonical-segments (non-overlapping segments). Annotations are immutable:
every repair builds a new object (the reference overwrites them:
docs/reference-bugs.md#annotations-mutated-in-place), and every repair is counted in a
`RepairLog` instead of happening silently (docs/reference-bugs.md#silent-skips-on-length-mismatch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

import numpy as np

from alignprog.errors import DataError

RECORD_KEYS = ("handles", "hdl_actions", "hdl_start_times", "hdl_end_times")
MAX_BOUND = 2**53


@dataclass(frozen=True)
class RawAnnotation:
    """One video's annotation as written in the JSON, after type checks (no repairs)."""

    task: str
    handle: str
    labels: tuple[str, ...]
    starts: tuple[float, ...]
    ends: tuple[float, ...]


@dataclass(frozen=True)
class VideoAnnotation:
    """Canonical segments of one video in feature-frame units.

    Segments are non-overlapping inclusive runs that tile ``0 .. num_frames - 1`` exactly:
    ``starts[0] == 0``, ``ends[k] + 1 == starts[k + 1]``, ``ends[-1] == num_frames - 1``.
    """

    task: str
    handle: str
    num_frames: int
    labels: tuple[str, ...]
    starts: tuple[int, ...]
    ends: tuple[int, ...]
    background: frozenset[str]

    @property
    def num_segments(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> np.ndarray:
        return np.asarray(self.ends) - np.asarray(self.starts) + 1  # (K,)

    @property
    def is_foreground(self) -> np.ndarray:
        return np.array([lab not in self.background for lab in self.labels], dtype=bool)  # (K,)

    def frame_segment(self) -> np.ndarray:
        """Index of the segment each frame belongs to, shape (T,)."""
        return np.repeat(np.arange(self.num_segments), self.lengths)

    def foreground_mask(self) -> np.ndarray:
        """True on frames of non-background segments, shape (T,)."""
        return np.repeat(self.is_foreground, self.lengths)

    def frame_labels(self) -> list[str]:
        return [self.labels[k] for k in self.frame_segment()]

    @property
    def background_fraction(self) -> float:
        return 1.0 - float(self.foreground_mask().mean())


@dataclass
class RepairLog:
    """Counts of every repair or warning kind, with the first example of each
    (docs/data.md#length-repairs), so no repair is silent."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, str] = field(default_factory=dict)

    def add(self, kind: str, example: str, n: int = 1) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + n
        self.examples.setdefault(kind, example)

    def merge(self, other: "RepairLog") -> None:
        for kind, n in other.counts.items():
            self.add(kind, other.examples[kind], n)

    def __bool__(self) -> bool:
        return bool(self.counts)

    def rows(self) -> list[tuple[str, int, str]]:
        return [(kind, n, self.examples[kind]) for kind, n in self.counts.items()]


# Repair kinds (stable strings: they appear in reports and tests).
LEADING_GAP = "leading frames unannotated, labelled background"
GAP_FILLED = "gap between segments given to the earlier segment"
EMPTY_DROPPED = "segments empty after frame mapping, dropped"
BEYOND_DROPPED = "segments starting after the last feature frame, dropped"
FINAL_EXTENDED = "final segment extended to the last feature frame"
FINAL_SHORTENED = "final segment shortened to the last feature frame"
LENGTH_MISMATCH = "annotated length differs from the feature length beyond tolerance"


def _as_list(value: Any, what: str, *, file: str, task: str, handle: str | None) -> list:
    if not isinstance(value, list):
        raise DataError(f"{what} must be a list, got {type(value).__name__}",
                        file=file, task=task, handle=handle)
    return value


def _number(value: Any, what: str, unit: str, *, file: str, task: str, handle: str) -> float:
    ok_int = isinstance(value, int) and not isinstance(value, bool)
    ok_float = isinstance(value, float) and unit == "seconds"
    if not (ok_int or ok_float):
        kind = "integer frame" if unit == "frames" else "number of seconds"
        raise DataError(f"{what} must be an {kind}, got {value!r}", file=file, task=task,
                        handle=handle)
    # Bounded so that every later float operation is exact and cannot overflow (2**53).
    if not (0 <= value < MAX_BOUND):
        raise DataError(f"{what} must be in [0, 2**53), got {value!r}", file=file, task=task,
                        handle=handle)
    return value


def parse_task_record(
    task: str,
    record: Any,
    *,
    file: str,
    unit: Literal["frames", "seconds"] = "frames",
    strict: bool = True,
    vocabulary: Iterable[str] | None = None,
    warnings: list[str] | None = None,
    errors: list[DataError] | None = None,
) -> list[RawAnnotation]:
    """Check one task record of the annotation JSON and return its videos (the invariants of
    docs/data.md#invariants).

    With ``strict=False``, unequal numbers of handles and annotation lists are paired by position
    (the first ``min(n)`` of each) and a warning naming the task and the counts is appended to
    ``warnings``; inner lists must always agree. A malformed video raises, or, when ``errors``
    is given, is appended there and skipped so that the other videos are still checked.
    """
    if not isinstance(record, dict):
        raise DataError(f"task record must be an object, got {type(record).__name__}",
                        file=file, task=task)
    missing = [k for k in RECORD_KEYS if k not in record]
    if missing:
        raise DataError(f"task record lacks {', '.join(repr(k) for k in missing)}",
                        file=file, task=task)
    lists = {k: _as_list(record[k], k, file=file, task=task, handle=None) for k in RECORD_KEYS}
    sizes = {k: len(v) for k, v in lists.items()}
    n = min(sizes.values())
    if len(set(sizes.values())) > 1:
        counts = ", ".join(f"{k} {v}" for k, v in sizes.items())
        if strict:
            raise DataError(
                f"unequal list lengths ({counts}): annotation lists cannot be paired with videos; "
                "pass --lenient (data.strict=false) to pair them by position",
                file=file, task=task)
        if warnings is not None:
            warnings.append(f"{file}: task '{task}': unequal list lengths ({counts}); lenient "
                            f"mode paired the first {n} by position, the rest are ignored")
    vocab = set(vocabulary) if vocabulary is not None else None
    out = []
    seen: set[str] = set()
    for i in range(n):
        try:
            video = _parse_video(task, i, lists, seen, file=file, unit=unit, vocab=vocab)
        except DataError as err:
            if errors is None:
                raise
            errors.append(err)
            continue
        out.append(video)
    return out


def _parse_video(task: str, i: int, lists: dict[str, list], seen: set[str], *, file: str,
                 unit: str, vocab: set[str] | None) -> RawAnnotation:
    """Check video ``i`` of a task record (handle name, equal inner lists, numbers, order)."""
    handle = lists["handles"][i]
    if not isinstance(handle, str) or not handle or "/" in handle or "\\" in handle:
        raise DataError(f"handle #{i} must be a non-empty file name, got {handle!r}",
                        file=file, task=task)
    if handle in seen:
        raise DataError("handle listed twice", file=file, task=task, handle=handle)
    seen.add(handle)
    where = dict(file=file, task=task, handle=handle)
    labels = _as_list(lists["hdl_actions"][i], "hdl_actions entry", **where)
    starts = _as_list(lists["hdl_start_times"][i], "hdl_start_times entry", **where)
    ends = _as_list(lists["hdl_end_times"][i], "hdl_end_times entry", **where)
    if not (len(labels) == len(starts) == len(ends)):
        raise DataError(
            f"unequal list lengths: {len(labels)} actions, {len(starts)} starts, "
            f"{len(ends)} ends", **where)
    if not labels:
        raise DataError("empty video: no segments annotated", **where)
    norm_labels = []
    for lab in labels:
        if isinstance(lab, int) and not isinstance(lab, bool):
            lab = str(lab)
        if not isinstance(lab, str):
            raise DataError(f"label {lab!r} must be a string", **where)
        if vocab is not None and lab not in vocab:
            raise DataError(f"unknown label {lab!r} (not in the action vocabulary)", **where)
        norm_labels.append(lab)
    s = [_number(v, "start", unit, **where) for v in starts]
    e = [_number(v, "end", unit, **where) for v in ends]
    for k, (sk, ek) in enumerate(zip(s, e)):
        if ek < sk:
            raise DataError(f"segment {k} ends before it starts (start {sk}, end {ek})",
                            **where)
        if k and sk < s[k - 1]:
            raise DataError(f"starts must not decrease: segment {k} starts at {sk} "
                            f"after {s[k - 1]}", **where)
    return RawAnnotation(task, handle, tuple(norm_labels), tuple(s), tuple(e))


def map_bounds(values: Iterable[float], *, unit: str, feature_fps: float,
               source_fps: float | None) -> list[int]:
    """``floor(t * f_target / f_source)``, ``floor(sec * f_target)``, or identity
    (docs/data.md#frame-units-and-fps-presets)."""
    if unit == "seconds":
        scale = feature_fps
    elif source_fps is not None:
        scale = feature_fps / source_fps
    else:
        return [int(v) for v in values]
    # The epsilon keeps exact multiples exact despite binary rounding (e.g. 0.1 * 30 * (1/3)).
    return [int(math.floor(v * scale + 1e-9)) for v in values]


def canonicalise(
    raw: RawAnnotation,
    num_frames: int,
    *,
    background: frozenset[str],
    unit: str = "frames",
    feature_fps: float = 1.0,
    source_fps: float | None = None,
    tolerance_frames: int = 2,
    gap_label: str = "0",
    log: RepairLog | None = None,
    file: str | None = None,
) -> VideoAnnotation:
    """Map to feature frames, make segments non-overlapping, and fit them to ``num_frames``.

    In order (docs/data.md#frame-units-and-fps-presets, #canonical-segments, #length-repairs):
    map bounds; a leading unannotated stretch becomes background; ``e_k := s_{k+1} - 1`` for
    k < K (the shared boundary frame goes to the later segment); drop empty segments; drop
    segments starting at or after ``N``; set ``e_K := N - 1``; warn when ``|E' - (N - 1)|``
    exceeds the tolerance (``E'`` the mapped last end).
    """
    log = log if log is not None else RepairLog()
    where = f"{raw.task}/{raw.handle}"
    if num_frames <= 0:
        raise DataError("empty video: the feature array has 0 frames", file=file,
                        task=raw.task, handle=raw.handle)
    starts = map_bounds(raw.starts, unit=unit, feature_fps=feature_fps, source_fps=source_fps)
    ends = map_bounds(raw.ends, unit=unit, feature_fps=feature_fps, source_fps=source_fps)
    labels = list(raw.labels)
    mapped_last_end = ends[-1]

    if starts[0] > 0:
        log.add(LEADING_GAP, f"{where}: frames 0..{starts[0] - 1}")
        labels.insert(0, gap_label)
        ends.insert(0, starts[0] - 1)
        starts.insert(0, 0)

    for k in range(len(starts) - 1):
        if ends[k] < starts[k + 1] - 1:
            log.add(GAP_FILLED, f"{where}: frames {ends[k] + 1}..{starts[k + 1] - 1}")
        ends[k] = starts[k + 1] - 1

    keep = [k for k in range(len(starts)) if ends[k] >= starts[k]]
    if len(keep) < len(starts):
        log.add(EMPTY_DROPPED, f"{where}: {len(starts) - len(keep)} of {len(starts)}",
                n=len(starts) - len(keep))
    labels, starts, ends = ([x[k] for k in keep] for x in (labels, starts, ends))

    beyond = [k for k in range(len(starts)) if starts[k] >= num_frames]
    if beyond:
        log.add(BEYOND_DROPPED, f"{where}: {len(beyond)} segment(s) start at or after frame "
                f"{num_frames}", n=len(beyond))
        cut = beyond[0]
        labels, starts, ends = labels[:cut], starts[:cut], ends[:cut]

    last = num_frames - 1
    if ends[-1] < last:
        log.add(FINAL_EXTENDED, f"{where}: end {ends[-1]} -> {last}")
    elif ends[-1] > last:
        log.add(FINAL_SHORTENED, f"{where}: end {ends[-1]} -> {last}")
    ends[-1] = last
    mismatch = abs(mapped_last_end - last)
    if mismatch > tolerance_frames:
        log.add(LENGTH_MISMATCH, f"{where}: annotation ends at frame {mapped_last_end}, "
                f"features have {num_frames} frames (off by {mismatch})")

    return VideoAnnotation(raw.task, raw.handle, num_frames, tuple(labels), tuple(starts),
                           tuple(ends), background)
