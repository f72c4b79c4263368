"""Device choice, precision and seeding: the only module that branches on the device, so
device handling lives in one place. Everything else takes the device it is given."""

from __future__ import annotations

import contextlib
import contextvars
import random

import numpy as np
import torch

from alignprog.errors import ConfigError


def resolve_device(spec: str = "auto", *, local_rank: int | None = None) -> torch.device:
    """``auto`` (CUDA if available), ``cpu``, ``cuda`` or ``cuda:N``; a clear error otherwise.

    Under torchrun (`local_rank` given) each process takes the GPU of its local rank:
    ``auto``/``cuda`` become ``cuda:LOCAL_RANK``; naming one GPU (``cuda:N``) is refused, since
    every rank would train on the same card."""
    if local_rank is not None:
        device = resolve_device(spec)
        if device.type == "cpu":
            return device
        if spec not in ("auto", "cuda"):
            raise ConfigError(f"train.device is '{spec}' but under torchrun each process uses "
                              "the GPU of its LOCAL_RANK: use --device cuda (or auto, or cpu)")
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local_rank} but there are only "
                              f"{torch.cuda.device_count()} CUDA device(s) on this node: "
                              "start at most that many processes per node (--nproc-per-node)")
        return torch.device("cuda", local_rank)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ConfigError(f"train.device: '{spec}' is not a device (use auto, cpu, cuda or "
                          "cuda:N)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"train.device is '{spec}' but CUDA is not available here "
                              "(use --device cpu or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"train.device is '{spec}' but there are only "
                              f"{torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise ConfigError(f"train.device: '{spec}' is not supported (use auto, cpu, cuda, cuda:N)")
    return device


def collective_backend(device: torch.device) -> str:
    """The torch.distributed backend for a device: NCCL between GPUs, gloo between CPUs."""
    return "nccl" if device.type == "cuda" else "gloo"


def autocast(device: torch.device, precision: str):
    """bf16 autocast for the model's forward (losses run in fp32), or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ConfigError(f"train.precision must be fp32 or bf16, got {precision!r}")


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device` without stalling the host: on CUDA it is copied through pinned
    memory asynchronously (a plain `.to("cuda")` from pageable memory waits for the GPU to
    finish its queue first, a host sync in the middle of the step)."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


_TRUSTED = contextvars.ContextVar("alignprog_trusted_inputs", default=False)


@contextlib.contextmanager
def trusted_inputs():
    """Within: the input checks of losses and heads that read tensor values on the host skip
    CUDA tensors. The trainer feeds them batches it built itself, and each such check would be
    a host-device sync in the middle of the step."""
    token = _TRUSTED.set(True)
    try:
        yield
    finally:
        _TRUSTED.reset(token)


_LENGTHS = contextvars.ContextVar("alignprog_host_lengths", default=None)


@contextlib.contextmanager
def host_lengths(lengths: torch.Tensor):
    """Within: the frame counts (B,) of the batch being encoded, on the host, as the batcher
    made them (every video's real frames first). An encoder that runs each video's real frames
    only (the `resnet50` one on a GPU) takes its rows from them instead of reading the mask
    back from the device: no host sync, no padding computed. Not inside a CUDA graph, whose
    shapes must not depend on the batch."""
    token = _LENGTHS.set(lengths)
    try:
        yield
    finally:
        _LENGTHS.reset(token)


def known_lengths() -> torch.Tensor | None:
    """The host frame counts `host_lengths` gives, or None (outside it, or while a CUDA graph
    is being captured)."""
    if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
        return None
    return _LENGTHS.get()


def checks_values(tensor: torch.Tensor) -> bool:
    """Whether an input check may read `tensor`'s values on the host: always on the CPU; on a
    GPU not inside `trusted_inputs()` nor while a CUDA graph is being captured."""
    if tensor.device.type != "cuda":
        return True
    return not (_TRUSTED.get() or torch.cuda.is_current_stream_capturing())


def broadcast_distances(tensor: torch.Tensor) -> bool:
    """Whether exact pairwise distances are summed from blocks of broadcast differences (GPUs:
    ~10x faster there than cdist's direct kernel) rather than by that kernel (the CPU, where it
    is ~10x faster than the blocks)."""
    return tensor.device.type == "cuda"


def fused_optimizer(device: torch.device) -> bool:
    """Fused Adam on CUDA: one kernel for all parameters, which also skips a step whose
    gradients are not finite on the device (`found_inf`) without a host sync."""
    return device.type == "cuda"


def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and random: the same seed and config give the same
    numbers on the same device."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@contextlib.contextmanager
def deterministic(enabled: bool = True):
    """Deterministic kernels for the duration (restoring the previous setting afterwards).

    On a CPU with several threads, some accumulating kernels (e.g. the backward of indexing)
    otherwise sum in a varying order and runs drift apart in the 5th digit. Ops without a
    deterministic version only warn (CUDA), they do not fail."""
    before = torch.are_deterministic_algorithms_enabled()
    before_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=before_warn)


def device_info(device: torch.device) -> dict:
    """The device of a run, as meta.json records it (torch's version is there already)."""
    info: dict = {"device": str(device)}
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        info["gpu"] = torch.cuda.get_device_name(index)
        info["cuda"] = torch.version.cuda
    info["threads"] = torch.get_num_threads()
    return info
