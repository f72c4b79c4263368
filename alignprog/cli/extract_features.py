"""`alignprog extract-features`: video files -> features/<handle>.npy and frames/<handle>.npy."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn)

from alignprog.cli.common import (Layout, console, dtype_choice, err_console, fail, guarded,
                                   one_path, report)

EPILOG = ("Examples:\n\n  alignprog extract-features videos/ --out data/ego\n\n"
          "  alignprog extract-features videos/ --out data/ego --layout both --fps 4 "
          "--device cuda --batch-size 64\n\n"
          "  alignprog extract-features videos/ --out data/test --weights random --dtype fp32 "
          "--json\n\n"
          "Writes OUT/features/<handle>.npy (T, 2048), OUT/frames/<handle>.npy "
          "(T, 1024, 14, 14) and OUT/manifest.json; <handle> is the video's file stem. "
          "Run it again to resume: finished videos are skipped.")


@guarded
def extract_features(
    video_dir: Annotated[Path, typer.Argument(
        help="Folder of video files (.mp4, .mkv, .avi, .webm, ...) or a single video.",
        show_default=False)],
    out_root: Annotated[Optional[Path], typer.Argument(
        hidden=True, help="Older spelling of --out.", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Dataset root to write into (required; created if missing).",
        show_default=False)] = None,
    fps: Annotated[float, typer.Option(
        help="Target frame rate: decoded frame c is kept when floor(c mod h) == 0, "
        "h = native fps / FPS.")] = 1.0,
    layout: Annotated[Layout, typer.Option(
        help="features: (T, 2048) pooled layer4; frames: (T, 1024, 14, 14) layer3 (about "
        "400 KB per frame in fp16); both: one network pass gives both.")] = Layout.features,
    weights: Annotated[str, typer.Option(
        help="imagenet (torchvision IMAGENET1K_V1, from the torch hub cache or downloaded), "
        "random (seeded, for tests and benchmarks) or a .safetensors / torch state-dict file.")
    ] = "imagenet",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Frames per network pass.", min=1)] = 32,
    dtype: Annotated[str, typer.Option(
        help="Storage dtype of the arrays (the reference fork stores fp16); the network runs "
        "in fp32.", **dtype_choice("fp32", "fp16"))
    ] = "fp16",
    overwrite: Annotated[bool, typer.Option(
        help="Redo videos whose arrays already exist (and accept other settings than the "
        "manifest's).")] = False,
    recursive: Annotated[bool, typer.Option(help="Also look for videos in sub-folders.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Extract ResNet-50 features from video files into a dataset root.

    Each video is decoded (PyAV), sampled at --fps, resized to 224x224 with ImageNet
    normalisation and run through ResNet-50 once per batch of frames, giving the layer3 maps and
    the pooled layer4 vector from the same pass. Unreadable videos are reported and skipped; the
    exit code is then 1, after the others are written.
    """
    from alignprog.errors import ConfigError
    from alignprog.data.extraction import ExtractSettings, extract_videos
    from alignprog.data.video import find_videos
    from alignprog.runtime import resolve_device

    out_root = one_path("--out", out, out_root, "OUT_ROOT")
    if out_root is None:
        fail("missing --out DIR: the dataset root to write the arrays into", 2)
    try:
        dev = resolve_device(device)
    except ConfigError as exc:  # its messages name the training setting
        fail(str(exc).replace("train.device", "--device"), exc.exit_code)
    layouts = ("features", "frames") if layout is Layout.both else (layout.value,)
    settings = ExtractSettings(fps=fps, layouts=layouts, weights=weights, batch_size=batch_size,
                               dtype=dtype, overwrite=overwrite)
    videos = find_videos(video_dir, recursive=recursive)
    if not videos:
        fail(f"{video_dir}: no video files found (looked for common video suffixes"
             f"{'' if recursive else '; --recursive looks in sub-folders'})")

    state = {"frames": 0, "busy_s": 0.0, "t0": None}

    def rate() -> str:
        if not state["frames"] or state["t0"] is None:
            return ""
        return f"{state['frames'] / (time.perf_counter() - state['t0']):.1f} frames/s"

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[frames]} frames"), TextColumn("{task.fields[rate]}"),
                  TimeElapsedColumn(), console=err_console, transient=True) as bar:
        job = bar.add_task("extracting", total=len(videos), frames=0, rate="")

        def on_start(i: int, handle: str) -> None:
            bar.update(job, description=escape(handle))

        def on_frames(n: int) -> None:
            if state["t0"] is None:   # from the first batch: excludes loading the network
                state["t0"] = time.perf_counter()
            state["frames"] += n
            bar.update(job, frames=state["frames"], rate=rate())

        def on_video(result) -> None:
            if result.status == "failed":
                report("error", f"{result.error} (skipped)")
            bar.advance(job)

        # A damaged existing array is extracted again: said as one "warning:" line.
        summary = extract_videos(videos, out_root, settings, device=dev, on_video_start=on_start,
                                 on_frames=on_frames, on_video=on_video,
                                 on_warning=lambda message: report("warning", message))
    result = summary.to_dict()
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        speed = (f", {result['frames_per_s']} frames/s (decoding {result['decode_s']} s, "
                 f"network {result['network_s']} s)" if result["frames"] else "")
        console.print(
            f"{result['done']} extracted, {result['skipped']} already done, "
            f"{result['failed']} failed: {result['frames']} frames at {fps:g} fps{speed}; "
            f"layout {'+'.join(layouts)}, {dtype}, weights {summary.weights or weights} "
            f"-> {escape(str(out_root))}", highlight=False, soft_wrap=True)
    if summary.failed:
        raise typer.Exit(1)
