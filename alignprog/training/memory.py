"""What fits: the memory of the largest training step, estimated before a run starts.

Every alignment loss compares the videos of a batch pair by pair on padded (P, T, T) matrices
(P ordered pairs, T the batch's longest video), so a step's memory grows with the square of the
longest video: two 20,000-frame videos need about 3 GiB per stored LAV matrix, and the loss
keeps several of them for the backward pass. `memory_problem` adds up an estimate for the largest
batch the training split can form and refuses the run, before anything is created, when it
exceeds the memory the device has free, instead of failing with an allocation error mid-way.

The estimate is  bytes = per_frame * B * T + per_element[method] * P * (T + 1)^2 + inputs.
The coefficients were fitted to the measured peak of one eager step (`benchmarks/memory_fit.py`,
on an NVIDIA H200 and its CPU, torch 2.11, the default model) and rounded up; the per-frame term
scales with the encoder's widths. It is a planning figure, good to tens of percent, not a bound:
CUDA graphs keep a memory pool per shape bucket on top of it (`train.cuda_graphs=off` frees
them).
"""

from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, Sequence

import torch

if TYPE_CHECKING:  # pragma: no cover
    from alignprog.config import Config
    from alignprog.data import Dataset

# Fitted to the measured peaks (benchmarks/memory_h200.json, benchmarks/memory_cpu.json: B = 2
# and 4, T = 256 .. 4096) and rounded up; the per-element terms are at least what the stored
# matrices take (the cost and the soft-DTW table in fp32). Per device kind, per method:
# bytes per frame of the default model (stacking, 16 heads, GRU head) ...
PER_FRAME = {"cuda": {"tcc": 130e3, "gtcc": 170e3, "lav": 290e3, "vava": 390e3},
             "cpu": {"tcc": 135e3, "gtcc": 210e3, "lav": 220e3, "vava": 225e3}}
# ... and bytes per element of the (P, T+1, T+1) pair matrices.
PER_ELEMENT = {"cuda": {"tcc": 52.0, "gtcc": 4.0, "lav": 16.0, "vava": 235.0},
               "cpu": {"tcc": 125.0, "gtcc": 4.0, "lav": 16.0, "vava": 270.0}}

# Share of the free memory a run may plan to use: the rest is left to the allocator's
# fragmentation, the evaluation and what the estimate misses.
USABLE_SHARE = 0.9


def pair_count(cfg: Config, batch: int) -> int:
    """Pairs a loss compares in a batch of `batch` videos: B(B-1) ordered pairs, B^2 for the
    reference TCC, which also pairs each video with itself."""
    if cfg.train.method == "tcc" and cfg.loss.compat == "reference":
        return batch * batch
    return batch * (batch - 1)


def _encoder_width(cfg: Config, num_tasks: int = 16) -> int:
    m = cfg.model
    heads = m.num_heads or num_tasks
    if m.encoder == "naive":
        base = sum(m.naive_layers)
    elif m.encoder == "resnet50":
        base = 2048 * 4
    else:
        base = m.conv_channels * m.stacking_layers
    fusion = heads * (sum(m.head_layers) + m.output_dim) + sum(m.attn_layers) if m.mcn else 0
    pc = cfg.progress
    if (pc.enabled and pc.method == "learnable"
            and pc.learnable.input_for(cfg.train.method) == "separate"):
        base *= 2                              # the head's own base encoder runs beside it
    return base + fusion + m.output_dim


@functools.cache
def _default_width() -> int:
    """The default model's activation width per frame (16 heads, the head on the embeddings:
    what PER_FRAME was measured with), the unit of PER_FRAME."""
    from alignprog.config import Config
    return _encoder_width(Config.model_validate(
        {"model": {"num_heads": 16}, "progress": {"learnable": {"input": "embeddings"}}}))


def estimate_step_bytes(cfg: Config, lengths: Sequence[int],
                        input_shape: Sequence[int] = (2048,), device_type: str = "cuda") -> int:
    """Estimated peak bytes of one training step on a batch of videos of these lengths (on top
    of the weights and the optimizer state) on a device of this kind ("cuda" or "cpu")."""
    b, t = len(lengths), max(lengths)
    kind = "cuda" if device_type == "cuda" else "cpu"
    method = cfg.train.method
    scale = 0.5 if cfg.train.precision == "bf16" else 1.0    # bf16 activations of the encoder
    per_frame = PER_FRAME[kind][method] * _encoder_width(cfg) / _default_width() * scale
    # the inputs of the step's batch and of the next step's `train.accumulate` batches, copied
    # ahead on a GPU (training/uploads.py); on a CPU the collated batch and the step's copies
    inputs = (1 + cfg.train.accumulate) * b * t * math.prod(input_shape) * 4
    matrices = PER_ELEMENT[kind][method] * pair_count(cfg, b) * (t + 1) ** 2
    return int(per_frame * b * t + matrices + inputs)


def largest_batch(dataset: Dataset, cfg: Config, device_type: str = "cuda"
                  ) -> tuple[str, list[int], int]:
    """The task, lengths and estimated bytes of the training split's most expensive batch: the
    `batch_size` longest videos of one task (a batch holds one task), the costliest task's."""
    shape = _frame_shape(dataset, cfg)
    best: tuple[int, str, list[int]] | None = None
    for task in dataset.tasks:
        lengths = sorted((dataset.videos[i].num_frames
                          for i in dataset.indices("train", tasks=[task])), reverse=True)
        lengths = lengths[:cfg.data.batch_size]
        if len(lengths) < 2:        # a one-video batch has no pair: no alignment loss
            continue
        cost = estimate_step_bytes(cfg, lengths, shape, device_type)
        if best is None or cost > best[0]:
            best = (cost, task, lengths)
    return (best[1], best[2], best[0]) if best else ("", [], 0)


def _frame_shape(dataset: Dataset, cfg: Config) -> tuple[int, ...]:
    return tuple(dataset.videos[0].arrays[cfg.data.layout].shape[1:])


def free_bytes(device: torch.device) -> int | None:
    """Memory free for this process on the device: CUDA's free memory, on the CPU the kernel's
    MemAvailable (None where neither can be read)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def memory_problem(dataset: Dataset, cfg: Config, device: torch.device,
                   available: int | None = None) -> str | None:
    """Why the largest training step will not fit on the device, with the ways out; None when
    it fits (or the free memory cannot be read). `available`: free bytes (default: asked)."""
    task, lengths, need = largest_batch(dataset, cfg, device.type)
    if not lengths:
        return None
    available = free_bytes(device) if available is None else available
    if available is None:
        return None
    budget = USABLE_SHARE * available
    if need <= budget:
        return None
    b, t = len(lengths), max(lengths)
    fits = longest_that_fits(cfg, b, budget, _frame_shape(dataset, cfg), device.type)
    name = str(device)
    return (f"the largest training batch (task {task}: {b} videos of up to {t} frames) needs "
            f"about {gib(need)} for one {cfg.train.method.upper()} step on {name}, which has "
            f"{gib(available)} free; its pair matrices grow with the square of the longest "
            f"video, and about {fits} frames fit in a batch of {b}. Lower data.batch_size, "
            f"shorten or subsample the longest videos, or skip this check with "
            f"--set train.memory_check=false")


def longest_that_fits(cfg: Config, batch: int, budget: float, frame_shape: Sequence[int],
                      device_type: str = "cuda") -> int:
    """The longest T with `batch` videos of T frames within `budget` bytes (0 if none)."""
    lo, hi = 0, 1 << 24
    while lo < hi:                      # the estimate grows with T: bisect the largest T
        mid = (lo + hi + 1) // 2
        if estimate_step_bytes(cfg, [mid] * batch, frame_shape, device_type) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo
