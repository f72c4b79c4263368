"""Scaling of the training step over several GPUs under torchrun.

    PYTHONPATH=. torchrun --nproc-per-node 1 benchmarks/bench_ddp.py --json ddp-1.json
    PYTHONPATH=. torchrun --nproc-per-node 2 benchmarks/bench_ddp.py --json ddp-2.json

The pipeline description's configuration, as in train_step.py (16 MCN heads, D = 128,
`stacking` on (T, 2048) features, a batch of 2 videos of 450 and 380 frames, the GRU progress
head with 10 x 5 samples per video, Adam), one batch per rank per step through the real
`Trainer` (gradients averaged over the ranks every step). Reports videos/s over all ranks (wall
time of the timed steps); the scaling efficiency is videos/s on N GPUs over N times videos/s on one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from train_step import make_batch

from alignprog.training import distributed
from alignprog.config import load_config
from alignprog.data import load_dataset
from alignprog.training.trainer import Trainer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--method", default="lav", choices=["tcc", "gtcc", "lav", "vava"])
    p.add_argument("--lengths", type=int, nargs="+", default=[450, 380])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    with distributed.process_group(args.device) as dist:
        cfg = load_config(overrides={
            "train.method": args.method, "train.device": args.device,
            "model.encoder": "stacking", "model.num_heads": 16,
            "data.synthetic.tasks": 2, "data.synthetic.videos_per_task": 2,
            "data.synthetic.dim": 2048})
        trainer = Trainer(cfg, load_dataset(cfg.data), dist.device, dist)
        trainer.sync()
        batch = make_batch(tuple(args.lengths), (2048,), seed=dist.rank)  # a batch per rank
        cuda = dist.device.type == "cuda"
        if cuda:
            batch = batch.pin_memory()
        times = []
        for i in range(args.warmup + args.steps):
            if i == args.warmup:
                dist.barrier()
                if cuda:
                    torch.cuda.synchronize()
                began = time.perf_counter()
            start = time.perf_counter()
            trainer.step_batch(batch)
            if cuda:
                torch.cuda.synchronize()
            if i >= args.warmup:
                times.append(time.perf_counter() - start)
        wall = time.perf_counter() - began
        if not dist.is_main:
            return
        videos = dist.world_size * len(args.lengths) * args.steps
        out = {"ranks": dist.world_size, "method": args.method, "lengths": args.lengths,
               "steps": args.steps, "videos_per_s": videos / wall,
               "median_seconds_per_step": statistics.median(times),
               "device": torch.cuda.get_device_name() if cuda else "cpu",
               "torch": torch.__version__}
        print(json.dumps(out), flush=True)
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(out, fh, indent=2)


if __name__ == "__main__":
    main()
