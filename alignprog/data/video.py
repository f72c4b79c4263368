"""Video files -> sampled RGB frames: the decoding half of `alignprog extract-features`.

Frame sampling (docs/data.md#feature-extraction, as the reference fork samples): frames are
decoded in order and numbered c = 0, 1, ...;
frame c is kept when ``floor(c mod h) == 0`` with ``h = native_fps / target_fps``, computed in
exact rational arithmetic (``fractions.Fraction``), so that e.g. 30000/1001 fps is not subject to
float rounding at period boundaries (the fork uses floats; the two agree except where ``c mod h`` is
within rounding of an integer). ``native_fps`` is the stream's average frame rate from the
container, else FFmpeg's guessed rate, else 30 (the documented fallback). The rule counts decoded
frames, not timestamps: a variable-frame-rate video is sampled as if its rate were constant.
With ``h >= 1`` exactly one frame is kept per period of h frames, the first being frame 0;
with ``h < 1`` (target above the native rate) every frame is kept, none is repeated.

`alignprog.data.extraction` runs the network over these frames. No torch here.
"""

from __future__ import annotations

import time
from fractions import Fraction
from pathlib import Path
from typing import Iterator

import numpy as np

from alignprog.errors import ConfigError, DataError

VIDEO_SUFFIXES = frozenset({".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg",
                            ".wmv", ".flv", ".ts", ".3gp"})
DEFAULT_NATIVE_FPS = Fraction(30)     # "30 if unknown" (docs/data.md#feature-extraction)


class VideoError(DataError):
    """A video cannot be opened or decoded; extraction reports it and goes on."""


# ------------------------------------------------------------------------------------------------
# Frame sampling and decoding


def sampling_period(native_fps: float | Fraction, target_fps: float | Fraction) -> Fraction:
    """h = native_fps / target_fps as an exact fraction (floats via their decimal form)."""
    native = _fraction(native_fps)
    target = _fraction(target_fps)
    if target <= 0:
        raise ConfigError(f"--fps must be > 0, got {target_fps}")
    return native / target


def keep_frame(c: int, h: Fraction) -> bool:
    """Decoded frame c is kept when floor(c mod h) == 0."""
    return c % h < 1


def _fraction(x: float | Fraction | int) -> Fraction:
    if isinstance(x, (Fraction, int)):
        return Fraction(x)
    return Fraction(repr(float(x)))   # 29.97 -> 2997/100, not the binary float's expansion


class SampledFrames:
    """Decode a video with PyAV and yield the sampled frames as RGB uint8 arrays (H, W, 3).

    Attributes filled as decoding goes: ``native_fps`` (known after opening), ``decoded``
    (frames decoded so far) and ``decode_s`` (seconds spent decoding and converting). Every
    FFmpeg error is raised as `VideoError` naming the file.
    """

    def __init__(self, path: Path, target_fps: float, *, threads: bool = True) -> None:
        import av

        self.path = Path(path)
        self.decoded = 0
        self.decode_s = 0.0
        start = time.perf_counter()
        try:
            self._container = av.open(str(path))
        except (av.error.FFmpegError, OSError, UnicodeDecodeError) as exc:
            raise VideoError(f"cannot open the video ({_av_message(exc)})",
                             file=str(path)) from None
        if not self._container.streams.video:
            self._container.close()
            raise VideoError("the file holds no video stream", file=str(path))
        self._stream = self._container.streams.video[0]
        if threads:
            # FFmpeg's frame and slice threads: the same frames, decoded faster.
            self._stream.codec_context.thread_type = "AUTO"
        rate = self._stream.average_rate or self._stream.guessed_rate
        self.native_fps = Fraction(rate) if rate else DEFAULT_NATIVE_FPS
        self.period = sampling_period(self.native_fps, target_fps)
        self.decode_s += time.perf_counter() - start

    def __iter__(self) -> Iterator[np.ndarray]:
        import av

        frames = self._container.decode(self._stream)
        while True:
            start = time.perf_counter()
            try:
                frame = next(frames)
                keep = keep_frame(self.decoded, self.period)
                rgb = frame.to_ndarray(format="rgb24") if keep else None     # (H, W, 3) uint8
            except StopIteration:
                self.decode_s += time.perf_counter() - start
                return
            except (av.error.FFmpegError, OSError, ValueError) as exc:
                raise VideoError(f"decoding failed after {self.decoded} frames "
                                 f"({_av_message(exc)})", file=str(self.path)) from None
            self.decoded += 1
            self.decode_s += time.perf_counter() - start
            if rgb is not None:
                yield rgb

    def close(self) -> None:
        self._container.close()

    def __enter__(self) -> "SampledFrames":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _av_message(exc: BaseException) -> str:
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def find_videos(video_dir: Path, *, recursive: bool = False) -> list[Path]:
    """Video files (by suffix) in `video_dir`, sorted; a single file is accepted as is. Handles
    are file stems, so two videos with the same stem are an error."""
    video_dir = Path(video_dir)
    if video_dir.is_file():
        return [video_dir]
    if not video_dir.is_dir():
        raise DataError("no such file or folder", file=str(video_dir))
    pattern = video_dir.rglob("*") if recursive else video_dir.iterdir()
    paths = sorted(p for p in pattern if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES
                   and not p.name.startswith("."))
    seen: dict[str, Path] = {}
    for p in paths:
        if p.stem in seen:
            raise DataError(f"two videos have the handle '{p.stem}' ({seen[p.stem]} and {p}); "
                            "rename one", file=str(video_dir))
        seen[p.stem] = p
    return paths
