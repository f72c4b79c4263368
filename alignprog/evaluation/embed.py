"""The embedding pass of every evaluator: each evaluated video through the encoder once.

Evaluation never trains: the model runs in eval mode (dropout off) under no grad, and the
caller's train/eval mode is put back afterwards, so `train` can evaluate mid-run.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch

from alignprog.data.dataset import Dataset


def _autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device``, or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def _eval_mode(module: torch.nn.Module):
    """Eval mode (dropout off, docs/algorithms.md#online-protocol) for the duration, then the
    caller's mode back."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def embed_videos(model: torch.nn.Module, dataset: Dataset, indices: Sequence[int], *,
                 device: torch.device | str, batch_size: int = 4,
                 autocast_dtype: torch.dtype | None = None, head: bool = False
                 ) -> list[torch.Tensor]:
    """Each video's aligned embeddings (T_i, D), float32 on the CPU, in ``indices`` order;
    with ``head``, what the model's progress head reads instead (`head_inputs`).

    The model must already live on ``device``. Eval mode and no grad; the model's train/eval
    mode is restored afterwards. Videos are batched by similar length (the encoders are padding
    invariant, so this changes nothing but the padding); each is read and embedded once.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    indices = list(indices)
    order = sorted(range(len(indices)), key=lambda j: dataset.videos[indices[j]].num_frames)
    out: list[torch.Tensor | None] = [None] * len(indices)
    with _eval_mode(model), torch.no_grad():
        for lo in range(0, len(order), batch_size):
            rows = order[lo:lo + batch_size]
            arrays = [dataset.load(indices[j]) for j in rows]                     # (T_i, *F) each
            t_max = max(len(a) for a in arrays)
            x = torch.zeros((len(arrays), t_max, *arrays[0].shape[1:]))          # (B, T, *F)
            mask = torch.zeros((len(arrays), t_max), dtype=torch.bool)           # (B, T)
            for b, a in enumerate(arrays):
                x[b, :len(a)] = torch.from_numpy(a)
                mask[b, :len(a)] = True
            x, mask = x.to(device), mask.to(device)
            with _autocast(device, autocast_dtype):
                res = model.encoder(x, mask)
                emb = model.head_features(res) if head else res.embeddings        # (B, T, D)
            emb = emb.float().cpu()
            for b, (j, a) in enumerate(zip(rows, arrays)):
                out[j] = emb[b, :len(a)].clone()                                  # (T_i, D)
    return out  # type: ignore[return-value]


def head_inputs(model: torch.nn.Module, dataset: Dataset, indices: Sequence[int],
                embeddings: list[torch.Tensor], **kwargs) -> list[torch.Tensor]:
    """What the progress head reads for each of ``indices``: ``embeddings`` themselves (the
    videos' embeddings, in ``indices`` order) when the head reads the aligned embeddings, else
    one more pass for the base encoder's features (`progress.learnable.input`); ``kwargs`` as
    `embed_videos`."""
    if getattr(model, "head_input", "embeddings") == "embeddings":
        return embeddings
    return embed_videos(model, dataset, indices, head=True, **kwargs)
