"""Dataset roots (EgoProceL format) and the synthetic default, loaded into one `Dataset`.

See docs/data.md (dataset root, annotation JSON, vocabulary, frame units, length repairs,
canonical segments, splits). A root holds ``dataset.json`` (or the file named by
``data.annotations``), optionally ``id2action.txt`` and ``splits.json``, and
``features/<handle>.npy`` (T, D) and/or ``frames/<handle>.npy`` (T, C, H, W), float16 or
float32. Arrays are opened lazily (memory-mapped), so a dataset larger than RAM works; only
their headers are read at load time.
"""

from __future__ import annotations

import fnmatch
import functools
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import numpy as np

from alignprog.config import DataConfig
from alignprog.data.annotations import (BEYOND_DROPPED, EMPTY_DROPPED, FINAL_SHORTENED,
                                        LENGTH_MISMATCH, RawAnnotation, RepairLog,
                                        VideoAnnotation, canonicalise, parse_task_record)
from alignprog.data.arrays import load_float32, read_npy_header
from alignprog.data.splits import SPLIT_NAMES, Splits, ordered_split, random_split, read_splits
from alignprog.errors import DataError
from alignprog.fileio import load_json_text, read_user_text

LAYOUTS = ("features", "frames")
ARRAY_RANK = {"features": 2, "frames": 4}
SYNTHETIC_NAME = "synthetic"


class ArraySource(Protocol):
    """A video's array of one layout: its shape without reading the data, and a lazy load."""

    shape: tuple[int, ...]
    dtype: np.dtype

    def load(self) -> np.ndarray: ...


@dataclass(frozen=True)
class NpyFile:
    path: Path
    shape: tuple[int, ...]
    dtype: np.dtype

    def load(self) -> np.ndarray:
        # Memory-mapped: only the frames actually read are paged in. allow_pickle stays False.
        return np.load(self.path, mmap_mode="r", allow_pickle=False)


@dataclass(frozen=True)
class GeneratedArray:
    """An array computed on demand (the synthetic dataset)."""

    make: Callable[[], np.ndarray]
    shape: tuple[int, ...]
    dtype: np.dtype = np.dtype(np.float32)

    def load(self) -> np.ndarray:
        return self.make()


@dataclass(frozen=True)
class Video:
    index: int
    task: str
    handle: str
    annotation: VideoAnnotation
    arrays: dict[str, ArraySource]
    split: str | None

    @property
    def num_frames(self) -> int:
        return self.annotation.num_frames


@dataclass
class Dataset:
    name: str
    root: Path | None
    annotation_file: str
    layout: str
    videos: list[Video]
    background: frozenset[str]
    vocabulary: dict[str, str] | None
    splits: Splits
    repairs: RepairLog = field(default_factory=RepairLog)
    warnings: list[str] = field(default_factory=list)

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(v.task for v in self.videos))

    @property
    def layouts(self) -> list[str]:
        return [name for name in LAYOUTS if all(name in v.arrays for v in self.videos)]

    @property
    def labels(self) -> list[str]:
        """Every label in use, in vocabulary order where there is one (index = label id)."""
        used = {lab for v in self.videos for lab in v.annotation.labels}
        order = list(self.vocabulary) if self.vocabulary else []
        return [lab for lab in order if lab in used] + sorted(used - set(order))

    def indices(self, split: str | None = None, tasks: Iterable[str] | None = None) -> list[int]:
        """Video indices of a split (None: all) and tasks (None: all), in dataset order."""
        if split is not None and split not in SPLIT_NAMES:
            raise ValueError(f"split must be one of {SPLIT_NAMES}, got {split!r}")
        keep = set(tasks) if tasks is not None else None
        return [v.index for v in self.videos
                if (split is None or v.split == split) and (keep is None or v.task in keep)]

    def load(self, index: int, layout: str | None = None) -> np.ndarray:
        """The video's array as float32 (a copy), checked for NaN/Inf."""
        video = self.videos[index]
        layout = layout or self.layout
        source = video.arrays[layout]
        return load_float32(source.load, file=_array_name(source, layout, video.handle),
                            task=video.task, handle=video.handle)

    def summary(self) -> dict[str, Any]:
        """Per-task and overall statistics, JSON-serialisable (``data check``)."""
        rows = []
        for task in self.tasks:
            vids = [self.videos[i] for i in self.indices(tasks=[task])]
            rows.append({"task": task, **_stats(vids)}
                        | {s: sum(v.split == s for v in vids) for s in SPLIT_NAMES})
        return {
            "name": self.name,
            "root": str(self.root) if self.root else None,
            "annotations": self.annotation_file,
            "layout": self.layout,
            "layouts": self.layouts,
            "shapes": {name: list(self.videos[0].arrays[name].shape[1:]) for name in self.layouts}
            if self.videos else {},
            "tasks": rows,
            "total": {**_stats(self.videos)}
            | {s: sum(v.split == s for v in self.videos) for s in SPLIT_NAMES},
            "split": {"description": self.splits.description, "sha256": self.splits.sha256()},
            "repairs": [{"kind": k, "count": n, "example": ex} for k, n, ex in self.repairs.rows()],
            "warnings": list(self.warnings),
        }


def _stats(videos: list[Video]) -> dict[str, Any]:
    lengths = [v.num_frames for v in videos]
    fg_lengths = [int(n) for v in videos
                  for n in v.annotation.lengths[v.annotation.is_foreground]]
    total = sum(lengths)
    bg = sum(v.annotation.background_fraction * v.num_frames for v in videos)
    return {
        "videos": len(videos),
        "frames": total,
        "length_min": min(lengths, default=0),
        "length_median": float(statistics.median(lengths)) if lengths else 0.0,
        "length_max": max(lengths, default=0),
        "background_fraction": bg / total if total else 0.0,
        "foreground_segments": len(fg_lengths),
        "segment_length_median": float(statistics.median(fg_lengths)) if fg_lengths else 0.0,
        "actions": len({lab for v in videos for lab, fg in
                        zip(v.annotation.labels, v.annotation.is_foreground) if fg}),
    }


def _array_name(source: ArraySource, layout: str, handle: str) -> str:
    return str(source.path) if isinstance(source, NpyFile) else f"{layout}/{handle}"


class DatasetErrors(DataError):
    """Several problems found at once; ``errors`` holds each one-line `DataError`."""

    def __init__(self, errors: list[DataError]) -> None:
        self.errors = errors
        more = f" (and {len(errors) - 1} more problem(s): run `alignprog data check`)" \
            if len(errors) > 1 else ""
        Exception.__init__(self, str(errors[0]) + more)
        self.what, self.file, self.task, self.handle = (errors[0].what, errors[0].file,
                                                        errors[0].task, errors[0].handle)


# ----------------------------------------------------------------------------------------------
# Reading files


def read_vocabulary(path: Path) -> dict[str, str]:
    """``<int id> <name>`` per line -> {"id": name}
    (docs/data.md#action-vocabulary-and-background)."""
    try:
        lines = read_user_text(path).splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read action vocabulary ({exc})", file=str(path)) from None
    vocab: dict[str, str] = {}
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        ident, name = (line.split(maxsplit=1) + [""])[:2]  # "<id> <name>", any whitespace
        if not (ident.isascii() and ident.isdigit()) or not name.strip():
            raise DataError(f"line {lineno}: expected '<id> <name>', got {line!r}", file=str(path))
        key = str(int(ident))  # labels in the JSON are plain decimal strings: "01" is "1"
        if key in vocab:
            raise DataError(f"line {lineno}: id {key} defined twice", file=str(path))
        vocab[key] = name.strip()
    if not vocab:
        raise DataError("action vocabulary is empty (expected '<id> <name>' lines)",
                        file=str(path))
    return vocab


def read_annotation_json(path: Path) -> dict[str, Any]:
    try:
        text = read_user_text(path)
    except FileNotFoundError:
        raise DataError("annotation file not found (from a CSV of segments: alignprog data "
                        "annotate SEGMENTS.csv ROOT)", file=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read annotation file ({exc})", file=str(path)) from None
    data = load_json_text(text, lambda reason: DataError(f"unreadable JSON ({reason})",
                                                         file=str(path)))
    if not isinstance(data, dict):
        raise DataError("the annotation JSON must be an object mapping task name -> record, "
                        f"got a {type(data).__name__}", file=str(path))
    return data


# ----------------------------------------------------------------------------------------------
# Loading


def select_tasks(all_tasks: list[str], patterns: list[str] | None) -> list[str]:
    if patterns is None:
        return list(all_tasks)
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(t, pattern) for t in all_tasks):
            raise DataError(f"data.tasks: '{pattern}' matches no task (tasks: "
                            f"{', '.join(all_tasks)})")
    return [t for t in all_tasks if any(fnmatch.fnmatchcase(t, p) for p in patterns)]


def source_fps_of(task: str, cfg: DataConfig) -> float | None:
    """The fps of this task's annotation frame numbers, or None for identity
    (docs/data.md#frame-units-and-fps-presets)."""
    table = cfg.fps.table()
    if cfg.fps.unit == "seconds" or not table:
        return None
    for pattern, fps in table:
        if fnmatch.fnmatchcase(task, pattern):
            return fps
    raise DataError(f"no source fps for task '{task}' in data.fps.source "
                    f"(patterns: {', '.join(p for p, _ in table)})")


def load_dataset(cfg: DataConfig, *, all_layouts: bool = False, collect: bool = False) -> Dataset:
    """Load the dataset `cfg` names, or the synthetic default when it names none.

    Reads the annotation JSON, the vocabulary and every array header (not the data), checks them,
    canonicalises each annotation against its feature length and assigns splits. Problems raise a
    `DataError`; with ``collect=True`` every problem found is gathered into one `DatasetErrors`.
    ``all_layouts`` opens every layout present, not only ``cfg.layout`` (``data check``).
    """
    errors: list[DataError] = []

    def fail(err: DataError) -> None:
        if not collect:
            raise err
        errors.append(err)

    if cfg.root is None and cfg.annotations is None:
        return _load_synthetic(cfg)
    root = Path(cfg.root) if cfg.root is not None else None
    ann_path = Path(cfg.annotations) if cfg.annotations else root / "dataset.json"
    if root is None:
        raise DataError("data.annotations is set but data.root is not: the feature files are "
                        "looked up under the root")
    if not root.is_dir():
        raise DataError("dataset root is not a folder", file=str(root))
    data = read_annotation_json(ann_path)

    vocab_path = cfg.id2action
    if vocab_path is None:
        for candidate in (ann_path.with_name(f"{ann_path.stem}-id2action.txt"),
                          root / "id2action.txt"):
            if candidate.exists():  # a folder of that name is reported below, not skipped
                vocab_path = candidate
                break
    vocabulary = read_vocabulary(vocab_path) if vocab_path is not None else None
    accepted = (set(vocabulary) | set(cfg.background_labels)) if vocabulary else None

    present = [name for name in LAYOUTS if (root / name).is_dir()]
    if cfg.layout not in present:
        raise DataError(f"no '{cfg.layout}/' folder (data.layout = '{cfg.layout}'; present: "
                        f"{', '.join(present) or 'none'})", file=str(root))
    layouts = present if all_layouts else [cfg.layout]

    log = RepairLog()
    warnings: list[str] = []
    raws: list[RawAnnotation] = []
    owner: dict[str, str] = {}
    for task in select_tasks(list(data), cfg.tasks):
        try:
            parsed = parse_task_record(task, data[task], file=str(ann_path), unit=cfg.fps.unit,
                                       strict=cfg.strict, vocabulary=accepted,
                                       warnings=warnings, errors=errors if collect else None)
        except DataError as err:
            fail(err)
            continue
        for raw in parsed:
            if raw.handle in owner:
                fail(DataError(f"handle also listed under task '{owner[raw.handle]}'",
                               file=str(ann_path), task=task, handle=raw.handle))
                continue
            owner[raw.handle] = task
            raws.append(raw)

    # Array headers: rank, dtype, per-layout shape agreement, equal lengths across layouts.
    arrays: dict[str, dict[str, NpyFile]] = {}
    for raw in raws:
        for layout in layouts:
            path = root / layout / f"{raw.handle}.npy"
            where = dict(file=str(path), task=raw.task, handle=raw.handle)
            try:
                shape, dtype = read_npy_header(path, max_frames=cfg.max_frames,
                                               setting="data.max_frames",
                                               raise_with="--set data.max_frames=N")
            except FileNotFoundError:
                fail(DataError(f"{layout} file is missing", **where))
                continue
            except DataError as err:
                fail(DataError(err.what, **where))
                continue
            if len(shape) != ARRAY_RANK[layout] or 0 in shape[1:]:
                want = "(T, D)" if layout == "features" else "(T, C, H, W)"
                fail(DataError(f"expected a {want} array for the '{layout}' layout, got shape "
                               f"{shape}", **where))
                continue
            arrays.setdefault(raw.handle, {})[layout] = NpyFile(path, shape, dtype)
    for layout in layouts:
        shapes = Counter(a[layout].shape[1:] for a in arrays.values() if layout in a)
        if len(shapes) > 1:
            common, count = shapes.most_common(1)[0]
            for raw in raws:
                a = arrays.get(raw.handle, {}).get(layout)
                if a is not None and a.shape[1:] != common:
                    what = "feature dimension" if layout == "features" else "map shape"
                    fail(DataError(f"{what} {a.shape[1:]} differs from {common} of the other "
                                   f"{count} videos", file=str(a.path), task=raw.task,
                                   handle=raw.handle))
                    del arrays[raw.handle][layout]

    videos: list[Video] = []
    background = frozenset(cfg.background_labels)
    for raw in raws:
        got = arrays.get(raw.handle, {})
        if set(got) != set(layouts):
            continue  # its error is already recorded
        lengths = {layout: a.shape[0] for layout, a in got.items()}
        if len(set(lengths.values())) > 1:
            fail(DataError("layouts disagree on the number of frames: " + ", ".join(
                f"{k} {v}" for k, v in lengths.items()), file=str(root), task=raw.task,
                handle=raw.handle))
            continue
        try:
            annotation = canonicalise(
                raw, got[cfg.layout].shape[0], background=background, unit=cfg.fps.unit,
                feature_fps=cfg.fps.feature, source_fps=source_fps_of(raw.task, cfg),
                tolerance_frames=cfg.fps.tolerance_frames, gap_label=cfg.background_labels[0],
                log=log, file=str(got[cfg.layout].path))
        except DataError as err:
            fail(err)
            continue
        videos.append(Video(len(videos), raw.task, raw.handle, annotation, dict(got), None))
    if errors:
        raise DatasetErrors(errors)
    if not videos:
        raise DataError("no videos to load", file=str(ann_path))

    splits, split_warnings = _make_splits(cfg, root, videos)
    return _finish(Dataset(root.name, root, str(ann_path), cfg.layout, videos, background,
                           vocabulary, splits, log, warnings + split_warnings))




def training_problems(ds: Dataset, cfg: DataConfig) -> list[str]:
    """What `data check` would warn about that matters to training, as lines, after refusing
    (DataError) a dataset that cannot train: more than `data.max_repaired_share` of the videos
    with annotations that end far from their features (the sign of annotation frames in another
    unit than the features'), or a train split without any foreground segment."""
    # LENGTH_MISMATCH is logged once per video whose annotation ends beyond the tolerance
    mismatched = ds.repairs.counts.get(LENGTH_MISMATCH, 0)
    if mismatched > cfg.max_repaired_share * len(ds.videos):
        raise DataError(
            f"{mismatched} of {len(ds.videos)} videos' annotations end far from the end of their "
            f"features (e.g. {ds.repairs.examples[LENGTH_MISMATCH]}), so segments past the end "
            "are dropped: are the annotations in source-video frames? Use --fps-preset "
            "egoprocel or data.fps.source; to train anyway set data.max_repaired_share=1 (now "
            f"{cfg.max_repaired_share:g})")
    train = [ds.videos[i] for i in ds.indices("train")]
    if train and not any(v.annotation.is_foreground.any() for v in train):
        raise DataError(f"the train split ({len(train)} videos) has no foreground segment: "
                        f"every frame is background ({', '.join(sorted(ds.background))}); "
                        "progress learning and the frame-counting baseline need actions")
    lines = list(ds.warnings)
    lines += [f"{kind}: {n} (e.g. {example})" for kind, n, example in ds.repairs.rows()
              if kind in (BEYOND_DROPPED, EMPTY_DROPPED, FINAL_SHORTENED)]
    short = [v.handle for v in ds.videos if v.num_frames < 2]
    if short:
        lines.append(f"{len(short)} video(s) of a single frame (e.g. {short[0]}): nothing to "
                     "align in them")
    return lines


def _make_splits(cfg: DataConfig, root: Path | None, videos: list[Video]
                 ) -> tuple[Splits, list[str]]:
    task_handles: dict[str, list[str]] = {}
    for v in videos:
        task_handles.setdefault(v.task, []).append(v.handle)
    split_file = cfg.split.file
    if split_file is None and root is not None and (root / "splits.json").exists():
        split_file = root / "splits.json"
    if split_file is not None:
        return read_splits(split_file, task_handles)
    if cfg.split.mode == "ordered":
        return ordered_split(task_handles, train=cfg.split.train), []
    return random_split(task_handles, train=cfg.split.train, val=cfg.split.val,
                        test=cfg.split.test, seed=cfg.split.seed), []


def _finish(ds: Dataset) -> Dataset:
    split_of = ds.splits.split_of()
    ds.videos = [Video(v.index, v.task, v.handle, v.annotation, v.arrays, split_of.get(v.handle))
                 for v in ds.videos]
    for kind, n, example in ds.repairs.rows():
        if kind.startswith("annotated length differs"):
            ds.warnings.append(f"{n} video(s): {kind} (e.g. {example})")
    return ds


def _load_synthetic(cfg: DataConfig) -> Dataset:
    """The embedded procedural dataset, generated in memory (arrays computed on demand)."""
    from alignprog.data.synthetic import generate

    sc = cfg.synthetic
    if sc.timelines == "egoprocel":
        from alignprog.data.timelines import require_features
        require_features([cfg.layout])
    synth = generate(sc)
    # Feature arrays are rendered once and kept (the default is ~130 MB at D = 2048): every
    # epoch reads them again. Frames arrays (~400 KB a frame) are rendered on each read.
    features = functools.lru_cache(maxsize=None)(synth.features)
    vocabulary = {str(k): v for k, v in synth.id2action.items()}
    background = frozenset(cfg.background_labels)
    log = RepairLog()
    videos: list[Video] = []
    for task in select_tasks(list(synth.annotations), cfg.tasks):
        for raw in parse_task_record(task, synth.annotations[task], file=SYNTHETIC_NAME,
                                     vocabulary=vocabulary):
            n = synth.lengths[raw.handle]
            # Only the configured layout: the frames variant is large and slow to render.
            if cfg.layout == "features":
                arrays = {"features": GeneratedArray(lambda h=raw.handle: features(h),
                                                     (n, sc.dim))}
            else:
                arrays = {"frames": GeneratedArray(
                    lambda h=raw.handle: synth.frames(h),
                    (n, sc.frame_channels, sc.frame_size, sc.frame_size))}
            annotation = canonicalise(raw, n, background=background, log=log)
            videos.append(Video(len(videos), task, raw.handle, annotation, arrays, None))
    splits, warnings = _make_splits(cfg, None, videos)
    return _finish(Dataset(SYNTHETIC_NAME, None, SYNTHETIC_NAME, cfg.layout, videos, background,
                           vocabulary, splits, log, warnings))


def scan_arrays(ds: Dataset, layouts: Iterable[str] | None = None,
                chunk_frames: int = 256) -> list[DataError]:
    """Read every array of every layout in chunks and report NaN/Inf and read failures."""
    problems = []
    for video in ds.videos:
        for layout in layouts or ds.layouts:
            source = video.arrays[layout]
            where = dict(file=_array_name(source, layout, video.handle), task=video.task,
                         handle=video.handle)
            try:
                array = source.load()
                for start in range(0, len(array), chunk_frames):
                    chunk = np.asarray(array[start:start + chunk_frames], dtype=np.float32)
                    finite = np.isfinite(chunk.reshape(len(chunk), -1)).all(axis=1)
                    if not finite.all():
                        problems.append(DataError(
                            "contains NaN/Inf values (first at frame "
                            f"{start + int(np.flatnonzero(~finite)[0])})", **where))
                        break
            except (OSError, ValueError) as exc:
                problems.append(DataError(f"truncated or unreadable array ({exc})", **where))
    return problems
