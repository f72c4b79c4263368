"""Shared pieces of the alignment losses: padding, pair enumeration, distances, the
intra-video contrastive regulariser (see docs/algorithms.md#pairs-and-reduction and
docs/algorithms.md#intra-video-regulariser).

Pure tensor functions: no config import. Every loss has a padded-batch core
``*_loss_batch(x (B, T, D), mask (B, T), ...)`` and the list form ``*_loss(seqs, ...)``.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch.autograd.function import once_differentiable

from alignprog.runtime import broadcast_distances

Compat = Literal["fixed", "reference"]
# "reference": the reference's reduction (TCC a mean over pairs, the others a sum over ordered
# pairs; frames summed, nothing length-normalised), which the pipeline description's lambda
# values assume (docs/reference-bugs.md#inconsistent-loss-reductions). "mean": the mean over
# ordered pairs and over the frames of each pair's sum, so that values are O(1) whatever the
# lengths and batch size.
Reduction = Literal["reference", "mean"]

# Floor under squared distances before a square root, where a loss computes its own distances:
# keeps d sqrt(s) / ds finite at s = 0 (identical frames).
SQRT_EPS = 1e-12

def check_compat(compat: str, reduction: str) -> None:
    if compat not in ("fixed", "reference"):
        raise ValueError(f"compat must be 'fixed' or 'reference', got {compat!r}")
    if reduction not in ("reference", "mean"):
        raise ValueError(f"reduction must be 'reference' or 'mean', got {reduction!r}")


def pad_sequences(seqs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """List of (T_i, D) tensors -> zero-padded (B, T_max, D) and the (B, T_max) bool mask."""
    if len(seqs) == 0:
        raise ValueError("need at least one sequence")
    dims = {s.shape[-1] for s in seqs}
    if any(s.dim() != 2 for s in seqs) or len(dims) != 1:
        raise ValueError("every sequence must be a (T_i, D) tensor with the same D, got shapes "
                         f"{[tuple(s.shape) for s in seqs]}")
    lengths = torch.tensor([len(s) for s in seqs], device=seqs[0].device)
    x = torch.nn.utils.rnn.pad_sequence(list(seqs), batch_first=True)       # (B, T, D)
    mask = torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]  # (B, T)
    return x, mask


def ordered_pairs(batch: int, *, include_self: bool = False,
                  device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (i, j) of the ordered pairs of a batch, row-major: (P,), (P,).

    ``include_self`` adds i == j (the reference TCC's B^2 pairs; see
    docs/algorithms.md#pairs-and-reduction). Built from the counts alone (no boolean indexing),
    so it never waits for the device."""
    if include_self:
        first = torch.arange(batch, device=device).repeat_interleave(batch)      # (B^2,)
        return first, torch.arange(batch, device=device).repeat(batch)
    first = torch.arange(batch, device=device).repeat_interleave(max(batch - 1, 0))  # (P,)
    k = torch.arange(max(batch - 1, 0), device=device).repeat(batch)               # (P,)
    return first, k + (k >= first).long()                                           # skip i


def take_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x[index] along the first dim, (B, ...) -> (Q, ...), as a one-hot product in float64.

    The same values as indexing (one 1.0 per row, exact in float64), but its backward is a
    matmul: on CUDA, deterministic indexing backward (what `alignprog train` runs) sorts and
    accumulates one (T, D) slab per index in a slow kernel, ~0.2 ms per video pair, which the
    product does in microseconds, deterministically and summing in float64."""
    onehot = (index[:, None] == torch.arange(x.shape[0], device=x.device)).to(torch.float64)
    rows = onehot @ x.reshape(x.shape[0], -1).to(torch.float64)                # (Q, prod(...))
    return rows.to(x.dtype).reshape(index.shape[0], *x.shape[1:])


# Elements of the (..., rows, M, D) difference block that `_direct_sq_distances` builds at once.
DIFF_BLOCK = 2 ** 26


def _direct_sq_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum_d (x_nd - y_md)^2 from the differences themselves (no ||x||^2 + ||y||^2 - 2xy
    expansion), in blocks of rows so the difference tensor stays under DIFF_BLOCK elements."""
    n, m, dim = x.shape[-2], y.shape[-2], x.shape[-1]
    lead = max(1, x[..., :1, :1].numel())
    rows = max(1, DIFF_BLOCK // max(1, lead * m * dim))
    blocks = [(x[..., s:s + rows, None, :] - y[..., None, :, :]).square().sum(-1)
              for s in range(0, n, rows)]                                   # (..., rows, M) each
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=-2)    # (..., N, M)


class _Distances(torch.autograd.Function):
    """Euclidean (or squared) distances with an exact, memory-light backward.

    Forward: the squared differences summed directly, without the ||x||^2 + ||y||^2 - 2xy
    expansion, which cancels catastrophically for near-identical frames: ``torch.cdist``'s
    ``donot_use_mm_for_euclid_dist`` mode on the CPU, blocks of broadcast differences on a GPU
    (where cdist's kernel is ~10x slower: 0.55 ms for 450 x 380 frames of D = 128).
    Backward: the gradient of sum_nm G_nm d_nm is linear in the inputs, sum_m W_nm (x_n - y_m)
    with W = G / d (2G when squared), so it is two matmuls; ``torch.cdist``'s own CUDA backward
    materialises a (..., M, N, D) buffer instead, which runs out of memory (and overflows 32-bit
    indexing) for long videos. The gradient at d = 0 (identical frames) is 0, as cdist's.
    """

    @staticmethod
    def forward(ctx, x, y, squared: bool):
        if broadcast_distances(x):
            sq = _direct_sq_distances(x, y)                                   # (..., N, M)
            d = None if squared else sq.sqrt()
        else:
            d = torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist")
            sq = d.square() if squared else None
        ctx.save_for_backward(x, y, d)
        ctx.squared = squared
        return sq if squared else d

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        x, y, d = ctx.saved_tensors
        if ctx.squared:
            w = 2.0 * grad                                                   # (..., N, M)
        else:
            w = torch.where(d > 0, grad / torch.where(d > 0, d, 1.0), 0.0)   # (..., N, M)
        grad_x = w.sum(-1, keepdim=True) * x - w @ y                         # (..., N, D)
        grad_y = w.sum(-2).unsqueeze(-1) * y - w.transpose(-1, -2) @ x       # (..., M, D)
        return grad_x.sum_to_size(x.shape), grad_y.sum_to_size(y.shape), None


def pairwise_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Euclidean distances, x (..., N, D), y (..., M, D) -> (..., N, M), exact and >= 0,
    with gradient 0 at distance 0 (identical frames) and no (..., N, M, D) temporary."""
    return _Distances.apply(x, y, False)


def pairwise_sq_distances(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (..., N, M) (soft-DTW's cost, docs/algorithms.md#soft-dtw)."""
    return _Distances.apply(x, y, True)


def intra_contrast(x: torch.Tensor, mask: torch.Tensor, *, window: int = 15, margin: float = 2.0,
                   compat: Compat = "fixed") -> torch.Tensor:
    """The intra-video regulariser C(U) of LAV and VAVA for every video: (B, T, D) -> (B,).

    See docs/algorithms.md#intra-video-regulariser. With d_ab = ||u_a - u_b||,
    w_ab = (a - b)^2 + 1, y_ab = [|a - b| < window]:

    * push (both modes): sum_ab (1 - y_ab) w_ab max(0, margin - d_ab), far-apart frames pushed
      at least ``margin`` apart;
    * ``compat="reference"``: plus sum_ab y_ab w_ab margin, a constant with no gradient
      (docs/reference-bugs.md#lav-regulariser-constant-pull);
    * ``compat="fixed"``: plus sum_ab y_ab w_ab d_ab, the LAV paper's pull of in-window frames
      together (the diagonal, d_aa = 0, adds nothing).

    Only real frames (mask True) take part; sums are unnormalised as in the reference.
    """
    t = x.shape[1]
    idx = torch.arange(t, device=x.device)
    gap = (idx[:, None] - idx[None, :]).to(x.dtype)                            # (T, T)
    weight = gap.square() + 1.0                                                # (T, T) w_ab
    in_window = gap.abs() < window                                             # (T, T) y_ab
    valid = mask[:, :, None] & mask[:, None, :]                                # (B, T, T)
    d = pairwise_distances(x, x)                                               # (B, T, T)
    push = torch.where(valid & ~in_window, weight * torch.relu(margin - d), 0.0).sum((1, 2))
    if compat == "reference":
        near = torch.where(valid & in_window, weight * margin, 0.0).sum((1, 2))
    else:
        off_diag = gap != 0
        near = torch.where(valid & in_window & off_diag, weight * d, 0.0).sum((1, 2))
    return push + near                                                         # (B,)
