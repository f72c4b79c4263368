"""Throughput of `alignprog extract-features`: decoding and network time, separately and together.

    PYTHONPATH=. python benchmarks/bench_extract.py                       # CPU
    PYTHONPATH=. python benchmarks/bench_extract.py --device cuda --batch-size 64
    PYTHONPATH=. python benchmarks/bench_extract.py --video some.mp4 --fps 4

Without --video, an H.264 clip of synthetic frames is written first (PyAV, libx264; --width,
--height, --seconds at 30 fps). Three measurements, each in frames per second:

1. decoding: PyAV decodes every frame, converts the sampled ones to RGB (the extraction's
   reader); given per decoded frame and per sampled frame;
2. network: preprocessing + ResNet-50 on batches already in memory (RGB frames of the video's
   size), for --layout both (layer3 + pooled layer4) and frames (layer3 only);
3. end to end: `extract_video` on the clip, its decode and network seconds reported apart.

Random weights: the cost is the same as ImageNet's.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from alignprog.data.extraction import extract_video, load_network, preprocess
from alignprog.data.video import SampledFrames
from alignprog.runtime import device_info, resolve_device


def write_clip(path: Path, seconds: float, width: int, height: int, fps: int = 30) -> Path:
    import av

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)   # (H, W, 3)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23"}
        for i in range(int(seconds * fps)):
            img = np.roll(base, 4 * i, axis=1)   # moving content: real inter-frame work
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_decode(path: Path, fps: float) -> tuple[int, int, float]:
    start = time.perf_counter()
    with SampledFrames(path, fps) as reader:
        sampled = sum(1 for _ in reader)
        decoded = reader.decoded
    return decoded, sampled, time.perf_counter() - start


@torch.inference_mode()
def bench_network(net, device: torch.device, batch_size: int, batches: int, height: int,
                  width: int, pooled: bool) -> float:
    rgb = torch.randint(0, 256, (batch_size, height, width, 3), dtype=torch.uint8)
    rgb = rgb.to(device)                                                   # (B, H, W, 3)
    for _ in range(2):   # warm-up: cuDNN algorithm choice, allocator
        net(preprocess(rgb), pooled=pooled)
    sync(device)
    start = time.perf_counter()
    for _ in range(batches):
        out = net(preprocess(rgb), pooled=pooled)
        out.layer3.to(torch.float16).cpu()   # the copy back is part of the cost
        if pooled:
            out.pooled.to(torch.float16).cpu()
    sync(device)
    return batches * batch_size / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--video", type=Path, help="Benchmark this file instead of a synthetic clip.")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--fps", type=float, default=1.0, help="Target sampling rate.")
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--batches", type=int, default=None,
                   help="Network batches timed (default: 2 on CPU, 20 on CUDA).")
    args = p.parse_args()
    device = resolve_device(args.device)
    info = device_info(device)
    print(f"device {info.get('gpu', 'cpu')}, torch {torch.__version__}, {info['threads']} threads, "
          f"{os.cpu_count()} CPU cores, batch {args.batch_size}")
    with tempfile.TemporaryDirectory() as tmp:
        if args.video is None:
            start = time.perf_counter()
            video = write_clip(Path(tmp) / "clip.mp4", args.seconds, args.width, args.height)
            print(f"synthetic clip: {args.width}x{args.height} H.264, 30 fps, {args.seconds:g} s "
                  f"(written in {time.perf_counter() - start:.1f} s)")
        else:
            video = args.video
        with SampledFrames(video, args.fps) as reader:
            first = next(iter(reader))
        height, width = first.shape[:2]

        decoded, sampled, secs = bench_decode(video, args.fps)
        print(f"1. decoding at {args.fps:g} fps: {decoded} frames decoded, {sampled} sampled "
              f"in {secs:.2f} s: {decoded / secs:.0f} decoded frames/s, "
              f"{sampled / secs:.1f} sampled frames/s")
        decoded, sampled, secs = bench_decode(video, 1e9)   # every frame converted to RGB
        print(f"   every frame to RGB: {decoded / secs:.0f} frames/s")

        net = load_network("random", device=device).network
        batches = args.batches or (20 if device.type == "cuda" else 2)
        for layout, pooled in (("both", True), ("frames", False)):
            rate = bench_network(net, device, args.batch_size, batches, height, width, pooled)
            print(f"2. network ({layout}, {width}x{height} input): {rate:.1f} frames/s")

        start = time.perf_counter()
        out = extract_video(video, net, fps=args.fps, layouts=("features", "frames"),
                            device=device, batch_size=args.batch_size)
        wall = time.perf_counter() - start
        print(f"3. end to end (--layout both, fp16): {out.num_frames} frames in {wall:.2f} s: "
              f"{out.num_frames / wall:.1f} frames/s; decoding {out.decode_s:.2f} s, network "
              f"{out.network_s:.2f} s; {out.decoded_frames / wall:.0f} video frames/s "
              f"({out.decoded_frames / float(out.native_fps) / wall:.1f} s of video per s)")


if __name__ == "__main__":
    main()
