"""A dataset root's annotation files from a table of segments (`alignprog data annotate`).

The input is a CSV file with a header row and the columns ``task, video, start, end, label``:
one action (or background) segment per row, ``start`` and ``end`` inclusive frame indices of
the video's feature array (`alignprog extract-features` writes one feature frame per
`--fps`-th of a second). Rows may come in any order. Out come ``dataset.json`` (the EgoProceL
format, docs/data.md#annotation-json) and ``id2action.txt`` (docs/data.md#action-vocabulary-
and-background): every distinct non-background label gets an id from 1 (tasks, videos and
segments in the order the CSV first names them, segments by start), background labels
(`data.background_labels`: '0', 'SIL', 'background' by default) are written as '0' (or as the
first background label when '0' is not one), and a gap between two segments of a video is
background, as are the frames after its last segment when ROOT/features/<video>.npy exists.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from alignprog.data.arrays import read_npy_header
from alignprog.errors import DataError
from alignprog.fileio import atomic_write_json, atomic_write_text, read_user_text

COLUMNS = ("task", "video", "start", "end", "label")
_HANDLE = re.compile(r"^[^/\\\x00]+$")


@dataclass(frozen=True)
class Segment:
    line: int
    start: int
    end: int
    label: str


def read_segments_csv(path: Path) -> dict[str, dict[str, list[Segment]]]:
    """task -> video -> its segments sorted by start; a one-line DataError (file and line) for
    a missing column, a bad number, start > end, overlapping segments or a bad video name."""
    try:
        text = read_user_text(path)
    except FileNotFoundError:
        raise DataError("segments file not found", file=str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read segments file ({exc})", file=str(path)) from None
    reader = csv.DictReader(io.StringIO(text.removeprefix("\ufeff")))   # Excel's BOM
    try:
        tasks = _read_rows(reader, path)
    except csv.Error as exc:
        raise DataError(f"line {reader.line_num}: not a valid CSV row ({exc})",
                        file=str(path)) from None
    if not tasks:
        raise DataError("no segments (only a header row)", file=str(path))
    return _sorted_and_checked(tasks, path)


def _read_rows(reader: csv.DictReader, path: Path) -> dict[str, dict[str, list[Segment]]]:
    header = [h.strip().lower() for h in reader.fieldnames or []]
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise DataError(f"missing column(s) {', '.join(missing)}: the header row must name "
                        f"{', '.join(COLUMNS)}", file=str(path))
    twice = sorted({h for h in header if header.count(h) > 1})
    if twice:
        raise DataError(f"column(s) {', '.join(twice)} named twice in the header row",
                        file=str(path))
    reader.fieldnames = header
    tasks: dict[str, dict[str, list[Segment]]] = {}
    for row in reader:
        line = reader.line_num

        def bad(reason: str) -> DataError:
            return DataError(f"line {line}: {reason}", file=str(path))

        if None in row:
            raise bad(f"{len(row[None])} more cell(s) than the header has columns")
        task, video, label = (str(row.get(k) or "").strip() for k in ("task", "video", "label"))
        if not task or not video or not label:
            raise bad("task, video and label must not be empty")
        if not all(ch.isprintable() for ch in task + video + label):
            raise bad("task, video and label must be printable text on one line")
        if not _HANDLE.match(video) or video in (".", ".."):
            raise bad(f"video {video!r} is not a plain file name (the features are "
                      "features/<video>.npy)")
        try:
            start, end = int(str(row["start"]).strip()), int(str(row["end"]).strip())
        except ValueError:
            raise bad(f"start and end must be integers, got {row['start']!r}, {row['end']!r}")
        if start < 0 or end < start:
            raise bad(f"the segment [{start}, {end}] is empty or negative")
        tasks.setdefault(task, {}).setdefault(video, []).append(Segment(line, start, end, label))
    return tasks


def _sorted_and_checked(tasks: dict[str, dict[str, list[Segment]]], path: Path
                        ) -> dict[str, dict[str, list[Segment]]]:
    owner: dict[str, str] = {}
    for task, videos in tasks.items():
        for video, segments in videos.items():
            if owner.setdefault(video, task) != task:
                raise DataError(f"video {video!r} is listed under tasks {owner[video]!r} and "
                                f"{task!r}", file=str(path))
            segments.sort(key=lambda s: s.start)
            for a, b in zip(segments, segments[1:]):
                if b.start <= a.end:
                    raise DataError(f"lines {a.line} and {b.line}: segments of {video!r} "
                                    f"overlap ([{a.start}, {a.end}] and [{b.start}, {b.end}])",
                                    file=str(path))
    return tasks


def build_annotations(tasks: dict[str, dict[str, list[Segment]]], background: Sequence[str],
                      lengths: Mapping[str, int] | None = None) -> tuple[dict, dict[str, str]]:
    """(the annotation JSON object, the vocabulary id -> name): gaps filled with background,
    and the frames after the last segment when `lengths` gives the video's frame count;
    background labels written as '0' (the first background label when '0' is none), action
    labels numbered from 1."""
    bg = "0" if "0" in background else background[0]
    lengths = lengths or {}
    ids: dict[str, str] = {}
    annotation = {}
    for task, videos in tasks.items():
        record = {"handles": [], "hdl_actions": [], "hdl_start_times": [],
                  "hdl_end_times": []}
        for video, segments in videos.items():
            labels, starts, ends = [], [], []
            cursor = 0
            for seg in segments:
                if seg.start > cursor:                      # a gap: background
                    labels.append(bg)
                    starts.append(cursor)
                    ends.append(seg.start - 1)
                if seg.label in background:
                    labels.append(bg)
                else:
                    labels.append(ids.setdefault(seg.label, str(len(ids) + 1)))
                starts.append(seg.start)
                ends.append(seg.end)
                cursor = seg.end + 1
            if lengths.get(video, 0) > cursor:              # the frames after: background
                labels.append(bg)
                starts.append(cursor)
                ends.append(lengths[video] - 1)
            record["handles"].append(video)
            record["hdl_actions"].append(labels)
            record["hdl_start_times"].append(starts)
            record["hdl_end_times"].append(ends)
        annotation[task] = record
    vocabulary = ({"0": "background"} if bg == "0" else {}) | {i: n for n, i in ids.items()}
    return annotation, vocabulary


def feature_lengths(root: Path, tasks: dict[str, dict[str, list[Segment]]]) -> dict[str, int]:
    """Frame counts of the videos whose ROOT/features/<video>.npy exists (from the header);
    a segment that ends past its video's last frame is an error."""
    lengths = {}
    for videos in tasks.values():
        for video, segments in videos.items():
            path = Path(root) / "features" / f"{video}.npy"
            try:
                lengths[video] = read_npy_header(path)[0][0]
            except FileNotFoundError:
                continue
            last = segments[-1]
            if last.end >= lengths[video]:
                raise DataError(f"line {last.line}: segment [{last.start}, {last.end}] of "
                                f"{video!r} ends past its last feature frame "
                                f"({lengths[video] - 1})", file=str(path))
    return lengths


def write_annotations(csv_path: Path, root: Path, *, background: Sequence[str],
                      overwrite: bool = False) -> dict[str, int]:
    """ROOT/dataset.json and ROOT/id2action.txt from the segments CSV (atomically, each file
    whole or not at all); an existing file is replaced only with `overwrite`. Returns counts."""
    tasks = read_segments_csv(csv_path)
    root = Path(root)
    targets = [root / "dataset.json", root / "id2action.txt"]
    existing = [p.name for p in targets if p.exists()]
    if existing and not overwrite:
        raise DataError(f"{', '.join(existing)} already exist(s); pass --overwrite to replace",
                        file=str(root))
    annotation, vocabulary = build_annotations(tasks, list(background),
                                               feature_lengths(root, tasks))
    try:
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(targets[0], annotation)
        atomic_write_text(targets[1], "".join(f"{i} {n}\n" for i, n in vocabulary.items()))
    except OSError as exc:
        raise DataError(f"cannot write the annotation files ({exc.strerror or exc})",
                        file=str(root)) from None
    return {"tasks": len(tasks), "videos": sum(len(v) for v in tasks.values()),
            "segments": sum(len(s) for v in tasks.values() for s in v.values()),
            "actions": len([i for i in vocabulary if i != "0"])}
