"""Training-step throughput of `alignprog train` per method and encoder (issue 6, issue 9 setup).

    PYTHONPATH=. python benchmarks/bench_train.py --device cuda --json train.json

The document's configuration: 16 MCN heads, D = 128, a batch of 2 videos of 450 and 380 frames,
the GRU progress head with 10 x 5 samples per video, Adam; `stacking` on (T, 2048) features
and the document's `resnet50` on (T, 1024, 14, 14) layer3 maps. The batch is random features
with a procedural annotation (background and actions of 5-40 frames alternating). Reports the
median seconds per full training step (forward, both losses, backward, rescale, clip, step),
steps/s and peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from alignprog.config import load_config
from alignprog.data import Batch, load_dataset
from alignprog.training.loop import Trainer


def make_batch(lengths: tuple[int, ...], frame_shape: tuple[int, ...], seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    b, t = len(lengths), max(lengths)
    feats = torch.rand((b, t, *frame_shape), generator=g)
    mask = torch.zeros(b, t, dtype=torch.bool)
    starts, ends, fgs = [], [], []
    for row, n in enumerate(lengths):
        mask[row, :n] = True
        s, e, f, pos, fg = [], [], [], 0, False
        while pos < n:
            size = int(torch.randint(5, 41, (1,), generator=g))
            s.append(pos)
            e.append(min(n, pos + size) - 1)
            f.append(fg)
            pos += size
            fg = not fg
        starts.append(s), ends.append(e), fgs.append(f)
    k = max(len(s) for s in starts)
    seg_start = torch.zeros(b, k, dtype=torch.long)
    seg_end = torch.full((b, k), -1, dtype=torch.long)
    seg_fg = torch.zeros(b, k, dtype=torch.bool)
    seg_mask = torch.zeros(b, k, dtype=torch.bool)
    for row in range(b):
        n = len(starts[row])
        seg_start[row, :n] = torch.tensor(starts[row])
        seg_end[row, :n] = torch.tensor(ends[row])
        seg_fg[row, :n] = torch.tensor(fgs[row])
        seg_mask[row, :n] = True
    seg_of_frame = torch.zeros(b, t, dtype=torch.long)
    foreground = torch.zeros(b, t, dtype=torch.bool)
    for row in range(b):
        for i in range(len(starts[row])):
            seg_of_frame[row, starts[row][i]:ends[row][i] + 1] = i
            foreground[row, starts[row][i]:ends[row][i] + 1] = fgs[row][i]
    return Batch(feats, mask, torch.tensor(lengths), seg_of_frame, foreground, seg_start,
                 seg_end, seg_fg.long(), seg_fg, seg_mask, (), "bench", tuple(range(b)))


def bench(method: str, encoder: str, device: str, steps: int, warmup: int,
          lengths: tuple[int, ...], precision: str) -> dict:
    layout = "frames" if encoder == "resnet50" else "features"
    frame_shape = (1024, 14, 14) if encoder == "resnet50" else (2048,)
    cfg = load_config(overrides={
        "train.method": method, "train.device": device, "train.precision": precision,
        "model.encoder": encoder, "model.num_heads": 16, "data.layout": layout,
        "data.synthetic.tasks": 2, "data.synthetic.videos_per_task": 2,
        "data.synthetic.frame_channels": 1024, "data.synthetic.frame_size": 14})
    dataset = load_dataset(cfg.data)
    trainer = Trainer(cfg, dataset, torch.device(device))
    batch = make_batch(lengths, frame_shape)
    if device.startswith("cuda"):
        batch = batch.pin_memory()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        record = trainer.step_batch(batch)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    med = statistics.median(times)
    out = {"method": method, "encoder": encoder, "precision": precision,
           "seconds_per_step": med, "steps_per_s": 1 / med,
           "videos_per_s": len(lengths) / med, "skipped": record.get("skipped", False)}
    if device.startswith("cuda"):
        out["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--methods", nargs="+", default=["tcc", "gtcc", "lav", "vava"])
    p.add_argument("--encoders", nargs="+", default=["stacking", "resnet50"])
    p.add_argument("--lengths", type=int, nargs="+", default=[450, 380])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rows = []
    for encoder in args.encoders:
        for method in args.methods:
            row = bench(method, encoder, args.device, args.steps, args.warmup,
                        tuple(args.lengths), args.precision)
            rows.append(row)
            mem = f"{row['peak_memory_mb']:.0f} MB" if "peak_memory_mb" in row else "n/a"
            print(f"{encoder:9s} {method:5s} {row['seconds_per_step'] * 1e3:9.1f} ms/step  "
                  f"{row['steps_per_s']:6.2f} steps/s  peak {mem}", flush=True)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device: {name}, torch {torch.__version__}, lengths {args.lengths}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"device": name, "torch": torch.__version__, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
