"""Several training processes under torchrun: the process group and the few
collectives the training loop needs.

torchrun starts one process per GPU (or per CPU worker) and sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT; `setup` joins the group (NCCL between GPUs, gloo between CPUs) and
returns a `Dist` handle that the loop holds. A single process holds `SINGLE`, whose collectives
do nothing, so the loop reads the same either way.

The gradients are averaged with one explicit all_reduce per step, after backward, rather than by
a DistributedDataParallel wrapper. The progress head runs outside the model's forward, on the
segments sampled from each batch, and a rank whose batch gives no foreground sample never
touches it: DDP's per-parameter readiness bookkeeping needs the head inside the wrapped forward
and `find_unused_parameters` to survive that. The explicit reduction is the exact average
(a missing gradient counts as zero), runs on every rank on every step whatever its batch held,
and carries the step's loss statistics in the same message. Nothing of it is read on the host:
a non-finite loss or gradient on one rank makes the summed gradients non-finite on every rank,
which then all skip the step on the device, as one process does. What the ranks must agree on
before the reduction (which ranks have a loss, which parameters have a gradient anywhere, the
batch counts) is known on each host and summed over a gloo group, which waits for the other
ranks but not for the GPU. It does not overlap communication with backward as DDP
does; for the pipeline description's model (7 M parameters, 28 MB of fp32 gradients per step,
against a step of ~20 ms) one flat reduction after backward is a small share of the step.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as tdist
from torch import nn

from alignprog.runtime import collective_backend, resolve_device

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# Rank 0 alone evaluates the validation split at each epoch end while the others wait at a
# barrier; torch's default of 10 minutes would abort them on a large validation split.
DEFAULT_TIMEOUT = timedelta(minutes=60)


def launched_by_torchrun() -> bool:
    """True in a process that torchrun (or another launcher setting its variables) started."""
    return all(name in os.environ for name in _TORCHRUN_VARS)


def is_main_process() -> bool:
    """Rank 0 of a torchrun launch, or any process not started by torchrun."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass(frozen=True)
class Dist:
    """This process's place in the group; the collectives are no-ops for a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device | None = None  # where collectives run: cuda:LOCAL_RANK or cpu
    # the gloo group of host values (`host_sum`); None: the default group (itself gloo on CPUs)
    host_group: Any = field(default=None, compare=False)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that creates the run directory and writes checkpoints, metrics and
        the display."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def broadcast_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rank 0's values into `tensor` on every rank (in place)."""
        if self.active:
            tdist.broadcast(tensor, src=0)
        return tensor

    def broadcast_text(self, text: str | None) -> str:
        """Rank 0's `text` on every rank (the others pass None)."""
        if not self.active:
            return text or ""
        data = (text or "").encode("utf-8") if self.is_main else b""
        size = self.broadcast_(torch.tensor([len(data)], dtype=torch.int64, device=self.device))
        buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=self.device)
        if self.is_main and data:
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        return bytes(self.broadcast_(buf).cpu().tolist()).decode("utf-8")

    def broadcast_module_(self, module: nn.Module) -> None:
        """Rank 0's parameters and buffers into `module` on every rank."""
        if self.active:
            for tensor in module.state_dict().values():
                self.broadcast_(tensor)

    def broadcast_tree(self, obj: Any = None) -> Any:
        """Rank 0's `obj` (JSON values, tuples, dicts with int or str keys, tensors) on every
        rank; the others pass None. Tensors go as tensors, the rest as JSON (no pickle)."""
        if not self.active:
            return obj
        tensors: list[torch.Tensor] = []
        manifest = json.dumps(_encode(obj, tensors)) if self.is_main else None
        tree = json.loads(self.broadcast_text(manifest))
        received = []
        for i, spec in enumerate(_tensor_specs(tree)):
            home = torch.device("cpu") if spec["cpu"] else self.device
            if self.is_main:
                buf = tensors[i].detach().to(self.device).contiguous()
            else:
                buf = torch.empty(spec["shape"], dtype=getattr(torch, spec["dtype"]),
                                  device=self.device)
            received.append(self.broadcast_(buf).to(home))
        return obj if self.is_main else _decode(tree, received)

    def host_sum(self, values: list[int]) -> list[int]:
        """The sum over the ranks of a few host integers (which ranks have a loss, which
        parameters have a gradient, the batch counts), through the host group: the ranks wait
        for each other, not for their GPUs."""
        if not self.active:
            return list(values)
        buf = torch.tensor(values, dtype=torch.int64)
        tdist.all_reduce(buf, group=self.host_group)
        return buf.tolist()

    def average_gradients(self, params: list[nn.Parameter], anywhere: list[bool],
                          stats: torch.Tensor) -> torch.Tensor:
        """Average the gradients of `params` over the ranks, in place, and return the sum over
        the ranks of the small device vector `stats`, in one all_reduce and without reading
        the device.

        `anywhere[i]`: whether some rank has a gradient of `params[i]` (`host_sum` of the
        ranks' `p.grad is not None`). A rank without one (the progress head on a rank whose
        batch gave no progress sample) sends zeros, as DDP counts an unused parameter; a
        parameter without a gradient on every rank keeps none, as in a single process."""
        if not self.active:
            return stats
        device = self.device
        pieces = [p.grad.detach().reshape(-1).float() if p.grad is not None     # (numel,)
                  else torch.zeros(p.numel(), device=device)
                  for p, some in zip(params, anywhere, strict=True) if some]
        flat = torch.cat(pieces + [stats.to(device, torch.float32).reshape(-1)])  # (N + S,)
        tdist.all_reduce(flat)
        offset = 0
        for p, some in zip(params, anywhere):
            if not some:
                p.grad = None
                continue
            n = p.numel()
            mean = flat[offset:offset + n].view_as(p).div_(self.world_size)
            p.grad = mean if mean.dtype == p.dtype else mean.to(p.dtype)
            offset += n
        return flat[offset:]


SINGLE = Dist()


def setup(device_spec: str = "auto", *, timeout: timedelta = DEFAULT_TIMEOUT) -> Dist:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT): NCCL when this rank trains on cuda:LOCAL_RANK, gloo on the CPU."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    device = resolve_device(device_spec, local_rank=local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not tdist.is_initialized():
        tdist.init_process_group(collective_backend(device), rank=rank, world_size=world,
                                 timeout=timeout,
                                 device_id=device if device.type == "cuda" else None)
    host_group = None
    if tdist.get_backend() != "gloo":   # NCCL moves GPU tensors only: host values go by gloo
        host_group = tdist.new_group(backend="gloo", timeout=timeout)
    return Dist(rank, world, local_rank, device, host_group)


def shutdown() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


@contextlib.contextmanager
def process_group(device_spec: str = "auto", *, timeout: timedelta = DEFAULT_TIMEOUT
                  ) -> Iterator[Dist]:
    """`setup` for the duration, leaving the group at the end."""
    dist = setup(device_spec, timeout=timeout)
    try:
        yield dist
    finally:
        shutdown()


# ----------------------------------------------------------------------------------------------
# broadcast_tree's encoding: JSON with tensors replaced by {"__tensor__": i, shape, dtype}


def _encode(obj: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors.append(obj)
        return {"__tensor__": len(tensors) - 1, "shape": list(obj.shape),
                "dtype": str(obj.dtype).removeprefix("torch."), "cpu": obj.device.type == "cpu"}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors) for v in obj]
    if isinstance(obj, dict):  # optimizer state is keyed by int parameter indices
        return {"__dict__": [[k, _encode(v, tensors)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot broadcast a {type(obj).__name__}")


def _tensor_specs(tree: Any) -> list[dict]:
    """The tensor placeholders of an encoded tree, in index order."""
    found: list[dict] = []

    def walk(node: Any) -> None:
        if isinstance(node, list):
            for v in node:
                walk(v)
        elif isinstance(node, dict):
            if "__tensor__" in node:
                found.append(node)
            else:
                for v in node.values():
                    walk(v)

    walk(tree)
    return sorted(found, key=lambda spec: spec["__tensor__"])


def _decode(tree: Any, tensors: list[torch.Tensor]) -> Any:
    if isinstance(tree, list):
        return [_decode(v, tensors) for v in tree]
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            return tensors[tree["__tensor__"]]
        if "__tuple__" in tree:
            return tuple(_decode(v, tensors) for v in tree["__tuple__"])
        return {k: _decode(v, tensors) for k, v in tree["__dict__"]}
    return tree
