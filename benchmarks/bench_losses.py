"""Forward+backward time and peak memory of the four alignment losses
(docs/algorithms.md#alignment-losses).

    PYTHONPATH=. python benchmarks/bench_losses.py --device cuda --json losses.json
    PYTHONPATH=. python benchmarks/bench_losses.py --device cpu --losses tcc --frames 32 128

For every loss, batch size B and length T: random (B, T, D) embeddings that require grad, all
frames real, the loss called with only (x, mask) and its default keywords (fixed compat,
reference reduction; GTCC with drop=None where that argument has no default). Time is the
median of --repeats runs after --warmup runs, CUDA-synchronised; peak memory is
torch.cuda.max_memory_allocated over those runs (inputs included), "n/a" on the CPU. A loss
whose module is missing or fails to import is reported as "not available"; on the CPU, lengths
above --max-cpu-frames are skipped (the (P, T, T) tensors and per-pair loops get slow).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import statistics
import sys
import time
from typing import Callable

import torch

# name -> (module, function); imported lazily, since the modules are written independently.
LOSSES = {
    "tcc": ("alignprog.losses.tcc", "tcc_loss_batch"),
    "gtcc": ("alignprog.losses.gtcc", "gtcc_loss_batch"),
    "lav": ("alignprog.losses.lav", "lav_loss_batch"),
    "vava": ("alignprog.losses.vava", "vava_loss_batch"),
}


def load_loss(name: str) -> tuple[Callable | None, str]:
    """The loss function and "" or None and why it is not available."""
    module, attr = LOSSES[name]
    try:
        fn = getattr(importlib.import_module(module), attr)
    except ImportError as exc:
        return None, f"not available ({exc})"
    except Exception as exc:  # a half-written module: report it, bench the others
        return None, f"not available ({type(exc).__name__}: {exc})"
    return fn, ""


def call_kwargs(fn: Callable) -> dict:
    """Default keywords only; a ``drop`` argument without a default (GTCC) gets None."""
    param = inspect.signature(fn).parameters.get("drop")
    if param is not None and param.default is inspect.Parameter.empty:
        return {"drop": None}
    return {}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_one(fn: Callable, b: int, t: int, dim: int, device: torch.device, repeats: int,
              warmup: int, slow_s: float) -> dict:
    """Median forward+backward seconds and peak bytes for one (B, T)."""
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(b, t, dim, generator=g).to(device).requires_grad_(True)
    mask = torch.ones(b, t, dtype=torch.bool, device=device)
    kwargs = call_kwargs(fn)

    def step() -> torch.Tensor:
        x.grad = None
        loss = fn(x, mask, **kwargs)
        loss.backward()
        return loss

    def timed_step() -> tuple[float, torch.Tensor]:
        sync(device)
        start = time.perf_counter()
        loss = step()
        sync(device)
        return time.perf_counter() - start, loss

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for i in range(warmup + repeats):
        elapsed, loss = timed_step()
        if i == 0 and elapsed > slow_s:
            # One run already took long: count it as the warm-up and time a single more.
            elapsed, loss = timed_step()
            times = [elapsed]
            break
        if i >= warmup:
            times.append(elapsed)
    value = float(loss.detach())
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"ms": 1e3 * statistics.median(times), "runs_timed": len(times),
            "peak_mib": None if peak is None else peak / 2**20, "value": value,
            "finite": bool(torch.isfinite(torch.tensor(value))), "status": "ok"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, nargs="+", default=[2, 8])
    p.add_argument("--frames", type=int, nargs="+", default=[128, 512, 2048])
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    p.add_argument("--max-cpu-frames", type=int, default=512,
                   help="on the CPU, skip lengths above this (default 512)")
    p.add_argument("--slow-s", type=float, default=10.0,
                   help="a first run slower than this many seconds is timed once more only")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args()
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    rows = []
    for loss_name in args.losses:
        fn, why = load_loss(loss_name)
        for b in args.batch:
            for t in args.frames:
                row = {"loss": loss_name, "batch": b, "frames": t}
                if fn is None:
                    row["status"] = why
                elif device.type == "cpu" and t > args.max_cpu_frames:
                    row["status"] = f"skipped (cpu, T > {args.max_cpu_frames})"
                else:
                    try:
                        row.update(bench_one(fn, b, t, args.dim, device, args.repeats,
                                             args.warmup, args.slow_s))
                    except torch.cuda.OutOfMemoryError:
                        row["status"] = "out of memory"
                    except Exception as exc:
                        row["status"] = f"error ({type(exc).__name__}: {exc})"[:200]
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                rows.append(row)
                print(format_row(row), flush=True)
    print(f"device: {name}, torch {torch.__version__}, D = {args.dim}, "
          f"fwd+bwd median of {args.repeats} after {args.warmup} warm-up", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": name, "torch": torch.__version__, "dim": args.dim,
                       "repeats": args.repeats, "warmup": args.warmup, "results": rows},
                      fh, indent=2)


def format_row(row: dict) -> str:
    head = f"{row['loss']:5s} B={row['batch']:<3d} T={row['frames']:<5d}"
    if row["status"] != "ok":
        return f"{head} {row['status']}"
    mem = "n/a" if row["peak_mib"] is None else f"{row['peak_mib']:9.1f} MiB"
    flag = "" if row["finite"] else "  (loss not finite)"
    return f"{head} {row['ms']:10.2f} ms  peak {mem:>13s}  value {row['value']:.4g}{flag}"


if __name__ == "__main__":
    main()
