"""The alignment loss alone as CUDA graphs, for a step that stays eager.

With the resnet50 encoder the step is compute-bound, and `train.cuda_graphs=auto` leaves it
eager: a whole-step graph would run the encoder on every padded position and hold its
activations per bucket (`training.graphs`). VAVA's loss beside it is still launch-bound: ~1700
small kernels (20 unrolled Sinkhorn iterations, forward and backward), and launched one by one
its backward leaves the GPU waiting on the host. `LossGraphs` captures the loss's forward and
its backward as two CUDA graphs (`torch.cuda.make_graphed_callables`), one pair per (videos,
frames rounded up to `train.graph_frame_bucket`), and the eager step calls the replay in place
of the loss. Measured on an H200 (resnet50 bf16, 2 videos of 450 + 380 frames, one session):
VAVA 128.7 -> 116.4 ms a step; TCC 113.6 -> 113.1 and LAV 116.3 -> 115.3 ms, under 1%, not
worth the memory their graphs hold, so only VAVA's loss is graphed (LOSS_GRAPH_METHODS).

The embeddings are zero-padded and the mask False-padded up to the bucket; the losses read only
the masked frames, so the value and the gradient of the real frames are those of the eager loss
up to float rounding (tested on a GPU). Policy, as for whole-step graphs in auto mode: a shape is
captured the second time it comes, at most `train.max_graphs` pairs, never evicted; other
shapes run the loss eagerly, and after a failed capture (an out-of-memory error, say) no new
shape is captured while the graphs already made still replay. The graphs keep the loss's saved
tensors in their memory pools between steps: captures stop once the pools hold MEMORY_SHARE of
the device's memory (measured as the growth of the memory reserved over a capture, the cache
emptied on both sides of it).
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Callable

import torch

from alignprog.training.graphs import LAUNCH_BOUND_ENCODERS, comes_again, failure, round_up

if TYPE_CHECKING:  # pragma: no cover
    from alignprog.config import Config

MEMORY_SHARE = 0.1   # the most of the device's memory that the loss graphs may hold
LOSS_GRAPH_METHODS = ("vava",)   # where a graphed loss pays (module docstring)

# loss(embeddings (B, T, D) fp32, mask (B, T) bool, counter () long) -> () the alignment loss;
# the counter is VAVA's global_step (phi), read from the device.
LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def wanted(cfg: Config, device: torch.device, *, several_processes: bool) -> bool:
    """Whether the eager step's alignment loss should be graphed: auto mode on one CUDA
    process, VAVA, a compute-bound encoder (with a launch-bound one, auto graphs the whole step
    instead)."""
    return (cfg.train.cuda_graphs == "auto" and device.type == "cuda" and not several_processes
            and cfg.train.method in LOSS_GRAPH_METHODS
            and cfg.model.encoder not in LAUNCH_BOUND_ENCODERS)


class LossGraphs:
    """Graphed forward-and-backward pairs of one loss function, by (videos, padded frames).
    `__call__(emb, mask, counter)` gives the loss as a replay (on the embeddings' autograd
    graph), or None where the caller computes it eagerly."""

    @classmethod
    def create(cls, cfg: Config, device: torch.device, loss: LossFn, *,
               several_processes: bool = False) -> LossGraphs | None:
        if not wanted(cfg, device, several_processes=several_processes):
            return None
        budget = MEMORY_SHARE * torch.cuda.get_device_properties(device).total_memory
        return cls(loss, frame_bucket=cfg.train.graph_frame_bucket,
                   max_graphs=cfg.train.max_graphs, memory_budget=budget)

    def __init__(self, loss: LossFn, *, frame_bucket: int, max_graphs: int,
                 memory_budget: float) -> None:
        self.loss = loss
        self.frame_bucket, self.max_graphs = frame_bucket, max_graphs
        self.memory_budget = memory_budget
        self.seen: dict[tuple[int, int], int] = {}
        self.graphed: dict[tuple[int, int], LossFn] = {}
        self.held = 0          # bytes the captured graphs hold
        self.failed: str | None = None
        self.replays = 0

    def key(self, emb: torch.Tensor) -> tuple[int, int]:
        """(videos, padded frames) of a batch's graphs."""
        return emb.shape[0], round_up(emb.shape[1], self.frame_bucket)

    def __call__(self, emb: torch.Tensor, mask: torch.Tensor, counter: torch.Tensor
                 ) -> torch.Tensor | None:
        """The loss of embeddings (B, T, D) with mask (B, T) as a replay, or None (run it
        eagerly): no backward to capture (no gradient wanted), a shape not captured, a failed
        capture."""
        if not (torch.is_grad_enabled() and emb.requires_grad):
            return None
        key = self.key(emb)
        graphed = self.graphed.get(key)
        if graphed is None:
            if self.failed is not None:
                return None
            if (not comes_again(self.seen, key) or len(self.graphed) >= self.max_graphs
                    or self.held >= self.memory_budget):
                return None
        emb, mask = self.pad(emb, mask, key[1])
        if graphed is None:
            graphed = self.capture(key, emb, mask, counter)
            if graphed is None:
                return None
        self.replays += 1
        # The replay's output is the graph's own buffer, which the next replay overwrites:
        # the step's metrics keep a copy. So is the gradient its backward hands to `emb`
        # (itself when no padding was needed): the step uses it up before the next replay.
        return graphed(emb, mask, counter).clone()

    @staticmethod
    def pad(emb: torch.Tensor, mask: torch.Tensor, frames: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings zero-padded and the mask False-padded to `frames` (differentiable)."""
        extra = frames - emb.shape[1]
        if extra == 0:
            return emb, mask
        return (torch.nn.functional.pad(emb, (0, 0, 0, extra)),
                torch.nn.functional.pad(mask, (0, extra), value=False))

    def capture(self, key: tuple[int, int], emb: torch.Tensor, mask: torch.Tensor,
                counter: torch.Tensor) -> LossFn | None:
        """Capture the pair for `key` with the padded batch as its sample; None (and no
        further capture) if the capture fails."""
        # The cache emptied before and after: what the memory reserved grows by is the graphs'
        # pools (the saved tensors a backward capture frees stay reserved for its replays) and
        # not the blocks the warm-up left cached on its side stream.
        torch.cuda.empty_cache()
        before = torch.cuda.memory_reserved(emb.device)
        sample = (emb.detach().clone().requires_grad_(True), mask.clone(), counter.clone())
        try:
            with warnings.catch_warnings():
                # make_graphed_callables' own warm-up (on its side stream) trips torch's
                # stream-mismatch notice for the sample's gradient; the capture is unaffected
                warnings.filterwarnings("ignore", message="The AccumulateGrad node's stream")
                graphed = torch.cuda.make_graphed_callables(self.loss, sample)
        except RuntimeError as exc:   # e.g. out of memory, or an op that syncs
            self.failed = failure(exc)
            torch.cuda.empty_cache()
            warnings.warn(f"CUDA graph capture of the alignment loss failed ({self.failed}); "
                          "shapes not captured yet run it eagerly", stacklevel=3)
            return None
        torch.cuda.empty_cache()
        self.held += max(torch.cuda.memory_reserved(emb.device) - before, 0)
        self.graphed[key] = graphed
        return graphed
