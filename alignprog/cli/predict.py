"""`alignprog predict`: online progress of an exported model on new videos."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from alignprog.cli.common import (console, fail, guarded, print_table, report,
                                  write_figure)

EPILOG = ("Examples:\n\n  alignprog predict exports/lav video.npy\n\n"
          "  alignprog predict exports/lav data/synth/features/*.npy --segments "
          "data/synth/dataset.json --plot progress.png\n\n"
          "  alignprog predict exports/lav video.npy --segments segs.json --json\n\n"
          "Segments JSON (inclusive feature-frame indices):\n\n"
          '  {"video": {"labels": ["0", "cut", "0"], "starts": [0, 10, 50], "ends": [9, 49, 80]}}'
          '\n\n  {"video": [[0, 9, "0"], [10, 49, "cut"], [50, 80, "0"]]}\n\n'
          '  [[0, 9, "0"], [10, 49, "cut"]]   (the same segments for every video)\n\n'
          "  or a dataset annotation file (dataset.json), videos matched by file stem.")

CONVENTION = ("online, action-level: frame t of a foreground segment [s, e] gets the head's "
              "output on the embeddings of frames s..t; background frames get 0; the encoder "
              "runs once over the whole video (as in evaluation), so an embedding may use the "
              "few later frames its temporal convolutions see")
SPARK = "▁▂▃▄▅▆▇█"
SPARK_WIDTH = 32


def sparkline(values: np.ndarray, width: int = SPARK_WIDTH) -> str:
    """Values in [0, 1] as at most `width` block characters (bins averaged)."""
    import numpy as np  # not at the top: `alignprog --help` stays light

    if len(values) == 0:
        return ""
    bins = np.array_split(np.asarray(values, dtype=np.float64), min(width, len(values)))
    levels = [min(int(np.clip(b.mean(), 0, 1) * len(SPARK)), len(SPARK) - 1) for b in bins]
    return "".join(SPARK[k] for k in levels)


@guarded
def predict(
    export: Annotated[Path, typer.Argument(
        help="An export directory (alignprog export) or its model.safetensors.",
        show_default=False)],
    features: Annotated[list[Path], typer.Argument(
        help="Feature files: (T, D) .npy in fp32 or fp16, or (T, C, H, W) for a frames model.",
        show_default=False)],
    segments: Annotated[Optional[Path], typer.Option(
        help="JSON of where actions start and end (see below); progress is then per action, "
        "0 on background. Without it each video is one segment.", show_default=False)] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print everything, full per-frame arrays included, as JSON.")] = False,
    plot: Annotated[Optional[Path], typer.Option(
        help="Also write one PNG figure of the progress curves (a panel per video) to this "
        "file (--plot FILE; commands that write several figures take --plots DIR).",
        show_default=False)] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    max_frames: Annotated[int, typer.Option(
        min=1, help="Refuse a video with more frames than this (read from the .npy header, "
        "before the data).")] = 100_000,
    max_head_steps: Annotated[float, typer.Option(
        min=1, help="Refuse a video whose online progress needs more head frame steps than "
        "this: a head with position 'relative' re-runs every prefix of an action (sum of "
        "L(L+1)/2 steps), a count/none head streams (sum of L).")] = 2e8,
) -> None:
    """Predict per-frame progress of new videos with an exported model.

    The encoder runs once over each video; the progress head runs online, each frame from its
    prefix within its action, as a live system would see it (the encoder's temporal
    convolutions still see a few frames ahead, as in evaluation).
    """
    from alignprog.data.annotations import RepairLog
    from alignprog.errors import ConfigError
    from alignprog.export import load_with_config
    from alignprog.inference import (WHOLE_VIDEO_NOTE, predict_progress, read_segments,
                                     read_video_array, segments_for, whole_video_annotation)
    from alignprog.runtime import resolve_device

    if plot is not None:
        from alignprog.plots import require_matplotlib
        require_matplotlib()  # fail before the work, not after
    try:
        dev = resolve_device(device)
    except ConfigError as exc:  # its messages name the training setting
        fail(str(exc).replace("train.device", "--device"), exc.exit_code)
    model, info = load_with_config(export, device=dev)
    if model.progress_head is None:
        fail(f"{export}: the exported model has no learnable progress head (its run used "
             f"progress.method={info.progress.method if info.progress.enabled else 'none'}); "
             "predict needs one")
    seg_map = read_segments(segments) if segments is not None else None
    if seg_map is None:
        report("note", f"no --segments: {WHOLE_VIDEO_NOTE} (progress runs from the first to the "
               "last frame of each video)")
    log = RepairLog()
    videos = []
    for path in features:
        array = read_video_array(path, info, max_frames=max_frames)               # (T, *F)
        handle = path.stem
        if seg_map is None:
            ann = whole_video_annotation(handle, len(array))
        else:
            ann = segments_for(seg_map, handle, len(array), info, file=str(segments), log=log)
        _check_cost(path, model.progress_head, ann, info, max_head_steps, seg_map is None)
        pred = predict_progress(model, array, ann)                                # (T,)
        videos.append(_video_record(path, ann, pred))
    for kind, n, example in log.rows():
        report("note", f"segments: {kind}: {n} (e.g. {example})")
    result = {
        "export": str(export),
        "segments_file": str(segments) if segments is not None else None,
        "whole_video_as_one_segment": seg_map is None,
        "note": WHOLE_VIDEO_NOTE if seg_map is None else None,
        "convention": CONVENTION,
        "model": {"method": info.method, "head": _head_name(info), "dtype": info.dtype},
        "repairs": [{"kind": k, "count": n, "example": ex} for k, n, ex in log.rows()],
        "videos": videos,
    }
    if plot is not None:
        write_figure(plot, plot_progress(result))
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    for video in videos:
        _print_video(video, result["whole_video_as_one_segment"])


def _check_cost(path: Path, head, ann, info, bound: float, whole_video: bool) -> None:
    """Refuse, before the work, a video whose online prediction would take hours."""
    from alignprog.evaluation.online import online_cost

    steps = online_cost(head, ann)
    if steps <= bound:
        return
    longest = int(ann.lengths[ann.is_foreground].max())
    ways = ["give the action bounds with --segments"] if whole_video else []
    if not head.streamable:
        ways.append("use a model trained with --set progress.learnable.position=count, which "
                    "streams in time linear in the action length")
    ways.append("raise --max-head-steps")
    fail(f"{path}: online progress with the {_head_name(info)} head needs {steps:.3g} head "
         f"frame steps for actions of up to {longest} frames (more than --max-head-steps "
         f"{bound:.3g}); " + ", or ".join(ways))


def _head_name(info) -> str:
    lc = info.progress.learnable
    return f"{lc.arch} (position {lc.position})"


def _video_record(path: Path, ann, pred: np.ndarray) -> dict[str, Any]:
    fg = ann.is_foreground
    progress = [round(float(p), 6) for p in pred]  # 6 digits: well below the head's accuracy
    segs = []
    for k, (lab, s, e) in enumerate(zip(ann.labels, ann.starts, ann.ends)):
        segs.append({"label": lab, "start": int(s), "end": int(e), "frames": int(e - s + 1),
                     "foreground": bool(fg[k]),
                     "progress_first": progress[s] if fg[k] else None,
                     "progress_last": progress[e] if fg[k] else None})
    return {"file": str(path), "handle": ann.handle, "frames": ann.num_frames,
            "segments": segs, "progress": progress}


def _print_video(video: dict[str, Any], whole: bool) -> None:
    how = "whole video as one segment" if whole else f"{len(video['segments'])} segments"
    console.print(f"[bold]{escape(video['file'])}[/]: {video['frames']} frames, {how}",
                  highlight=False)
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for col, justify in (("#", "right"), ("label", "left"), ("frames", "right"),
                         ("progress (online)", "left"), ("first", "right"), ("last", "right")):
        table.add_column(col, justify=justify)
    import numpy as np

    pred = np.asarray(video["progress"])
    for k, seg in enumerate(video["segments"]):
        if seg["foreground"]:
            line = sparkline(pred[seg["start"]:seg["end"] + 1])
            first, last = f"{seg['progress_first']:.2f}", f"{seg['progress_last']:.2f}"
        else:
            line, first, last = "[dim]background (0)[/]", "-", "-"
        table.add_row(str(k), escape(seg["label"]), f"{seg['start']}-{seg['end']}", line,
                      first, last)
    print_table(table)


def plot_progress(result: dict[str, Any]) -> bytes:
    """A PNG: one panel per video, the online progress curve over frames, actions shaded and
    labelled (as in eval-progress's progress curves)."""
    from alignprog.plots import png_bytes, predict_figure

    return png_bytes(predict_figure(result))
