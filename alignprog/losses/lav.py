"""LAV: soft-DTW alignment plus the intra-video contrastive regulariser (docs/algorithms.md#lav).

For an ordered pair (i, j) of videos of one batch (both (i, j) and (j, i), i != j; see
docs/algorithms.md#pairs-and-reduction),

    pair(i, j) = SoftDTW_g(U_i, U_j) + c_r * (C(U_i) + C(U_j)),

soft-DTW over the squared Euclidean cost C_nm = ||u_n - v_m||^2 with g = ``min_temp``, and C(U) the
regulariser of ``common.intra_contrast`` (window W, margin). Pure tensor functions.
"""

from __future__ import annotations

from typing import Sequence

import torch

from alignprog.losses.common import (Compat, Reduction, check_compat, intra_contrast,
                                     pad_sequences, pairwise_sq_distances, take_rows)
from alignprog.losses.softdtw import soft_dtw
from alignprog.runtime import checks_values


def lav_loss_batch(x: torch.Tensor, mask: torch.Tensor, *, min_temp: float = 0.1,
                   cr_coefficient: float = 0.01, window: int = 15, margin: float = 2.0,
                   compat: Compat = "fixed", reduction: Reduction = "reference") -> torch.Tensor:
    """LAV loss of a padded batch x (B, T, D) with prefix mask (B, T) -> scalar.

    Defaults (docs/algorithms.md#defaults): ``min_temp`` g_s = 0.1, ``cr_coefficient`` c_r = 0.01,
    regulariser ``window`` 15 and ``margin`` 2 (hard-coded in the reference).

    ``compat`` (docs/reference-bugs.md#lav-regulariser-constant-pull): the in-window part of C(U).
      * ``"fixed"`` (default): the LAV paper's pull, sum_ab y_ab w_ab ||u_a - u_b||.
      * ``"reference"``: the reference's constant sum_ab y_ab w_ab margin, which has no gradient.
      The far-apart push term and the soft-DTW are the same in both modes. Soft-DTW runs on the
      inputs' device in their dtype (the reference runs it on the CPU in float64 with numba: the
      same recursion, differing by rounding only; pass float64 inputs for float64).

    ``reduction`` (docs/algorithms.md#pairs-and-reduction,
    docs/reference-bugs.md#inconsistent-loss-reductions):
      * ``"reference"`` (default): sum over the B(B-1) ordered pairs of pair(i, j), nothing
        normalised (LAV totals of 1e6-1e8, what the pipeline description's lambda ~1e6 assumes;
        docs/algorithms.md#loss-magnitudes-and-lambda).
      * ``"mean"``: mean over the ordered pairs of pair(i, j) / (N_i + N_j), N_i the frame count
        of video i (a soft-DTW path has between max(N_i, N_j) and N_i + N_j - 1 cells).

    Soft-DTW is symmetric, SoftDTW(U_i, U_j) = SoftDTW(U_j, U_i) (the recursion on the transposed
    cost is the same one), and so is pair(i, j); so each unordered pair is computed once and
    counted twice, which is the reference's double counting
    (docs/reference-bugs.md#lav-regulariser-constant-pull) at half the cost. C(U_i) depends
    on video i only and is computed once per video.

    Padded frames (mask False) take no part and get zero gradient; masks must be prefixes (the
    real frames first), as ``pad_sequences`` makes them. Fewer than 2 videos give a zero that is
    still connected to the graph.
    """
    check_compat(compat, reduction)
    if x.dim() != 3 or mask.shape != x.shape[:2]:
        raise ValueError(f"expected x (B, T, D) and mask (B, T), got {tuple(x.shape)} and "
                         f"{tuple(mask.shape)}")
    mask = mask.bool()
    # Zero the padding first: garbage there (even NaN) then never reaches a value or a gradient.
    x = torch.where(mask[..., None], x, 0.0)                                    # (B, T, D)
    b, t, _ = x.shape
    if b < 2:
        return x.sum() * 0.0
    lengths = mask.sum(1)                                                       # (B,)
    prefix = torch.arange(t, device=x.device)[None, :] < lengths[:, None]       # (B, T)
    if checks_values(mask) and not torch.equal(prefix, mask):
        raise ValueError("mask must mark a prefix of each row (real frames first)")

    reg = intra_contrast(x, mask, window=window, margin=margin, compat=compat)  # (B,)
    first, second = torch.triu_indices(b, b, offset=1, device=x.device)        # (Q,), Q = B(B-1)/2
    cost = pairwise_sq_distances(take_rows(x, first), take_rows(x, second))     # (Q, T, T)
    align = soft_dtw(cost, lengths[first], lengths[second], min_temp)           # (Q,)
    pair = align + cr_coefficient * (reg[first] + reg[second])                  # (Q,)
    if reduction == "mean":
        # Mean over the ordered pairs = mean over the unordered ones (pair and divisor symmetric).
        return (pair / (lengths[first] + lengths[second]).to(pair.dtype)).mean()
    return 2.0 * pair.sum()


def lav_loss(seqs: Sequence[torch.Tensor], *, min_temp: float = 0.1,
             cr_coefficient: float = 0.01, window: int = 15, margin: float = 2.0,
             compat: Compat = "fixed", reduction: Reduction = "reference") -> torch.Tensor:
    """LAV loss of a list of (T_i, D) embeddings: ``pad_sequences`` + ``lav_loss_batch``."""
    x, mask = pad_sequences(seqs)
    return lav_loss_batch(x, mask, min_temp=min_temp, cr_coefficient=cr_coefficient,
                          window=window, margin=margin, compat=compat, reduction=reduction)
