"""FLOP counts of the encoders and the card's matmul rate: the compute floor of a training step.

Used by `python -m benchmarks.train_step --flops` and tests/test_flops.py; the package itself
never needs it, so it lives beside the benchmarks.

A FLOP here is one multiply or one add of a matrix product or convolution (a multiply-add counts
2), the convention of `torch.utils.flop_counter.FlopCounterMode`; elementwise work (bias, ReLU,
max-pool, softmax) is left out: it is memory-bound and small next to the products. The counts
follow what each module's forward runs, so FlopCounterMode on the real module gives the same
number (tests/test_flops.py):

* resnet50 counts its 2-D reformulation (encoders.ResNet50Encoder): conv1 with the three temporal
  taps once per frame, conv2 as one (k*c2, k*c1, 3, 3) convolution per stack. For k = 2 that is
  every product the math needs and none it does not (the documented Conv3d over zero-padded depth
  runs 27 taps where 18 touch data: `conv3d_flops` gives that count, for comparison). The forward
  also runs conv1 on k-1 zero frames per video and per chunk (frames "before 0"), 0.1-0.3 % more
  on real batches, left out here. Its spatial size is not a module property: `spatial` defaults
  to the 14 x 14 layer3 maps of docs/algorithms.md#resnet50.
* stacking runs over the padded batch, naive and the MCN heads over the real frames; pass the
  frame count the forward runs on (B * T_max for stacking if the batch is padded).

The progress head is left out of `model_flops`: it runs on sampled segments, not frames.

Training: ``training=True`` adds backward, 2x forward for every product (input and weight
gradients) except the input gradient of each encoder's first layer, whose input (precomputed
features) needs none: forward x 3 minus the first layer's forward.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from alignprog.models.encoders import NaiveEncoder, ResNet50Encoder, StackingEncoder
from alignprog.models.mcn import GroupedMLP, MultiHeadEncoder, SingleHeadEncoder


def _linear_flops(mlp: nn.Module, frames: int) -> int:
    """2 * in * out per frame for every nn.Linear inside `mlp`."""
    return sum(2 * frames * m.in_features * m.out_features
               for m in mlp.modules() if isinstance(m, nn.Linear))


def _first_layer_flops(encoder: nn.Module, frames: int, spatial: tuple[int, int]) -> int:
    """Forward FLOPs of the encoder's first product, whose input gradient backward skips."""
    if isinstance(encoder, ResNet50Encoder):
        return _resnet_parts(encoder, frames, spatial)[0]
    if isinstance(encoder, StackingEncoder):
        ci, co, k = encoder.schedule[0]
        return 2 * frames * ci * co * k
    if isinstance(encoder, NaiveEncoder):
        first = encoder.mlp[0]
        return 2 * frames * first.in_features * first.out_features
    raise TypeError(f"no FLOP count for {type(encoder).__name__}")


def _resnet_parts(encoder: ResNet50Encoder, frames: int, spatial: tuple[int, int]
                  ) -> tuple[int, int, int]:
    """(conv1, conv2, mlp) forward FLOPs of the 2-D reformulation."""
    hw = spatial[0] * spatial[1]
    k = encoder.temporal_depth
    c_in = encoder.in_channels
    c1, c2 = encoder.conv[0].out_channels, encoder.conv[2].out_channels
    lo, hi = encoder.conv1_taps()
    conv1 = 2 * frames * hw * (hi - lo + 1) * c1 * c_in * 9   # every frame x its 3x3 taps once
    conv2 = 2 * frames * hw * (k * c2) * (k * c1) * 9          # one Conv2d per stack
    return conv1, conv2, _linear_flops(encoder.mlp, frames)


def conv3d_flops(encoder: ResNet50Encoder, frames: int, spatial: tuple[int, int] = (14, 14)
                 ) -> int:
    """Forward FLOPs of the documented formulation: the two Conv3d over (C, k, H, W) stacks with
    zero-padded depth (27 taps per output), plus the MLP. For comparison only."""
    hw = spatial[0] * spatial[1]
    k = encoder.temporal_depth
    c1, c2 = encoder.conv[0].out_channels, encoder.conv[2].out_channels
    conv = 2 * frames * hw * k * 27 * (c1 * encoder.in_channels + c2 * c1)
    return conv + _linear_flops(encoder.mlp, frames)


def encoder_flops(encoder: nn.Module, frames: int, *, spatial: tuple[int, int] = (14, 14),
                  training: bool = False) -> int:
    """FLOPs of a base encoder's forward (or forward + backward) over `frames` frames."""
    if isinstance(encoder, ResNet50Encoder):
        fwd = sum(_resnet_parts(encoder, frames, spatial))
    elif isinstance(encoder, StackingEncoder):
        fwd = sum(2 * frames * ci * co * k for ci, co, k in encoder.schedule)
    elif isinstance(encoder, NaiveEncoder):
        fwd = _linear_flops(encoder.mlp, frames)
    else:
        raise TypeError(f"no FLOP count for {type(encoder).__name__}")
    if not training:
        return fwd
    return 3 * fwd - _first_layer_flops(encoder, frames, spatial)


def _grouped_flops(heads: GroupedMLP, frames: int) -> int:
    return sum(2 * frames * w.numel() for w in heads.weights)  # (H, in, out) per layer


def model_flops(model: nn.Module, frames: int, *, spatial: tuple[int, int] = (14, 14),
                training: bool = False) -> int:
    """FLOPs of an AlignmentModel's (or its encoder's) forward over `frames` real frames: the base
    encoder, the MCN heads and attention network, the drop branch, and the progress head's own
    base encoder where it has one (progress.learnable.input=separate). Not the progress head."""
    own = getattr(model, "progress_base", None)
    if own is not None:
        return (model_flops(model.encoder, frames, spatial=spatial, training=training)
                + encoder_flops(own, frames, spatial=spatial, training=training))
    encoder = getattr(model, "encoder", model)
    if isinstance(encoder, MultiHeadEncoder):
        base = encoder.base
        rest = (_grouped_flops(encoder.heads, frames) + _linear_flops(encoder.attention, frames))
    elif isinstance(encoder, SingleHeadEncoder):
        base, rest = encoder.base, 0
    else:
        return encoder_flops(encoder, frames, spatial=spatial, training=training)
    if encoder.drop is not None:
        rest += _linear_flops(encoder.drop, frames)
    base_flops = encoder_flops(base, frames, spatial=spatial, training=training)
    return base_flops + (3 * rest if training else rest)


def measure_matmul_tflops(device: torch.device | str, dtype: torch.dtype = torch.bfloat16, *,
                          tf32: bool | None = None, size: int | None = None,
                          iters: int | None = None) -> float:
    """The measured rate of large square matmuls on `device` in `dtype`, in TFLOP/s.

    On CUDA: 8192^3 products timed with CUDA events (after warm-up). float32 runs in TF32 if
    `torch.backends.cuda.matmul.allow_tf32` is on, or, with `tf32` given, as it says for the
    call (restored after). The resnet50 encoder's fp32 convolutions follow
    `torch.backends.cudnn.allow_tf32` instead (on by default): for its floor in fp32 pass
    ``tf32=torch.backends.cudnn.allow_tf32``. On the CPU: small and quick (512^3), for tests
    and rough figures.
    """
    device = torch.device(device)
    if tf32 is not None and device.type == "cuda":
        before = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        try:
            return measure_matmul_tflops(device, dtype, size=size, iters=iters)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = before
    cuda = device.type == "cuda"
    n = size or (8192 if cuda else 512)
    reps = iters or (20 if cuda else 5)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn((n, n), device=device, generator=gen).to(dtype)
    b = torch.randn((n, n), device=device, generator=gen).to(dtype)
    for _ in range(3):  # warm-up: kernel choice, clocks
        torch.mm(a, b)
    if cuda:
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            torch.mm(a, b)
        stop.record()
        stop.synchronize()
        seconds = start.elapsed_time(stop) / 1e3
    else:
        t0 = time.perf_counter()
        for _ in range(reps):
            torch.mm(a, b)
        seconds = time.perf_counter() - t0
    return 2 * n ** 3 * reps / seconds / 1e12
