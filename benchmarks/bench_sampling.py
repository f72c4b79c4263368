"""Time of the progress-head segment sampler over 1,000 videos' worth of segments.

    PYTHONPATH=. python benchmarks/bench_sampling.py

Annotations of the synthetic generator (250 videos x 4 tasks, about 200 frames each); the
sampler runs on the CPU as in training: once over all 1,000 videos in one call, and as 500
training steps of batch 2. The pipeline description's settings: 10 draws x 5 targets,
stratified.
"""

from __future__ import annotations

import argparse
import time

import torch

from alignprog.config import DataConfig, SyntheticConfig
from alignprog.data import load_dataset
from alignprog.sampling import sample_segments


def segment_tensors(annotations):
    k = max(a.num_segments for a in annotations)
    b = len(annotations)
    start = torch.zeros(b, k, dtype=torch.long)
    end = torch.full((b, k), -1, dtype=torch.long)
    fg = torch.zeros(b, k, dtype=torch.bool)
    mask = torch.zeros(b, k, dtype=torch.bool)
    for i, a in enumerate(annotations):
        n = a.num_segments
        start[i, :n] = torch.tensor(a.starts)
        end[i, :n] = torch.tensor(a.ends)
        fg[i, :n] = torch.from_numpy(a.is_foreground)
        mask[i, :n] = True
    return start, end, fg, mask


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--videos-per-task", type=int, default=250)
    p.add_argument("--stratified", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args()
    ds = load_dataset(DataConfig(synthetic=SyntheticConfig(videos_per_task=args.videos_per_task,
                                                           dim=8)))
    anns = [v.annotation for v in ds.videos]
    g = torch.Generator().manual_seed(0)
    tensors = segment_tensors(anns)
    start = time.perf_counter()
    s = sample_segments(*tensors, stratified=args.stratified, generator=g)
    one_call = time.perf_counter() - start
    pairs = [segment_tensors(anns[i:i + 2]) for i in range(0, len(anns), 2)]
    start = time.perf_counter()
    total = sum(len(sample_segments(*t, stratified=args.stratified, generator=g)) for t in pairs)
    steps = time.perf_counter() - start
    print(f"{len(anns)} videos, {len(s)} samples in one call: {one_call * 1e3:.1f} ms")
    print(f"{len(pairs)} batches of 2 ({total} samples): {steps * 1e3:.1f} ms in all, "
          f"{steps / len(pairs) * 1e3:.3f} ms per training step")


if __name__ == "__main__":
    main()
