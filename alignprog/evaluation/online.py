"""The learnable progress head, run online: each frame sees only its action's prefix.

`online_progress` is what a live system would output: frame t of an action gets the head's
output on the frames from the action's start up to t. `online_cost` counts the frame steps this
takes, so callers can refuse a video whose prediction would take hours before starting it.
"""

from __future__ import annotations

import numpy as np
import torch

from alignprog.data.annotations import VideoAnnotation
from alignprog.evaluation.embed import _eval_mode
from alignprog.evaluation.metrics import _foreground_segments


def _chunks(lengths: np.ndarray, row_elems: int, chunk_elems: int) -> list[np.ndarray]:
    """Indices of rows sorted by length, cut so that rows * max length * row_elems <= budget."""
    order = np.argsort(lengths, kind="stable")
    chunks, lo = [], 0
    while lo < len(order):
        hi = lo + 1
        # Sorted ascending, so the last row of a chunk sets its padded length.
        while (hi < len(order)
               and (hi + 1 - lo) * int(lengths[order[hi]]) * row_elems <= chunk_elems):
            hi += 1
        chunks.append(order[lo:hi])
        lo = hi
    return chunks


def _dense_is_online(head: torch.nn.Module) -> bool:
    """True when one dense pass gives every prefix's output: a streamable head (causal position
    feature) that has a dense output (docs/algorithms.md#online-protocol)."""
    return bool(head.streamable) and bool(getattr(head, "has_dense", True))


def online_cost(head: torch.nn.Module, annotation: VideoAnnotation) -> int:
    """Frame steps `online_progress` will run the head for (work and, for attention, memory):
    sum L over the actions for a head with one dense pass, sum L(L+1)/2 for one that re-runs
    every prefix, and the transformer, which attends over every earlier frame, sum L(L+1)/2
    in one dense pass (its score matrices are L x L), L(L+1)(L+2)/6 prefix by prefix."""
    _, lengths = _foreground_segments(annotation)
    n = [int(x) for x in lengths]                      # Python ints: no overflow
    from alignprog.models.progress_heads import TransformerProgressHead
    attends = isinstance(head, TransformerProgressHead)
    if _dense_is_online(head):
        return sum(x * (x + 1) // 2 if attends else x for x in n)
    if attends:
        return sum(x * (x + 1) * (x + 2) // 6 for x in n)
    return sum(x * (x + 1) // 2 for x in n)


def online_progress(head: torch.nn.Module, embeddings: torch.Tensor, annotation: VideoAnnotation,
                    *, chunk_elems: int = 2**22, dense: bool | None = None) -> torch.Tensor:
    """The head's online action-level prediction (T,) on the CPU
    (docs/evaluation.md#online-action-level-mae, docs/algorithms.md#online-protocol).

    Frame t of foreground segment [s, e] gets head(U[s : t+1]), the output at the last frame of
    the growing prefix; background frames get 0. The head runs in eval mode (restored after) and
    in its parameters' dtype and device. All prefixes of all actions go through the head as
    left-aligned zero-padded batches (Q, L, D) + lengths, cut into chunks with Q * L * D <=
    ``chunk_elems``. A streamable head with a dense output gives the same values from one dense
    pass over each whole action (causal features, eval mode: docs/algorithms.md#online-protocol),
    which is used then; ``dense`` forces one path (True is refused for a head whose dense output
    is not the prefix output).
    """
    t_total, dim = embeddings.shape
    if t_total != annotation.num_frames:
        raise ValueError(f"{annotation.task}/{annotation.handle}: {t_total} embeddings for an "
                         f"annotation of {annotation.num_frames} frames")
    param = next(head.parameters())
    u = embeddings.to(device=param.device, dtype=param.dtype)                     # (T, D)
    starts, lengths = _foreground_segments(annotation)                            # (A,), (A,)
    pred = torch.zeros(t_total, dtype=param.dtype)                                # (T,)
    if len(starts) == 0:
        return pred
    can_dense = _dense_is_online(head)
    if dense is None:
        dense = can_dense
    elif dense and not can_dense:
        raise ValueError(f"{type(head).__name__} (position '{getattr(head, 'position', None)}') "
                         "has no dense output equal to its prefix outputs (that needs a causal "
                         "position feature and a dense output); "
                         "evaluate it prefix by prefix (dense=False)")
    if dense:
        row_start, row_len = starts, lengths                                      # a row an action
    else:
        # One row per prefix: action a contributes prefixes of lengths 1 .. L_a.
        row_start = np.repeat(starts, lengths)                                    # (Q,)
        row_len = np.concatenate([np.arange(1, n + 1) for n in lengths])          # (Q,)
    with _eval_mode(head), torch.no_grad():
        for rows in _chunks(row_len, dim, chunk_elems):
            s = torch.as_tensor(row_start[rows], device=u.device)                 # (q,)
            n = torch.as_tensor(row_len[rows], device=u.device)                   # (q,)
            width = int(n.max())
            tau = torch.arange(width, device=u.device)                            # (L,)
            real = tau[None, :] < n[:, None]                                      # (q, L)
            idx = (s[:, None] + tau[None, :]).clamp(max=t_total - 1)              # (q, L)
            x = u[idx] * real[..., None].to(u.dtype)                              # (q, L, D)
            y = head(x, n, dense=dense).cpu()                                     # (q, L) | (q,)
            real, s, n = real.cpu(), s.cpu(), n.cpu()
            if dense:
                frames = (s[:, None] + tau.cpu()[None, :])[real]                  # (sum n,)
                pred[frames] = y[real].to(pred.dtype)
            else:
                pred[s + n - 1] = y.to(pred.dtype)                                # prefix end frame
    return pred
