"""TCC: temporal cycle-consistency loss, regression form with variance (docs/algorithms.md#tcc).

For a pair (primary U, N frames; secondary V, M frames) and every primary frame i:

1. alpha_ik = softmax_k(-||u_i - v_k|| / tau)            (soft nearest neighbour in V)
2. v~_i     = sum_k alpha_ik v_k
3. beta_il  = softmax_l(-||v~_i - u_l|| / tau)           (cycle back to U)
4. mu_i     = sum_l beta_il l
5. sigma2_i = sum_l beta_il (l - mu_i)^2                  (fixed; reference: see ``compat`` below)
6. l_i      = (i - mu_i)^2 / sigma2_i + lambda_v * log(sqrt(sigma2_i) + 1e-20)

pair loss = sum_i l_i over the primary's real frames.

Distances are plain Euclidean (not squared) in BOTH modes, as in the reference
(docs/reference-bugs.md#tcc-plain-euclidean-distances): the TCC/LAV papers square them, but
tau = 0.1 was tuned for the plain form. The log term is lambda_v * log(sigma) as in the TCC
paper (= lambda_v/2 * log sigma^2).

``compat`` (docs/reference-bugs.md#tcc-variance-about-wrong-mean and
docs/reference-bugs.md#tcc-self-pairs-nan):

* ``"fixed"``: only the ordered pairs i != j (self-pairs are a trivial cycle and go 0/0);
  the intended variance about mu_i; sigma2 clamped >= ``variance_eps`` before dividing.
* ``"reference"``: all B^2 pairs including i == j; sigma2_i = sum_l beta_il (l - mu_l)^2, i.e.
  each cycled-back index l is centred on mu_l, the expected index of primary frame l's own
  cycle (the reference broadcasts the (N,) vector mu against beta's columns); no epsilon. With
  well-separated embeddings beta of a self-pair is one-hot in float32, mu_l = l, sigma2 = 0 and
  (i - mu_i)^2 = 0, so the self-pair term is NaN exactly as the reference's is.

Both modes use a max-shifted (stable) softmax; the reference's TCC softmax is not listed as a
bug, so the numbers agree wherever the reference does not underflow.

``reduction`` (docs/algorithms.md#pairs-and-reduction,
docs/reference-bugs.md#inconsistent-loss-reductions):

* ``"reference"``: the mean of the pair losses over the pairs used: B^2 in reference compat
  (the reference's mean), B(B - 1) in fixed compat (the same mean, self-pairs left out).
* ``"mean"``: the mean over those same pairs of (pair loss / N_p), N_p = the number of real
  frames of the pair's primary video (the frames the pair loss sums over). With equal lengths N
  it is the reference reduction divided by N.
"""

from __future__ import annotations

from typing import Sequence

import torch

from alignprog.losses.common import (
    SQRT_EPS,
    Compat,
    Reduction,
    check_compat,
    ordered_pairs,
    pad_sequences,
    take_rows,
)

# The reference adds this inside the log of the standard deviation (step 6 above).
LOG_STD_EPS = 1e-20


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances, a (P, N, D), b (P, M, D) -> (P, N, M), with a finite gradient at 0.

    Uses ||a||^2 + ||b||^2 - 2 a.b (one batched matmul) rather than common.pairwise_distances,
    whose (P, N, M, D) difference tensor needs 128x the memory at D = 128 (about 22 GB for a
    B = 2 reference-mode batch of 3300-frame videos). The expansion loses accuracy for
    near-identical frames far from the origin, so callers pass centred inputs; the SQRT_EPS
    floor (as in common.pairwise_distances) removes negative round-off and keeps d||.|| finite
    at 0."""
    a_sq = a.square().sum(-1)                                                  # (P, N)
    b_sq = b.square().sum(-1)                                                  # (P, M)
    sq = torch.baddbmm(a_sq[:, :, None] + b_sq[:, None, :], a, b.transpose(1, 2),
                       alpha=-2.0)                                             # (P, N, M)
    return sq.clamp_min(SQRT_EPS).sqrt()


def tcc_pair_losses(x: torch.Tensor, mask: torch.Tensor, first: torch.Tensor,
                    second: torch.Tensor, *, softmax_temp: float = 0.1,
                    alignment_variance: float = 0.001, variance_eps: float = 1e-6,
                    compat: Compat = "fixed") -> torch.Tensor:
    """The pair loss sum_i l_i of every pair (first[p] primary, second[p] secondary): (P,).

    ``x`` (B, T, D), ``mask`` (B, T) bool, ``first``/``second`` (P,) video indices. No
    reduction over pairs; the per-pair values are there to be logged, since the reductions
    differ across methods (docs/reference-bugs.md#inconsistent-loss-reductions). Every video
    needs at least one real frame."""
    t = x.shape[1]
    # Padded frames are zeroed so that garbage (even inf/NaN) there cannot reach the graph.
    x = torch.where(mask[:, :, None], x, torch.zeros((), dtype=x.dtype, device=x.device))
    # Distances are translation invariant; centring on the (detached) mean of the real frames
    # keeps the matmul expansion of _distances accurate when embeddings share a large offset.
    centre = (x.sum((0, 1)) / mask.sum().clamp_min(1)).detach()                # (D,)
    x = torch.where(mask[:, :, None], x - centre, torch.zeros((), dtype=x.dtype, device=x.device))

    u, v = take_rows(x, first), take_rows(x, second)                           # (P, T, D) each
    u_mask, v_mask = mask[first], mask[second]                                 # (P, T) each

    # Steps 1-2: soft nearest neighbour of each primary frame among the secondary's real frames.
    logits = _distances(u, v).mul(-1.0 / softmax_temp)                        # (P, N, M)
    logits = logits.masked_fill(~v_mask[:, None, :], float("-inf"))
    alpha = torch.softmax(logits, dim=-1)                                      # (P, N, M)
    v_tilde = torch.bmm(alpha, v)                                              # (P, N, D)

    # Step 3: cycle back over the primary's real frames.
    logits = _distances(v_tilde, u).mul(-1.0 / softmax_temp)                  # (P, N, N)
    logits = logits.masked_fill(~u_mask[:, None, :], float("-inf"))
    beta = torch.softmax(logits, dim=-1)                                       # (P, N, N)

    # Step 4: expected cycled-back index.
    idx = torch.arange(t, device=x.device, dtype=x.dtype)                      # (N,)
    mu = beta @ idx                                                            # (P, N)

    # Step 5: variance of the cycled-back index.
    if compat == "reference":
        # (l - mu_l)^2 in the sum over l, the reference's broadcast of mu over beta's columns
        # (docs/reference-bugs.md#tcc-variance-about-wrong-mean). Padded l have beta_il = 0;
        # zeroing their offsets keeps 0 * x clean.
        offset = torch.where(u_mask, idx - mu, 0.0)                            # (P, N) index l
        var = (beta * offset[:, None, :].square()).sum(-1)                     # (P, N)
        # No epsilon, as in the reference. Padded rows i are dropped below; giving them 1 stops
        # a 0/0 there from sending NaN back through the where's zero gradient.
        var = torch.where(u_mask, var, 1.0)
    else:
        offset = idx[None, None, :] - mu[:, :, None]                           # (P, N, N)
        var = (beta * offset.square()).sum(-1).clamp_min(variance_eps)         # (P, N)

    # Step 6: per-frame loss, summed over the primary's real frames.
    frame = (idx - mu).square() / var + alignment_variance * torch.log(var.sqrt() + LOG_STD_EPS)
    return torch.where(u_mask, frame, 0.0).sum(-1)                             # (P,)


def tcc_loss_batch(x: torch.Tensor, mask: torch.Tensor, *, softmax_temp: float = 0.1,
                   alignment_variance: float = 0.001, variance_eps: float = 1e-6,
                   compat: Compat = "fixed", reduction: Reduction = "reference") -> torch.Tensor:
    """TCC loss of a padded batch: x (B, T, D), mask (B, T) bool -> scalar.

    Keywords: ``softmax_temp`` tau and ``alignment_variance`` lambda_v (the config defaults
    0.1 / 0.001 of docs/algorithms.md#defaults; the reference function's own defaults 1 / 0.1 are
    never used); ``variance_eps`` the clamp of sigma2 in fixed compat (the reference has none,
    docs/reference-bugs.md#tcc-variance-about-wrong-mean; unused in reference compat).
    ``compat`` and ``reduction``: see the module docstring. All pairs are computed at once as
    (P, T, T) tensors. A batch of fewer than 2 videos gives a zero still attached to the graph.
    """
    check_compat(compat, reduction)
    if softmax_temp <= 0:
        raise ValueError(f"softmax_temp must be > 0, got {softmax_temp}")
    if variance_eps <= 0:
        raise ValueError(f"variance_eps must be > 0, got {variance_eps}")
    if x.dim() != 3 or mask.shape != x.shape[:2] or mask.dtype != torch.bool:
        raise ValueError(f"need x (B, T, D) and a bool mask (B, T), got {tuple(x.shape)} and "
                         f"{tuple(mask.shape)} {mask.dtype}")
    if x.shape[0] < 2:
        # No alignment loss for a single video (docs/algorithms.md#pairs-and-reduction).
        return torch.where(mask[:, :, None], x, 0.0).sum() * 0.0
    first, second = ordered_pairs(x.shape[0], include_self=compat == "reference",
                                  device=x.device)                             # (P,), (P,)
    pair = tcc_pair_losses(x, mask, first, second, softmax_temp=softmax_temp,
                           alignment_variance=alignment_variance, variance_eps=variance_eps,
                           compat=compat)                                      # (P,)
    if reduction == "mean":
        pair = pair / mask[first].sum(-1).to(pair.dtype)                       # per primary frame
    return pair.mean()


def tcc_loss(seqs: Sequence[torch.Tensor], *, softmax_temp: float = 0.1,
             alignment_variance: float = 0.001, variance_eps: float = 1e-6,
             compat: Compat = "fixed", reduction: Reduction = "reference") -> torch.Tensor:
    """List form: (T_i, D) tensors -> ``pad_sequences`` -> :func:`tcc_loss_batch`."""
    x, mask = pad_sequences(seqs)
    return tcc_loss_batch(x, mask, softmax_temp=softmax_temp,
                          alignment_variance=alignment_variance, variance_eps=variance_eps,
                          compat=compat, reduction=reduction)
