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
                 autocast_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Each video's aligned embeddings (T_i, D), float32 on the CPU, in ``indices`` order.

    The model must already live on ``device``. Eval mode and no grad; the model's train/eval
    mode is restored afterwards. Videos are batched by similar length (the encoders are padding
    invariant, so this changes nothing but the padding); each is read and embedded once.
    """
    return _embed(model, dataset, indices, device, batch_size, autocast_dtype, head=False)[0]


def embed_with_head_inputs(model: torch.nn.Module, dataset: Dataset, indices: Sequence[int], *,
                           device: torch.device | str, batch_size: int = 4,
                           autocast_dtype: torch.dtype | None = None
                           ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(each video's aligned embeddings, what the model's progress head reads), both (T_i, D)
    as `embed_videos` gives them, from one encoder pass: the same list twice when the head
    reads the embeddings, else the base encoder's features or the head's own base encoder's
    output (`progress.learnable.input`)."""
    embeddings, features = _embed(model, dataset, indices, device, batch_size, autocast_dtype,
                                  head=model.head_input != "embeddings")
    return embeddings, features if features is not None else embeddings


def _embed(model: torch.nn.Module, dataset: Dataset, indices: Sequence[int],
           device: torch.device | str, batch_size: int, autocast_dtype: torch.dtype | None, *,
           head: bool) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """The embedding pass: the embeddings and, with `head`, the head's input of each video."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    indices = list(indices)
    order = sorted(range(len(indices)), key=lambda j: dataset.videos[indices[j]].num_frames)
    embs: list[torch.Tensor | None] = [None] * len(indices)
    feats: list[torch.Tensor | None] | None = [None] * len(indices) if head else None
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
                # the whole model when the head's input is asked for: it may have its own base
                res = model(x, mask) if head else model.encoder(x, mask)
            outputs = [(embs, res.embeddings)]                                    # (B, T, D)
            if feats is not None:
                outputs.append((feats, model.head_features(res)))                 # (B, T, D)
            for out, values in outputs:
                values = values.float().cpu()
                for b, (j, a) in enumerate(zip(rows, arrays)):
                    out[j] = values[b, :len(a)].clone()                           # (T_i, D)
    return embs, feats  # type: ignore[return-value]
