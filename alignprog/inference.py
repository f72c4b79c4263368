"""Running an exported model on new videos: read a video, embed it, predict its progress.

`alignprog predict` is built from these pieces, and they work from Python on any loaded model::

    model, info = alignprog.load_with_config("exports/lav")
    array = read_video_array("video.npy", info)                     # (T, *input_shape) float32
    segments = read_segments("segments.json")                       # or whole_video_annotation
    ann = segments_for(segments, "video", len(array), info)
    progress = predict_progress(model, array, ann)                  # (T,)

The video is read through the data layer's `.npy` reader (its header is checked before any data
is read), the encoder runs through the evaluators' embedding pass, and the progress head follows
the evaluators' online protocol, so a prediction is exactly what evaluation would compute.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from alignprog.data.annotations import (RawAnnotation, RepairLog, VideoAnnotation, canonicalise,
                                        parse_task_record)
from alignprog.data.arrays import load_float32, open_npy, read_npy_header
from alignprog.errors import DataError
from alignprog.export import ExportError, ExportInfo
from alignprog.fileio import load_json_text, read_user_text
from alignprog.models import AlignmentModel

MAX_FRAMES = 100_000  # predict's default bound on a video's frames (--max-frames)
WHOLE_VIDEO_LABEL = "video"  # the label of the one segment when no segments are given
WHOLE_VIDEO_NOTE = "whole video as one segment"


# ----------------------------------------------------------------------------------------------
# Videos


def read_video_array(path: Path, info: ExportInfo, *, max_frames: int | None = MAX_FRAMES
                     ) -> np.ndarray:
    """A video for the model of `info`: a (T, *input_shape) float16/32 .npy file (either byte
    order), never unpickled, returned as a checked float32 (T, *input_shape) array.

    The header is checked first (`read_npy_header`), so a FIFO never hangs, and a video of the
    wrong shape or of more than `max_frames` frames is refused before any data is read."""
    path = Path(path)
    file = str(path)
    try:
        shape, _dtype = read_npy_header(path, max_frames=max_frames, setting="--max-frames",
                                        raise_with="--max-frames N")
    except FileNotFoundError:
        raise DataError("no such file", file=file) from None
    if len(shape) != 1 + len(info.input_shape) or shape[1:] != info.input_shape:
        layout = "(T, D)" if info.layout == "features" else "(T, C, H, W)"
        raise DataError(f"shape {shape} does not fit the model, which reads the {info.layout} "
                        f"layout {layout} with frames of shape {info.input_shape}", file=file)
    if shape[0] == 0:
        raise DataError("empty video: 0 frames", file=file)
    return load_float32(lambda: open_npy(path), file=file)                       # (T, *F)


@dataclass(frozen=True)
class _Frames:
    num_frames: int


@dataclass(frozen=True)
class _OneVideo:
    """One in-memory video seen as the dataset `embed_videos` reads: only ``videos[i]
    .num_frames`` and ``load(i)``, so the array is neither copied nor checked again."""

    array: np.ndarray                                                             # (T, *F)

    @property
    def videos(self) -> list[_Frames]:
        return [_Frames(len(self.array))]

    def load(self, index: int) -> np.ndarray:
        return self.array


def embed(model: AlignmentModel, array: np.ndarray, *, head: bool = False) -> torch.Tensor:
    """One video (T, *F) through the encoder at once: embeddings (T, D), float32 on the CPU
    (with ``head``: what the progress head reads, `AlignmentModel.head_features`).

    The evaluators' embedding pass (`embed_videos`: eval mode, no grad) on the device of the
    model's weights; a model loaded in bf16/fp16 computes in its own dtype."""
    from alignprog.evaluation.embed import embed_videos, embed_with_head_inputs

    param = next(model.parameters())
    # The pass feeds float32 frames; autocast runs a half-precision model in its dtype.
    autocast = None if param.dtype == torch.float32 else param.dtype
    video = _OneVideo(np.asarray(array, dtype=np.float32))
    kw = dict(device=param.device, batch_size=1, autocast_dtype=autocast)
    if head:
        return embed_with_head_inputs(model, video, [0], **kw)[1][0]  # type: ignore  (T, D)
    return embed_videos(model, video, [0], **kw)[0]  # type: ignore                  (T, D)


def predict_progress(model: AlignmentModel, array: np.ndarray,
                     annotation: VideoAnnotation) -> np.ndarray:
    """Online action-level progress (T,): frame t of foreground segment [s, e] gets the head's
    output on the prefix s..t (what a live system sees), background frames 0. The encoder runs
    once over the whole video."""
    from alignprog.evaluation import online_progress

    if model.progress_head is None:
        raise ExportError("this model has no learnable progress head (the run trained "
                          "progress.method=cumulative_l2 or none); predict needs one")
    inputs = embed(model, array, head=True)                                       # (T, D)
    return online_progress(model.progress_head, inputs, annotation).float().numpy()  # (T,)


# ----------------------------------------------------------------------------------------------
# Segments


def whole_video_annotation(handle: str, num_frames: int) -> VideoAnnotation:
    """One foreground segment over every frame (predict without segments)."""
    return VideoAnnotation("-", handle, num_frames, (WHOLE_VIDEO_LABEL,), (0,),
                           (num_frames - 1,), frozenset())


def read_segments(path: Path) -> dict[str | None, RawAnnotation]:
    """Segments per video from a JSON file; key None = the same segments for every video.

    Accepted forms (bounds are inclusive feature-frame indices, as in dataset.json):

    * ``{"<file stem>": {"labels": [...], "starts": [...], "ends": [...]}, ...}``
    * ``{"<file stem>": [[start, end, label], ...], ...}``
    * ``[[start, end, label], ...]``: the same segments for every video given
    * a dataset annotation file (``{"<task>": {"handles": [...], "hdl_actions": [...],
      "hdl_start_times": [...], "hdl_end_times": [...]}}``), videos matched by handle

    Labels in the export's background labels (e.g. "0", "background") are background: their
    frames get progress 0. Unannotated stretches become background, overlaps are cut, and the
    last segment is fitted to the video's length, as the dataset loader does (`canonicalise`).
    """
    path = Path(path)
    file = str(path)
    try:
        text = read_user_text(path)
    except FileNotFoundError:
        raise DataError("no such segments file", file=file) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read the segments JSON ({exc})", file=file) from None
    data = load_json_text(text, lambda reason: DataError(
        f"cannot read the segments JSON ({reason})", file=file))
    if isinstance(data, list):
        return {None: _raw_from_entry("-", "*", data, file)}
    if not isinstance(data, dict) or not data:
        raise DataError("segments must be a JSON object (one entry per video) or a list of "
                        "[start, end, label]", file=file)
    out: dict[str | None, RawAnnotation] = {}
    if all(isinstance(v, dict) and "handles" in v for v in data.values()):
        for task, record in data.items():
            for raw in parse_task_record(task, record, file=file):
                out[raw.handle] = raw
        return out
    for handle, entry in data.items():
        out[handle] = _raw_from_entry("-", handle, entry, file)
    return out


def _raw_from_entry(task: str, handle: str, entry: Any, file: str) -> RawAnnotation:
    if isinstance(entry, list):
        bad = [e for e in entry if not (isinstance(e, list) and len(e) == 3)]
        if bad or not entry:
            raise DataError(f"segments must be a non-empty list of [start, end, label], got "
                            f"{(bad or [entry])[0]!r}", file=file, handle=handle)
        entry = {"starts": [e[0] for e in entry], "ends": [e[1] for e in entry],
                 "labels": [e[2] for e in entry]}
    if not isinstance(entry, dict) or not {"labels", "starts", "ends"} <= entry.keys():
        raise DataError("a video's segments must be {\"labels\": [...], \"starts\": [...], "
                        "\"ends\": [...]} or a list of [start, end, label]", file=file,
                        handle=handle)
    record = {"handles": [handle], "hdl_actions": [entry["labels"]],
              "hdl_start_times": [entry["starts"]], "hdl_end_times": [entry["ends"]]}
    return parse_task_record(task, record, file=file)[0]


def segments_for(segments: Mapping[str | None, RawAnnotation], handle: str, num_frames: int,
                 info: ExportInfo, *, file: str | None = None,
                 log: RepairLog | None = None) -> VideoAnnotation:
    """The canonical segments of video `handle` (T = num_frames) from `read_segments`' result."""
    raw = segments.get(handle, segments.get(None))
    if raw is None:
        known = ", ".join(sorted(k for k in segments if k is not None)[:8])
        raise DataError(f"no segments for video '{handle}' (the file has: {known})", file=file)
    if raw.handle != handle:
        raw = RawAnnotation(raw.task, handle, raw.labels, raw.starts, raw.ends)
    background = frozenset(info.background_labels)
    return canonicalise(raw, num_frames, background=background,
                        gap_label=info.background_labels[0], log=log, file=file)
