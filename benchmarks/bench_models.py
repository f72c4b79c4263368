"""Forward+backward time of the multi-head model and of the progress heads.

    PYTHONPATH=. python benchmarks/bench_models.py --device cuda
    PYTHONPATH=. python benchmarks/bench_models.py --device cpu --frames 120 --resnet-frames 4

Configuration of the reference measurements (benchmarks/README.md): 16 heads, D = 128, a batch
of 2 videos of 450 and 380 frames; the progress head on 500 segments of lengths 3..200 (batched,
one call) against a simple loop that runs one segment at a time. Prints a table and optionally JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from alignprog.config import ModelConfig, ProgressConfig
from alignprog.models import build_model, build_progress_head


def timed(fn, device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs, after ``warmup`` runs."""
    times = []
    for i in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_encoder(encoder: str, frames: tuple[int, int], device, repeats: int) -> float:
    shape = (2048,) if encoder != "resnet50" else (1024, 14, 14)
    model = build_model(ModelConfig(encoder=encoder), None, input_shape=shape,
                        num_tasks=16).to(device)
    t = max(frames)
    x = torch.randn(2, t, *shape, device=device)
    mask = torch.zeros(2, t, dtype=torch.bool, device=device)
    mask[0, :frames[0]] = True
    mask[1, :frames[1]] = True

    def step():
        model.zero_grad(set_to_none=True)
        model(x, mask).embeddings.square().mean().backward()

    return timed(step, device, repeats)


def bench_head(arch: str, n: int, device, repeats: int, loop: bool) -> float:
    torch.manual_seed(0)
    head = build_progress_head(arch, in_dim=128).to(device)
    lengths = torch.randint(3, 201, (n,), device=device)
    emb = torch.randn(n, int(lengths.max()), 128, device=device, requires_grad=True)
    target = torch.rand(n, device=device)

    def batched():
        head.zero_grad(set_to_none=True)
        (head(emb, lengths) - target).abs().mean().backward()

    def one_at_a_time():
        head.zero_grad(set_to_none=True)
        total = 0.0
        for i in range(n):
            k = int(lengths[i])
            pred = head(emb[i:i + 1, :k], lengths[i:i + 1])
            total = total + (pred - target[i:i + 1]).abs().sum()
        (total / n).backward()

    return timed(one_at_a_time if loop else batched, device, repeats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--frames", type=int, nargs=2, default=(450, 380))
    p.add_argument("--resnet-frames", type=int, nargs=2, default=None,
                   help="frames for resnet50 (default: --frames); it is slow on a CPU")
    p.add_argument("--segments", type=int, default=500)
    p.add_argument("--loop-repeats", type=int, default=3)
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    args.frames = tuple(args.frames)
    results: dict = {"device": name, "torch": torch.__version__, "frames": list(args.frames),
                     "segments": args.segments}
    for enc in ("stacking", "resnet50"):
        frames = tuple(args.resnet_frames or args.frames) if enc == "resnet50" else args.frames
        s = bench_encoder(enc, frames, device, args.repeats)
        results[f"mcn_{enc}_s"] = s
        print(f"MCN 16 heads, {enc:9s} {frames}: {s * 1e3:9.2f} ms fwd+bwd", flush=True)
    for arch in ("gru", "mean", "transformer", "dilated_conv"):
        fast = bench_head(arch, args.segments, device, args.repeats, loop=False)
        slow = bench_head(arch, args.segments, device, args.loop_repeats, loop=True)
        results[f"head_{arch}_batched_s"] = fast
        results[f"head_{arch}_loop_s"] = slow
        print(f"head {arch:12s} {args.segments} segments: batched {fast * 1e3:8.2f} ms, "
              f"loop {slow * 1e3:9.2f} ms, speed-up {slow / fast:6.1f}x", flush=True)
    print(f"device: {name}, torch {torch.__version__}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)


if __name__ == "__main__":
    main()
