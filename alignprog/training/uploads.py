"""Batches copied to the GPU ahead of their step, on a stream of their own.

A batch's copy from (pinned) host memory runs on the copy engine; issued on the compute stream it
waits for the previous step and the next step waits for it, so the two add up. For `stacking`
features that is a fraction of a millisecond, for the `resnet50` encoder's layer3 maps it is
not: two videos of 450 + 380 frames are 0.7 GB of float32, ~13 ms over the host link, a tenth of
the step (measured on an H200). `Uploads.start` copies the next step's batch on a side stream
while the current step computes; the step then takes that copy (its stream waits only for the
copy's own event) instead of copying again. The values are the same either way.
"""

from __future__ import annotations

from collections import deque

import torch

from alignprog.data import Batch


class Uploads:
    """Device copies of host batches, started ahead (`start`) and taken by the step (`take`).
    Off CUDA `start` does nothing and `take` is `Batch.to`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        # (host batch, its device copy, the copy's event), oldest first
        self.pending: deque[tuple[Batch, Batch, torch.cuda.Event]] = deque()
        self.hits = 0   # steps that took a copy started ahead

    def start(self, batches: list[Batch]) -> None:
        """Begin copying `batches` to the device on the side stream. The copy stream does not
        wait for the compute stream: the copies go to fresh memory."""
        if self.stream is None:
            return
        with torch.cuda.stream(self.stream):
            for host in batches:
                copy = host.to(self.device, non_blocking=True)
                self.pending.append((host, copy, self.stream.record_event()))

    def take(self, host: Batch, *, copy_now: bool = True) -> Batch | None:
        """`host` on the device: the copy `start` began for it (the current stream waits for
        that copy alone, and the copy's memory is marked as used there, so that the allocator
        does not hand it out again before this step is done with it), else a copy now on the
        current stream (None with `copy_now=False`)."""
        found = self._pop(host)
        if found is None:
            return host.to(self.device, non_blocking=True) if copy_now else None
        copy, event = found
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(event)
        for value in vars(copy).values():
            if isinstance(value, torch.Tensor):
                value.record_stream(stream)
        self.hits += 1
        return copy

    def _pop(self, host: Batch) -> tuple[Batch, torch.cuda.Event] | None:
        """The pending (copy, event) of `host`, removed with the copies started before it (for
        batches whose steps have passed); None, and nothing removed, if none was started: the
        copies pending are then those of later steps."""
        for i, (started, copy, event) in enumerate(self.pending):
            if started is host:
                for _ in range(i + 1):
                    self.pending.popleft()
                return copy, event
        return None

    def clear(self) -> None:
        """Drop the copies not taken (an epoch that stopped early)."""
        self.pending.clear()
