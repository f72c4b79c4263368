"""The whole training step as CUDA graphs, one per shape bucket (issue 9).

A step of the document's configuration launches ~700 small kernels (stacking, TCC or LAV; ~1700
for VAVA) for ~5 ms of GPU work: launched one by one from Python, the step takes 2-4 times its GPU
time. Captured once as a CUDA graph and replayed, the step costs one launch.

What is captured: forward (encoder and heads in the configured precision), alignment loss,
gather of the progress samples, progress head and loss, backward, the head-gradient rescale,
clipping, the fused Adam step (skipped on the device when a loss or gradient is not finite) and
the skip counters. What stays on the host, outside the graph: batching, the progress sampler
(the same generator and draws as the eager step) and the copies of the batch into the graph's
input buffers.

Shapes are static inside a graph, so each batch is padded: frames up to a multiple of
`train.graph_frame_bucket`, progress samples up to a multiple of 16 (padding samples carry no
weight), the gathered segment width up to a power of two. Masks keep the padding out of every
value and gradient, so a replay computes what the eager step computes (tested on a GPU). At most
`train.max_graphs` graphs are kept (least recently used out).

Not captured (the step runs eagerly, also sync-free): GTCC (its GMM fits decide on the host
how many L-BFGS iterations run), cumulative_l2 progress, several processes (the ranks agree on
the host), the head-only stage, the first step (it creates Adam's state outside any graph), a
batch without progress samples. `train.cuda_graphs=auto` also leaves the resnet50 encoder eager:
its step is compute-bound, a graph would save nothing and hold ~5 GB per bucket.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from alignprog.data import Batch
from alignprog.losses.progress import progress_loss
from alignprog.runtime import autocast, trusted_inputs
from alignprog.sampling import SegmentSamples, gather_frames, sample_segments

if TYPE_CHECKING:  # pragma: no cover
    from alignprog.training.loop import Trainer

GRAPH_METHODS = ("tcc", "lav", "vava")
LAUNCH_BOUND_ENCODERS = ("stacking", "naive")
SAMPLE_BUCKET = 16
METRICS = ("alignment", "progress", "total", "bad", "grad_encoder", "grad_head",
           "grad_encoder_clipped", "grad_head_clipped")


def unsupported(trainer: Trainer, mode: str) -> str | None:
    """Why the step cannot (or, in auto mode, should not) be a CUDA graph; None if it can."""
    cfg, tc = trainer.cfg, trainer.cfg.train
    if trainer.device.type != "cuda":
        return "the device is not CUDA"
    if trainer.dist.active:
        return "several processes agree on each step on the host"
    if tc.method not in GRAPH_METHODS:
        return f"{tc.method}'s GMM fits decide on the host how many iterations run"
    if cfg.progress.enabled and not trainer.learnable:
        return "the cumulative_l2 progress loss is not captured"
    if mode == "auto" and cfg.model.encoder not in LAUNCH_BOUND_ENCODERS:
        return f"the {cfg.model.encoder} encoder is compute-bound (no gain from a graph)"
    return None


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 1).bit_length()


@dataclass
class Graph:
    """One captured step and its static buffers (inputs, metrics out)."""

    features: torch.Tensor      # (B, Tb, *F)
    mask: torch.Tensor          # (B, Tb) bool
    video: torch.Tensor         # (Qb,) progress samples, padded
    start: torch.Tensor         # (Qb,)
    length: torch.Tensor        # (Qb,) >= 1
    gt: torch.Tensor            # (Qb,)
    valid: torch.Tensor         # (Qb,) bool: a real sample
    width: int                  # gathered segment width
    metrics: torch.Tensor       # (len(METRICS),) float32
    graph: torch.cuda.CUDAGraph | None = None


class StepGraphs:
    """The CUDA graphs of a trainer's step; `step(batch)` replays (capturing first if needed)
    and returns the step's record, or None where the trainer must run the step eagerly."""

    @classmethod
    def create(cls, trainer: Trainer) -> StepGraphs | None:
        mode = trainer.cfg.train.cuda_graphs
        if mode == "off":
            return None
        reason = unsupported(trainer, mode)
        if reason is not None:
            if mode == "on":
                warnings.warn(f"train.cuda_graphs=on, but {reason}: the step runs eagerly",
                              stacklevel=2)
            return None
        return cls(trainer)

    def __init__(self, trainer: Trainer) -> None:
        self.trainer = trainer
        self.graphs: OrderedDict[tuple, Graph] = OrderedDict()
        self.step_count = torch.zeros((), dtype=torch.long, device=trainer.device)
        self.failed: str | None = None
        self.replays = 0

    def step(self, host: Batch) -> dict | None:
        tr = self.trainer
        if tr.step == 0 or self.failed is not None or host.size < 2:
            return None
        gen = tr.generators["sampling"]
        state = gen.get_state()
        samples, n = None, 0
        if tr.learnable:
            lc = tr.cfg.progress.learnable
            samples = sample_segments(host.seg_start, host.seg_end, host.seg_foreground,
                                      host.seg_mask, samples_per_video=lc.samples_per_video,
                                      frames_per_segment=lc.frames_per_segment,
                                      min_segment_len=lc.min_segment_len,
                                      stratified=lc.stratified_sampling, generator=gen)
            n = len(samples)
            if n == 0:   # no progress term this step: the eager step draws again
                gen.set_state(state)
                return None
        tc = tr.cfg.train
        frames = round_up(host.features.shape[1], tc.graph_frame_bucket)
        width = next_power_of_two(int(samples.segment_length.max())) if n else 1
        key = (host.size, frames, round_up(max(n, 1), SAMPLE_BUCKET), min(width, frames))
        graph = self.graphs.get(key)
        if graph is None:
            while len(self.graphs) >= tc.max_graphs:
                self.graphs.popitem(last=False)
            try:
                graph = self.capture(key, host, samples)
            except RuntimeError as exc:   # e.g. an op that syncs: run eagerly from now on
                self.failed = str(exc).splitlines()[0]
                warnings.warn(f"CUDA graph capture failed ({self.failed}); the training step "
                              "runs eagerly", stacklevel=2)
                tr.optimizer.zero_grad(set_to_none=True)
                gen.set_state(state)
                return None
            self.graphs[key] = graph          # captured with this batch in its buffers
        else:
            self.fill(graph, host, samples)
        self.graphs.move_to_end(key)
        graph.graph.replay()
        self.replays += 1
        m = graph.metrics.clone()
        out = dict(zip(METRICS, m))
        return {"step": tr.step + 1, "epoch": tr.epoch, "alignment": out["alignment"],
                "progress": out["progress"] if tr.learnable else None,
                "total": out["total"], "bad": out["bad"] > 0, "lambda": tr.lam,
                "samples": n, "videos": host.size, "frames": int(host.lengths.sum()),
                **{k: out[k] for k in METRICS[4:]}}

    def fill(self, graph: Graph, host: Batch, samples: SegmentSamples | None) -> None:
        """Copy the batch (and the samples) into the graph's buffers, asynchronously."""
        tr = self.trainer
        b, t = host.mask.shape
        graph.features[:, :t].copy_(_pinned(host.features), non_blocking=True)
        mask = torch.zeros(graph.mask.shape, dtype=torch.bool)
        mask[:, :t] = host.mask
        graph.mask.copy_(_pinned(mask), non_blocking=True)
        if samples is not None:
            q = len(samples)
            cols = torch.zeros((5, graph.video.shape[0]), dtype=torch.float64)
            cols[2] = 1.0   # padding samples: frame 0 of video 0, length 1, gt 1, invalid
            cols[3] = 1.0
            cols[0, :q] = samples.video.double()
            cols[1, :q] = samples.start.double()
            cols[2, :q] = samples.segment_length.double()
            cols[3, :q] = samples.gt.double()
            cols[4, :q] = 1.0
            dev = _pinned(cols).to(tr.device, non_blocking=True)
            graph.video.copy_(dev[0])
            graph.start.copy_(dev[1])
            graph.length.copy_(dev[2])
            graph.gt.copy_(dev[3])
            graph.valid.copy_(dev[4] > 0)
        self.step_count.fill_(tr.step)

    def capture(self, key: tuple, host: Batch, samples: SegmentSamples | None) -> Graph:
        tr = self.trainer
        b, frames, q, width = key
        dev = tr.device
        zeros = lambda dtype: torch.zeros(q, dtype=dtype, device=dev)  # noqa: E731
        graph = Graph(
            features=torch.zeros((b, frames, *host.features.shape[2:]),
                                 dtype=host.features.dtype, device=dev),
            mask=torch.zeros((b, frames), dtype=torch.bool, device=dev),
            video=zeros(torch.long), start=zeros(torch.long), length=zeros(torch.long) + 1,
            gt=zeros(torch.float32) + 1, valid=zeros(torch.bool), width=width,
            metrics=torch.zeros(len(METRICS), device=dev))
        self.fill(graph, host, samples)
        tr.model.train()
        # Warm-up on a side stream (the lazy set-up of cuDNN, cuBLAS and autograd must not
        # happen during capture): forward and backward only, so the parameters do not move.
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            for _ in range(2):
                tr.optimizer.zero_grad(set_to_none=True)
                self.losses(graph)[0].backward()
        torch.cuda.current_stream(dev).wait_stream(side)
        tr.optimizer.zero_grad(set_to_none=True)
        graph.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph.graph):
            self.body(graph)
        return graph

    def losses(self, graph: Graph) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(total, alignment, progress) of the graph's buffers."""
        tr = self.trainer
        lc = tr.cfg.progress.learnable
        with trusted_inputs():
            with autocast(tr.device, tr.cfg.train.precision):
                out = tr.model(graph.features, graph.mask)
            emb = out.embeddings.float()
            drop = None if out.drop_logits is None else out.drop_logits.float()
            alignment = tr.alignment_loss(emb, drop, graph.mask, step=self.step_count)
            progress = None
            if tr.learnable:
                seg = gather_frames(emb, graph.video, graph.start, graph.length, graph.width)
                with autocast(tr.device, tr.cfg.train.precision):
                    pred = tr.model.progress_head(seg, graph.length).float()   # (Qb,)
                progress = progress_loss(pred, graph.gt, weighted=lc.weighted_loss,
                                         weight_cap=lc.weight_cap, kind=lc.loss,
                                         valid=graph.valid)
        total = alignment if progress is None else alignment + tr.lam * progress
        return total, alignment, progress

    def body(self, graph: Graph) -> None:
        """The captured step: losses, backward, rescale, clip, Adam, counters, metrics."""
        tr = self.trainer
        total, alignment, progress = self.losses(graph)
        total.backward()
        tr.rescale_head(False)
        record: dict = {}
        tr.clip(record)
        bad = ~(torch.isfinite(total) & torch.isfinite(record["grad_encoder"])
                & torch.isfinite(record["grad_head"]))
        tr.optimizer.found_inf = bad.float()
        try:
            tr.optimizer.step()
        finally:
            del tr.optimizer.found_inf
        tr.count_bad(bad)
        zero = torch.zeros((), device=tr.device)
        values = {"alignment": alignment, "progress": zero if progress is None else progress,
                  "total": total, "bad": bad} | {k: record[k] for k in METRICS[4:]}
        # detached: an in-place copy of graph tensors would keep this step's autograd graph alive
        graph.metrics.copy_(torch.stack([values[k].detach().float().reshape(()) for k in METRICS]))


def _pinned(tensor: torch.Tensor) -> torch.Tensor:
    """A page-locked copy for an asynchronous upload (the tensor itself if already pinned);
    the host allocator does not hand the copy's memory out again before the upload ran."""
    return tensor if tensor.is_pinned() else tensor.pin_memory()
