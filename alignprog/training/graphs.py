"""The whole training step as CUDA graphs, one per shape bucket.

A step of the pipeline description's configuration launches ~700 small kernels (stacking, TCC
or LAV; ~1700 for VAVA) for ~5 ms of GPU work: launched one by one from Python, the step takes
2-4 times its GPU time. Captured once as a CUDA graph and replayed, the step costs one launch.

What is captured: forward (encoder and heads in the configured precision), alignment loss,
gather of the progress samples, progress head and loss, the balanced backward (or the fixed
lambda's backward and head-gradient rescale), clipping, the fused Adam step (skipped on the
device when a loss or gradient is not finite; under a learning-rate schedule it reads the rates
from device tensors that the trainer refills before each replay) and the skip counters. What
stays on the host, outside the graph: batching, the progress sampler (the same generator and
draws as the eager step) and the copies of the batch into the graph's input buffers.

Shapes are static inside a graph, so each batch is padded: frames up to a multiple of
`train.graph_frame_bucket`, progress samples up to the most a batch can draw
(`samples_per_video` x `frames_per_segment` x videos, then a multiple of 16; padding samples
carry no weight), the gathered segment width up to a power of two of at least 64. Masks keep
the padding out of every value and gradient, so a replay computes what the eager step computes
(tested on a GPU). The key of a graph is then (videos, frames, samples, width): on
variable-length data mostly the frames (the width is 64 for most batches).

How many graphs: a capture costs about as much as 10-20 eager steps, so capturing a shape that
never comes back loses time. `train.cuda_graphs=auto` captures a shape the second time it comes
and holds at most `train.max_graphs` graphs, never evicting one: a shape beyond them runs
eagerly. `on` captures every shape at once and evicts the least recently used graph beyond
`train.max_graphs` (fixed-shape data, benchmarks).

Not captured (the step runs eagerly, also sync-free): GTCC (its GMM fits decide on the host
how many L-BFGS iterations run), cumulative_l2 progress, gradient accumulation (a graph holds
one batch's step), several processes (a step with its all_reduce captured is not built yet:
it needs a multi-GPU machine to test), the head-only stage, the first step (it creates Adam's
state outside any graph), a batch without progress samples.
`train.cuda_graphs=auto` also leaves the resnet50 encoder eager: its step is compute-bound, a
graph would save nothing and hold ~5 GB per bucket. Beside it VAVA's launch-bound loss alone is
captured, forward and backward (`training.loss_graphs`).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from alignprog.data import Batch
from alignprog.sampling import SegmentSamples
from alignprog.training.step import StepMetrics

if TYPE_CHECKING:  # pragma: no cover
    from alignprog.config import Config

GRAPH_METHODS = ("tcc", "lav", "vava")
LAUNCH_BOUND_ENCODERS = ("stacking", "naive")
SAMPLE_BUCKET = 16
MIN_WIDTH = 64          # the narrowest gathered segment width of a graph
CAPTURE_AFTER = 2       # auto: a shape is captured the time it comes this often
METRICS = StepMetrics.TENSORS   # the captured step's device values, in this order


def unsupported(cfg: Config, device: torch.device, *, several_processes: bool,
                mode: str) -> str | None:
    """Why the step cannot (or, in auto mode, should not) be a CUDA graph; None if it can."""
    tc = cfg.train
    if device.type != "cuda":
        return "the device is not CUDA"
    if several_processes:
        return "several processes: the step's all_reduce is not captured in a graph yet"
    if tc.accumulate > 1:
        return "train.accumulate > 1 runs the eager step (a graph holds one batch's step)"
    if tc.method not in GRAPH_METHODS:
        return f"{tc.method}'s GMM fits decide on the host how many iterations run"
    if cfg.progress.enabled and cfg.progress.method != "learnable":
        return "the cumulative_l2 progress loss is not captured"
    if mode == "auto" and cfg.model.encoder not in LAUNCH_BOUND_ENCODERS:
        return f"the {cfg.model.encoder} encoder is compute-bound (no gain from a graph)"
    return None


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 1).bit_length()


def comes_again(seen: dict, key) -> bool:
    """auto's rule: count this coming of `key` in `seen`; True from its CAPTURE_AFTER-th on."""
    seen[key] = seen.get(key, 0) + 1
    return seen[key] >= CAPTURE_AFTER


def failure(exc: BaseException) -> str:
    """A failed capture's error in one line (its type where it has no message)."""
    return (str(exc).splitlines() or [type(exc).__name__])[0]


@dataclass
class GraphInputs:
    """A captured step's static input buffers: the padded batch and progress samples."""

    features: torch.Tensor      # (B, Tb, *F)
    mask: torch.Tensor          # (B, Tb) bool
    video: torch.Tensor         # (Qb,) progress samples, padded
    start: torch.Tensor         # (Qb,)
    length: torch.Tensor        # (Qb,) >= 1
    gt: torch.Tensor            # (Qb,)
    valid: torch.Tensor         # (Qb,) bool: a real sample
    width: int                  # gathered segment width
    step: torch.Tensor          # () long: VAVA's phi counter (Trainer.phi_counter)


@dataclass
class Graph:
    """One captured step: its inputs and its metrics out (len(METRICS),) float32."""

    inputs: GraphInputs
    metrics: torch.Tensor
    graph: torch.cuda.CUDAGraph | None = None


class StepGraphs:
    """CUDA graphs of a training step, one per shape bucket. It knows the model and optimizer
    (to warm up and zero the gradients around a capture) and two callables on `GraphInputs`:
    `backward` (forward and backward, for the warm-up) and `step` (the whole step, captured: its
    device values by METRICS name). `replay(batch, samples, step)` captures if needed, replays
    and returns the values, or None where the caller must run the step eagerly."""

    @classmethod
    def create(cls, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
               backward: Callable[[GraphInputs], None],
               step: Callable[[GraphInputs], dict[str, torch.Tensor]], cfg: Config,
               device: torch.device, *, several_processes: bool = False
               ) -> StepGraphs | None:
        mode = cfg.train.cuda_graphs
        if mode == "off":
            return None
        reason = unsupported(cfg, device, several_processes=several_processes, mode=mode)
        if reason is not None:
            if mode == "on":
                warnings.warn(f"train.cuda_graphs=on, but {reason}: the step runs eagerly",
                              stacklevel=2)
            return None
        return cls(model, optimizer, backward, step, device,
                   frame_bucket=cfg.train.graph_frame_bucket, max_graphs=cfg.train.max_graphs,
                   targets_per_video=(cfg.progress.learnable.samples_per_video
                                      * cfg.progress.learnable.frames_per_segment),
                   bounded=mode == "auto")

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 backward: Callable[[GraphInputs], None],
                 step: Callable[[GraphInputs], dict[str, torch.Tensor]], device: torch.device,
                 *, frame_bucket: int, max_graphs: int, targets_per_video: int = 0,
                 bounded: bool = False) -> None:
        self.model, self.optimizer, self.backward, self.step_fn = model, optimizer, backward, step
        self.device = device
        self.frame_bucket, self.max_graphs = frame_bucket, max_graphs
        # the most progress samples a video can give a step: its draws x targets per draw
        self.targets_per_video = targets_per_video
        # auto: capture a shape on its CAPTURE_AFTER-th time, never evict (module docstring)
        self.bounded = bounded
        self.seen: dict[tuple, int] = {}
        self.graphs: OrderedDict[tuple, Graph] = OrderedDict()
        self.step_count = torch.zeros((), dtype=torch.long, device=device)
        self.failed: str | None = None
        self.replays = 0
        self.captures = 0   # graphs captured so far, evicted ones included

    def replay(self, host: Batch, samples: SegmentSamples | None, step: int,
               uploaded: Batch | None = None) -> dict[str, torch.Tensor] | None:
        """The step on this batch (and progress samples) as a replay: its device values by
        METRICS name (clones), or None where the caller runs this step eagerly (auto: a shape
        not captured; after a failed capture: every later step too). `uploaded`: the batch's
        device copy if one was made ahead (`training.uploads`), which the buffers copy from."""
        if self.failed is not None:
            return None
        key = self.key(host, samples)
        graph = self.graphs.get(key)
        if graph is None:
            if self.bounded and (not comes_again(self.seen, key)
                                 or len(self.graphs) >= self.max_graphs):
                return None
            while len(self.graphs) >= self.max_graphs:
                self.graphs.popitem(last=False)
            try:
                graph = self.capture(key, host, samples, step, uploaded)
            except RuntimeError as exc:   # e.g. an op that syncs: run eagerly from now on
                self.failed = failure(exc)
                warnings.warn(f"CUDA graph capture failed ({self.failed}); the training step "
                              "runs eagerly", stacklevel=2)
                self.optimizer.zero_grad(set_to_none=True)
                return None
            self.graphs[key] = graph          # captured with this batch in its buffers
        else:
            self.fill(graph.inputs, host, samples, step, uploaded)
        self.graphs.move_to_end(key)
        graph.graph.replay()
        self.replays += 1
        return dict(zip(METRICS, graph.metrics.clone()))

    def key(self, host: Batch, samples: SegmentSamples | None) -> tuple[int, int, int, int]:
        """(videos, padded frames, padded samples, gathered width) of a batch's graph."""
        n = len(samples) if samples is not None else 0
        frames = round_up(host.features.shape[1], self.frame_bucket)
        width = next_power_of_two(int(samples.segment_length.max())) if n else 1
        most = max(n, 1, self.targets_per_video * host.size)
        return (host.size, frames, round_up(most, SAMPLE_BUCKET),
                min(max(width, MIN_WIDTH), frames))

    def fill(self, inputs: GraphInputs, host: Batch, samples: SegmentSamples | None,
             step: int, uploaded: Batch | None = None) -> None:
        """Copy the batch (from its device copy `uploaded` if there is one) and the samples
        into the graph's buffers, asynchronously."""
        b, t = host.mask.shape
        if uploaded is not None:
            inputs.features[:, :t].copy_(uploaded.features)
            inputs.mask[:, t:] = False
            inputs.mask[:, :t].copy_(uploaded.mask)
        else:
            inputs.features[:, :t].copy_(_pinned(host.features), non_blocking=True)
            mask = torch.zeros(inputs.mask.shape, dtype=torch.bool)
            mask[:, :t] = host.mask
            inputs.mask.copy_(_pinned(mask), non_blocking=True)
        if samples is not None:
            q = len(samples)
            cols = torch.zeros((5, inputs.video.shape[0]), dtype=torch.float64)
            cols[2] = 1.0   # padding samples: frame 0 of video 0, length 1, gt 1, invalid
            cols[3] = 1.0
            cols[0, :q] = samples.video.double()
            cols[1, :q] = samples.start.double()
            cols[2, :q] = samples.segment_length.double()
            cols[3, :q] = samples.gt.double()
            cols[4, :q] = 1.0
            dev = _pinned(cols).to(self.device, non_blocking=True)
            inputs.video.copy_(dev[0])
            inputs.start.copy_(dev[1])
            inputs.length.copy_(dev[2])
            inputs.gt.copy_(dev[3])
            inputs.valid.copy_(dev[4] > 0)
        inputs.step.fill_(step)

    def capture(self, key: tuple, host: Batch, samples: SegmentSamples | None,
                step: int, uploaded: Batch | None = None) -> Graph:
        b, frames, q, width = key
        dev = self.device
        self.captures += 1
        zeros = lambda dtype: torch.zeros(q, dtype=dtype, device=dev)  # noqa: E731
        inputs = GraphInputs(
            features=torch.zeros((b, frames, *host.features.shape[2:]),
                                 dtype=host.features.dtype, device=dev),
            mask=torch.zeros((b, frames), dtype=torch.bool, device=dev),
            video=zeros(torch.long), start=zeros(torch.long), length=zeros(torch.long) + 1,
            gt=zeros(torch.float32) + 1, valid=zeros(torch.bool), width=width,
            step=self.step_count)
        graph = Graph(inputs=inputs, metrics=torch.zeros(len(METRICS), device=dev))
        self.fill(inputs, host, samples, step, uploaded)
        self.model.train()
        # Warm-up on a side stream (the lazy set-up of cuDNN, cuBLAS and autograd must not
        # happen during capture): forward and backward only, so the parameters do not move.
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                self.optimizer.zero_grad(set_to_none=True)
                self.backward(inputs)
        torch.cuda.current_stream(dev).wait_stream(side)
        self.optimizer.zero_grad(set_to_none=True)
        graph.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph.graph):
            values = self.step_fn(inputs)
            # detached: an in-place copy of graph tensors would keep the autograd graph alive
            graph.metrics.copy_(torch.stack([values[k].detach().float().reshape(())
                                             for k in METRICS]))
        return graph


def _pinned(tensor: torch.Tensor) -> torch.Tensor:
    """A page-locked copy for an asynchronous upload (the tensor itself if already pinned);
    the host allocator does not hand the copy's memory out again before the upload ran."""
    return tensor if tensor.is_pinned() else tensor.pin_memory()
