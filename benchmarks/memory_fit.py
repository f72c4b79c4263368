"""Peak memory of one training step against the estimate `train` checks before it starts.

For each method, one eager step of `alignprog train --method METHOD` (stacking encoder, 16
heads, the learnable head) on batches of B videos of T frames; the peak is measured after the
step that creates Adam's state, minus what the model and optimizer hold between steps. The two
coefficients of `alignprog.training.memory` (bytes per frame of the encoder, bytes per pair
matrix element of the loss) are fitted by least squares and printed next to the table, so that
the estimate can be re-calibrated after a change to a loss or the encoder:

    PYTHONPATH=. python benchmarks/memory_fit.py --device cuda --out memory.json

On the CPU the peak is the process's resident-set high-water mark, measured in a child process
per shape (slow for long videos; use small --lengths).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import torch

from alignprog.training.memory import estimate_step_bytes, pair_count
from benchmarks.train_step import build

GRID = ((2, 256), (2, 512), (2, 1024), (2, 2048), (2, 4096), (4, 512), (4, 1024))


def peak_cuda(method: str, b: int, t: int, device: str, overrides: dict) -> int:
    trainer, batch = build(method, "stacking", device, "fp32", (t,) * b,
                           {"train.cuda_graphs": "off"} | overrides)
    trainer.step_batch(batch)             # Adam's state is created here
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    trainer.step_batch(batch)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - resident
    del trainer, batch
    torch.cuda.empty_cache()
    return int(peak)


def peak_cpu(method: str, b: int, t: int, overrides: dict) -> int:
    """In a child process: its RSS high-water mark after two steps, minus the one after the
    first step at a tiny length (interpreter, torch and the model)."""
    code = ("import json, resource, sys; from benchmarks.train_step import build; "
            "m, b, t = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]); "
            "o = json.loads(sys.argv[4]); "
            "tr, bt = build(m, 'stacking', 'cpu', 'fp32', (t,) * b, o); tr.step_batch(bt); "
            "tr.step_batch(bt); print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    out = {}
    for length in (8, t):
        proc = subprocess.run([sys.executable, "-c", code, method, str(b), str(length),
                               json.dumps(overrides)], capture_output=True, text=True, check=True)
        out[length] = int(proc.stdout.split()[-1]) * 1024
    return out[t] - out[8]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--methods", nargs="+", default=["tcc", "gtcc", "lav", "vava"])
    parser.add_argument("--lengths", nargs="+", type=int, default=None,
                        help="T values (B = 2); default: the built-in grid of (B, T)")
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    grid = [(2, t) for t in args.lengths] if args.lengths else list(GRID)
    rows = []
    for method in args.methods:
        from benchmarks.train_step import make_config
        cfg = make_config(method, "stacking", args.device, "fp32", {"train.cuda_graphs": "off"})
        frames, pairs = [], []
        for b, t in grid:
            peak = (peak_cuda(method, b, t, args.device, {}) if args.device.startswith("cuda")
                    else peak_cpu(method, b, t, {}))
            est = estimate_step_bytes(cfg, [t] * b, device_type=torch.device(args.device).type)
            rows.append({"method": method, "B": b, "T": t, "peak_bytes": peak,
                         "estimate_bytes": est, "ratio": est / peak})
            frames.append(b * t)
            pairs.append(pair_count(cfg, b) * (t + 1) ** 2)
            print(f"{method:5s} B={b} T={t:5d} peak {peak / 2**20:9.1f} MiB  estimate "
                  f"{est / 2**20:9.1f} MiB  ratio {est / peak:5.2f}", flush=True)
        peaks = np.array([r["peak_bytes"] for r in rows if r["method"] == method], float)
        design = np.stack([np.array(frames, float), np.array(pairs, float)], 1)
        (a, c), *_ = np.linalg.lstsq(design, peaks, rcond=None)
        print(f"{method:5s} fit: {a:.0f} bytes per frame, {c:.2f} bytes per pair element",
              flush=True)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"device": torch.cuda.get_device_name() if args.device.startswith("cuda")
                       else "cpu", "torch": torch.__version__, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
