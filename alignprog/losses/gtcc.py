"""GTCC: generalised (multi-cycle, GMM) temporal cycle-consistency with a drop branch.

See docs/algorithms.md#gtcc (docs/algorithms.md#pairs-and-reduction for the pairs and the
reduction) and the GTCC entries of docs/reference-bugs.md (gtcc-gamma-overwritten-by-k,
gtcc-exp-underflow, gtcc-fixed-twenty-samples, gtcc-drop-term-unbounded,
gtcc-mixture-fits-sequential, gtcc-window-mask-quirks, inconsistent-loss-reductions).
Pure tensor functions, no config import: ``gtcc_loss_batch`` on a padded batch
and the list form ``gtcc_loss``. All ordered pairs (i, j), i != j, and all their sampled frames
are computed at once; the GMM fits of the whole batch run as one batched L-BFGS
(``alignprog.losses.gmm``; one Triton launch on CUDA).

On CUDA the loss makes no host sync inside ``alignprog.runtime.trusted_inputs()`` (its
input checks read values on the host, `runtime.checks_values`): the random draws are
copied to the device without waiting, every (pair, sampled frame) slot is fitted (padded slots as
inactive fits) instead of selecting the real ones with a boolean index, and the counts in
``GTCCDetails`` stay tensors until the caller reads them.

For a primary video i (U, N frames) and a secondary j (V, M frames), each sampled frame s of i:
alpha_s = softmax_k(-||u_s - v_k|| / tau) -> a K-component discrete-Gaussian mixture fitted to it
(components G_s (K, M), weights pi_s; detached) -> K soft neighbours v~_{s,k} = sum_m G_s[k,m] v_m
-> windowed cycle-back beta_{s,k,l} over the primary's frames -> mu_{s,k}, sigma^2_{s,k}
-> e_{s,k} = (s - mu_{s,k})^2 -> A_s = sum_k pi_{s,k} e_{s,k} -> the frame term (with the drop
weights b_s from the secondary's drop vector when gamma < 1). Pair loss = sum over s of the terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from alignprog.losses.common import (SQRT_EPS, Compat, Reduction, check_compat, ordered_pairs,
                                     pad_sequences, pairwise_distances)
from alignprog.losses.gmm import GMMFit, fit_gmm
from alignprog.runtime import checks_values, to_device

# Sampled frames per primary video: hard-coded 20 in the reference (docs/algorithms.md#gtcc).
NUM_SAMPLES = 20
# The reference's guard in the cycle-back normaliser (docs/algorithms.md#gtcc), reference only.
BETA_EPS = 1e-6
# The reference's guard inside the optional log-sigma term (docs/algorithms.md#gtcc).
LOG_SIGMA_EPS = 1e-20
# compat="fixed": floor on sigma^2 inside the optional log-sigma term (like TCC's clamp,
# docs/reference-bugs.md#tcc-variance-about-wrong-mean).
VAR_EPS = 1e-12
# Floor on the variance of the drop logits before the standardisation (both modes; std >= 1e-6):
# reached by a (near-)constant set of logits or N = 1, where the reference divides 0 by 0.
STD_VAR_EPS = 1e-12


@dataclass
class GTCCDetails:
    """What one call drew, fitted and computed. Pairs are ``ordered_pairs(B)``: row-major (i, j),
    i != j, primary i, secondary j; P = B (B - 1)."""

    samples: torch.Tensor        # (B, S) long: sampled frames of each primary, sorted, -1 = none
    directions: torch.Tensor     # (B,) bool: window direction of each primary, True = forward
    gmm: GMMFit                  # components (P, S, K, T), weights (P, S, K), ok (P, S)
    primary: torch.Tensor        # (P,) long
    secondary: torch.Tensor      # (P,) long
    pair_losses: torch.Tensor    # (P,) sum of the frame terms of each pair, 0 where skipped
    pair_skipped: torch.Tensor   # (P,) bool: a fit of the pair failed (or M < 2), pair left out
    n_failed_fits: torch.Tensor  # () long: failed fits among the real (pair, sampled frame) slots
    n_skipped_pairs: torch.Tensor  # () long


def draw_samples(mask: torch.Tensor, num_samples: int = NUM_SAMPLES,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """A sorted uniform subset of min(num_samples, N_b) real frames per video
    (docs/algorithms.md#gtcc, per-primary step 2).

    mask (B, T) -> (B, S) long, S = min(num_samples, T), padded with -1. One ``torch.rand((B, T))``
    draw on the generator's device (CPU for the default generator): the real frames with the
    smallest keys are taken, so every subset of that size is equally likely."""
    b, t = mask.shape
    device = generator.device if generator is not None else torch.device("cpu")
    # to_device: through pinned memory, asynchronously (no wait for the GPU's queue)
    keys = to_device(torch.rand((b, t), generator=generator, device=device),
                     mask.device)                                              # (B, T)
    keys = torch.where(mask, keys, 2.0)          # padded frames sort after every real frame
    s = min(num_samples, t)
    picked = keys.argsort(dim=1)[:, :s]                                        # (B, S)
    real = torch.arange(s, device=mask.device)[None, :] < mask.sum(1, keepdim=True)  # (B, S)
    picked = torch.where(real, picked, t).sort(dim=1).values
    return torch.where(real, picked, -1)


def draw_directions(batch: int, generator: torch.Generator | None = None,
                    device: torch.device | None = None) -> torch.Tensor:
    """Forward with probability 1/2, one direction per primary (docs/algorithms.md#gtcc).
    (B,) bool."""
    gen_device = generator.device if generator is not None else torch.device("cpu")
    draw = torch.rand((batch,), generator=generator, device=gen_device) < 0.5
    return draw if device is None else to_device(draw, torch.device(device))


def window_mask(lengths: torch.Tensor, samples: torch.Tensor, directions: torch.Tensor,
                delta: float, t: int) -> torch.Tensor:
    """The cycle-back window Omega of each sampled row: (B, S, T) bool (docs/algorithms.md#gtcc).

    The reference's quirks are kept (docs/reference-bugs.md#gtcc-window-mask-quirks):
    w = round(N delta), half to even. Forward: r <= c <= r + w - 1. Backward:
    r - w <= c <= r - 1, which excludes the anchor c = r. Both: the corner blocks
    r, c < w and r, c >= N - w. w = 0 (N delta < 0.5): every real frame (the reference's
    -0 slice, handled explicitly here). Only real frames c < N; padded sample slots (-1) get
    the row of frame 0. Every row is non-empty: the forward band holds c = r, the backward band
    holds c = r - 1 when r >= w and the first corner holds c = 0 when r < w."""
    n = lengths.to(samples.device)[:, None, None]                              # (B, 1, 1)
    # torch.round rounds half to even like Python's round; N delta is the same float64 product.
    w = torch.round(n.to(torch.float64) * delta).to(torch.long)                # (B, 1, 1)
    r = samples.clamp_min(0)[:, :, None]                                       # (B, S, 1)
    c = torch.arange(t, device=samples.device)[None, None, :]                  # (1, 1, T)
    forward = (c >= r) & (c <= r + w - 1)
    backward = (c >= r - w) & (c <= r - 1)
    band = torch.where(directions[:, None, None], forward, backward)           # (B, S, T)
    corners = ((r < w) & (c < w)) | ((r >= n - w) & (c >= n - w))
    return (band | corners | (w == 0)) & (c < n)


def _sq_distances_centered(a: torch.Tensor, b: torch.Tensor, center: torch.Tensor) -> torch.Tensor:
    """||a_x - b_y||^2 for a (P, S, K, D), b (P, T, D) -> (P, S, K, T), exact >= 0.

    Expanded form (no (P, S, K, T, D) difference tensor: 1.1 GB at B = 8, T = 128) after
    subtracting a per-pair center (detached: distances do not depend on it), which keeps the
    cancellation error at eps * spread^2 instead of eps * ||x||^2."""
    a = a - center[:, None, None, :]                                           # (P, S, K, D)
    b = b - center[:, None, :]                                                 # (P, T, D)
    cross = torch.einsum("pskd,ptd->pskt", a, b)                               # (P, S, K, T)
    sq = a.square().sum(-1)[..., None] + b.square().sum(-1)[:, None, None, :] - 2.0 * cross
    return sq.clamp_min(0.0)


def _as_sample_tensor(samples, mask: torch.Tensor, check: bool) -> torch.Tensor:
    """Explicit samples -> (B, S) long with -1 padding, checked against the lengths when
    ``check`` (a host sync on accelerators)."""
    b = mask.shape[0]
    if isinstance(samples, (list, tuple)):
        if len(samples) != b:
            raise ValueError(f"samples must hold one index tensor per video ({b}), "
                             f"got {len(samples)}")
        rows = [torch.as_tensor(s, dtype=torch.long, device=mask.device).reshape(-1)
                for s in samples]
        width = max((len(r) for r in rows), default=0)
        out = torch.full((b, max(width, 1)), -1, dtype=torch.long, device=mask.device)
        for k, r in enumerate(rows):
            out[k, :len(r)] = r
        samples = out
    samples = torch.as_tensor(samples, device=mask.device)
    if samples.dim() != 2 or samples.shape[0] != b or samples.dtype != torch.long:
        raise ValueError(f"samples must be a (B, S) long tensor with -1 padding (B = {b}), got "
                         f"{tuple(samples.shape)} {samples.dtype}")
    lengths = mask.sum(1, keepdim=True)
    if check and bool(((samples < -1) | (samples >= lengths)).any()):
        raise ValueError("samples must be -1 or real frame indices 0 <= s < N_b of their video")
    return samples


def _as_gmm(gmm, p: int, s: int, k: int, t: int, like: torch.Tensor) -> GMMFit:
    """A caller's GMM -> GMMFit with components (P, S, K, T), weights (P, S, K), ok (P, S)."""
    if not isinstance(gmm, GMMFit):
        components, weights = gmm
        gmm = GMMFit(components=components, weights=weights)
    if gmm.components.shape != (p, s, k, t) or gmm.weights.shape != (p, s, k):
        raise ValueError(f"gmm components must be (P, S, K, T) = {(p, s, k, t)} and weights "
                         f"(P, S, K), got {tuple(gmm.components.shape)} and "
                         f"{tuple(gmm.weights.shape)}")
    ok = gmm.ok if gmm.ok is not None else torch.ones(p, s, dtype=torch.bool, device=like.device)
    return GMMFit(components=gmm.components.detach().to(like),
                  weights=gmm.weights.detach().to(like), ok=ok.to(like.device), means=gmm.means,
                  objective=gmm.objective)


def gtcc_loss_batch(x: torch.Tensor, mask: torch.Tensor, *, drop: torch.Tensor | None = None,
                    epoch: int = 0, n_components: int = 15, delta: float = 0.2,
                    gamma: float = 0.95, softmax_temp: float = 0.1, max_gmm_iters: int = 8,
                    alignment_variance: float = 0.0, num_samples: int = NUM_SAMPLES,
                    generator: torch.Generator | None = None,
                    samples: torch.Tensor | Sequence[torch.Tensor] | None = None,
                    directions: torch.Tensor | None = None,
                    gmm: GMMFit | tuple[torch.Tensor, torch.Tensor] | None = None,
                    return_details: bool = False, drop_floor_eps: float = 1e-3,
                    compat: Compat = "fixed", reduction: Reduction = "reference"):
    """GTCC loss of a padded batch (docs/algorithms.md#gtcc): scalar, or (scalar, GTCCDetails).

    x (B, T, D) embeddings, mask (B, T) bool with real frames first (a prefix mask, as
    ``pad_sequences`` makes); drop (B, D+1) the per-video drop vectors of the model's drop branch
    (docs/algorithms.md#drop-branch) or None for no drop term (as gamma = 1). Padded positions
    of x never matter (they are zeroed first). Fewer than 2 videos: a zero connected to the graph
    (docs/algorithms.md#pairs-and-reduction).

    Defaults are the EgoProceL / cmu / egtea values (docs/algorithms.md#gtcc and
    docs/algorithms.md#defaults): K = ``n_components`` 15, ``delta`` 0.2 (window width
    w = round(N delta), 0.05 <= delta <= 1), ``gamma`` 0.95 (drop floor d_min = gamma^(epoch+1);
    gamma < 1 turns the drop term on), tau = ``softmax_temp`` 0.1, ``max_gmm_iters`` 8 L-BFGS
    steps, ``alignment_variance`` 0 (the optional lambda_v log sigma term). Other datasets use
    K 5, delta 0.5, gamma 1. The reference config overwrites gamma with ``n_components``
    whenever K is given; here gamma is independent
    (docs/reference-bugs.md#gtcc-gamma-overwritten-by-k).

    Randomness (docs/algorithms.md#gtcc, per-primary steps 2-3), drawn from ``generator``
    (None: torch's default CPU generator) in this order, each only when not passed in:
    * ``samples`` (B, S) long, padded with -1, or a list of B index tensors: the sorted subset of
      min(``num_samples``, N_i) real frames of each primary, shared by all its secondaries
      (``draw_samples``: one torch.rand((B, T)), so the draw depends on the padded T);
    * ``directions`` (B,) bool, True = forward window (``draw_directions``: one torch.rand((B,))).
    ``gmm`` passes the fits in (a ``GMMFit``, or (components (P, S, K, T), weights (P, S, K)),
    pairs in ``ordered_pairs`` order); otherwise every (pair, sampled frame) distribution is fitted
    at once by ``fit_gmm`` on x's device (detached, docs/algorithms.md#gtcc-mixture-fit). A
    failed fit (M < 2, non-finite alpha, non-finite or negative J) skips its whole pair, as the
    fork does (the original release and the fork's early snapshot exit); the count is in the
    details.

    compat="fixed" (default) vs compat="reference" (the numbers of the fork's early snapshot):
    * exp underflow (docs/reference-bugs.md#gtcc-exp-underflow): alpha is a max-shifted softmax
      and beta a masked log-sum-exp softmax over the window, without the +1e-6. Reference:
      exp(-d/tau) normalised by its sum (alpha) and by its sum + 1e-6 (beta). In float32
      exp(-d/tau) underflows once d > ~10.4 (tau 0.1); then an alpha row is 0/0 = NaN, whose fit
      fails and skips the pair, and a beta row is 0 / 1e-6 = 0, so mu = 0 and e = s^2 (the
      documented explosion). The reference would also raise on its NaN/Inf check and skip the
      batch; here the value is returned as it is.
    * unbounded drop term (docs/reference-bugs.md#gtcc-drop-term-unbounded): the drop term is
      b A + (1 - b) / max(A, ``drop_floor_eps``) (bounded); reference: b A + (1 - b) / A,
      infinite for A = 0 (e.g. a 1-frame primary, or a perfect cycle).
    * optional log-sigma term (alignment_variance > 0): fixed lambda_v * log(sqrt(max(sigma^2,
      1e-12))), reference lambda_v * log(sqrt(sigma^2) + 1e-20) (an infinite gradient at 0).
    Both modes: the loop runs over |S| = min(20, N) sampled frames (the reference indexes 20
    and fails on N < 20, docs/reference-bugs.md#gtcc-fixed-twenty-samples); the window quirks
    of ``window_mask`` (w = 0 is an explicit full mask); the detached batched fit
    (docs/reference-bugs.md#gtcc-mixture-fits-sequential); the drop logits are standardised
    with the unbiased std over the primary's N frames, floored (only for a constant set of
    logits or N = 1, where the reference gives NaN).

    reduction="reference" (default, docs/algorithms.md#pairs-and-reduction): the plain sum over
    ordered pairs and over the sampled frames, as the pipeline description's lambda values assume
    (docs/reference-bugs.md#inconsistent-loss-reductions). reduction="mean": the mean over the
    non-skipped ordered pairs of (pair loss / |S_i|), |S_i| = min(num_samples, N_i) the number of
    sampled frames of the pair's primary, i.e. the mean frame term.

    The checks that read data (mask is a prefix mask, every video has a frame, passed samples
    are real frames) cost a host sync on a GPU: they are skipped there inside
    ``runtime.trusted_inputs()`` (the training loop's batches hold them by construction), as
    every loss's are. The shape checks always run.
    """
    check_compat(compat, reduction)
    if not 0.05 <= delta <= 1.0:
        raise ValueError(f"delta must satisfy 0.05 <= delta <= 1, got {delta}")
    if softmax_temp <= 0 or n_components < 1 or num_samples < 1 or max_gmm_iters < 0:
        raise ValueError("softmax_temp must be > 0, n_components and num_samples >= 1, "
                         "max_gmm_iters >= 0")
    if x.dim() != 3 or mask.shape != x.shape[:2]:
        raise ValueError(f"x must be (B, T, D) and mask (B, T), got {tuple(x.shape)} and "
                         f"{tuple(mask.shape)}")
    b, t, dim = x.shape
    mask = mask.to(device=x.device, dtype=torch.bool)
    check = checks_values(x)
    lengths = mask.sum(1)                                                      # (B,)
    if check and bool((mask != (torch.arange(t, device=x.device)[None, :]
                                < lengths[:, None])).any()):
        raise ValueError("mask must mark each video's real frames first (a prefix mask)")
    if drop is not None and drop.shape != (b, dim + 1):
        raise ValueError(f"drop must be (B, D+1) = {(b, dim + 1)}, got {tuple(drop.shape)}")
    if check and b >= 2 and bool((lengths < 1).any()):
        raise ValueError("every video needs at least one real frame")

    if samples is None:
        samples = draw_samples(mask, num_samples, generator)
    else:
        samples = _as_sample_tensor(samples, mask, check)
    if directions is None:
        directions = draw_directions(b, generator, x.device)
    directions = torch.as_tensor(directions, device=x.device).to(torch.bool).reshape(b)

    x = torch.where(mask[..., None], x, 0.0)       # padded garbage (even NaN) never enters
    pi_idx, pj_idx = ordered_pairs(b, device=x.device)                          # (P,), (P,)
    p, s = pi_idx.numel(), samples.shape[1]
    k = n_components
    if p == 0:  # fewer than 2 videos: no alignment loss (docs/algorithms.md#pairs-and-reduction)
        zero = x.sum() * 0.0 + (drop.sum() * 0.0 if drop is not None else 0.0)
        if not return_details:
            return zero
        empty = x.new_zeros(0)
        fit = GMMFit(components=x.new_zeros(0, s, k, t), weights=x.new_zeros(0, s, k),
                     ok=torch.zeros(0, s, dtype=torch.bool, device=x.device))
        none = torch.zeros((), dtype=torch.long, device=x.device)
        return zero, GTCCDetails(samples, directions, fit, pi_idx, pj_idx, empty,
                                 torch.zeros(0, dtype=torch.bool, device=x.device), none, none)

    real_slot = samples[pi_idx] >= 0                                            # (P, S)
    s_idx = samples.clamp_min(0)                                               # (B, S) safe
    x_s = torch.gather(x, 1, s_idx[..., None].expand(b, s, dim))               # (B, S, D) u_s
    u_s, u, v = x_s[pi_idx], x[pi_idx], x[pj_idx]                              # (P,S,D) (P,T,D)x2
    mask_u, mask_v = mask[pi_idx], mask[pj_idx]                                # (P, T)
    m_len = lengths[pj_idx]                                                    # (P,) M

    # Step numbers: the per-secondary steps of docs/algorithms.md#gtcc.
    # Steps 2-3: soft neighbours alpha_s over V's real frames, then the (detached) fits.
    if gmm is None:
        with torch.no_grad():
            d_alpha = pairwise_distances(u_s, v)                               # (P, S, T)
            if compat == "fixed":
                logits = torch.where(mask_v[:, None, :], -d_alpha / softmax_temp, -torch.inf)
                alpha = torch.softmax(logits, dim=-1)                          # (P, S, T)
            else:
                raw = torch.where(mask_v[:, None, :], torch.exp(-d_alpha / softmax_temp), 0.0)
                alpha = raw / raw.sum(-1, keepdim=True)                        # NaN if all 0
            # One fit per (pair, sampled frame) slot, E = P S; a padded slot gets M = 0, an
            # inactive fit that costs nothing (fit_gmm: ok False), and the same stand-in values
            # as before (no fit, ok True, weights 1/K). No boolean index: no host sync.
            fitted = fit_gmm(alpha.reshape(p * s, t),                          # (E, T)
                             torch.where(real_slot, m_len[:, None], 0).reshape(-1),  # (E,) M
                             n_components=k, max_steps=max_gmm_iters)
            real = real_slot.reshape(p, s)                                     # (P, S)
            gmm = GMMFit(
                components=torch.where(real[..., None, None],                  # (P, S, K, T)
                                       fitted.components.to(x.dtype).reshape(p, s, k, t), 0.0),
                weights=torch.where(real[..., None],                           # (P, S, K)
                                    fitted.weights.to(x.dtype).reshape(p, s, k), 1.0 / k),
                ok=fitted.ok.reshape(p, s) | ~real,                            # (P, S)
                means=torch.where(real[..., None], fitted.means.to(x.dtype).reshape(p, s, k),
                                  0.0),
                objective=torch.where(real, fitted.objective.to(x.dtype).reshape(p, s), 0.0),
                n_evals=fitted.n_evals.reshape(p, s))
    else:
        gmm = _as_gmm(gmm, p, s, k, t, x)

    failed = real_slot & ~gmm.ok                                               # (P, S)
    pair_ok = ~failed.any(-1)                                                  # (P,)
    use = real_slot & pair_ok[:, None]                                         # (P, S)
    # Skipped pairs and padded slots get a stand-in fit (all mass on frame 0, uniform weights)
    # so that nothing non-finite enters the graph; their terms are masked out below.
    stand_in = (torch.arange(t, device=x.device) == 0).to(x.dtype)    # (T,) (no item write)
    comps = torch.where(use[..., None, None], gmm.components, stand_in)        # (P, S, K, T)
    weights = torch.where(use[..., None], gmm.weights, 1.0 / k)                # (P, S, K)

    # Step 4: K soft neighbours per sampled frame; the gradient flows through V only.
    v_tilde = torch.einsum("pskm,pmd->pskd", comps, v)                         # (P, S, K, D)

    # Step 5: windowed cycle-back over the primary's real frames.
    omega = window_mask(lengths, samples, directions, delta, t)[pi_idx]        # (P, S, T)
    center = ((u * mask_u[..., None]).sum(1) / lengths[pi_idx, None]).detach()  # (P, D)
    d_beta = _sq_distances_centered(v_tilde, u, center).clamp_min(SQRT_EPS).sqrt()  # (P,S,K,T)
    allowed = omega[:, :, None, :]                                             # (P, S, 1, T)
    if compat == "fixed":
        beta = torch.softmax(torch.where(allowed, -d_beta / softmax_temp, -torch.inf), dim=-1)
    else:
        raw = torch.where(allowed, torch.exp(-d_beta / softmax_temp), 0.0)
        beta = raw / (raw.sum(-1, keepdim=True) + BETA_EPS)                   # (P, S, K, T)

    # Steps 6-7: moments and the per-component error.
    frames = torch.arange(t, device=x.device, dtype=x.dtype)                   # (T,)
    mu = (beta * frames).sum(-1)                                               # (P, S, K)
    anchor = samples[pi_idx].clamp_min(0).to(x.dtype)                          # (P, S)
    err = (anchor[..., None] - mu).square()                                    # (P, S, K)
    if alignment_variance > 0:
        var = (beta * (frames - mu[..., None]).square()).sum(-1)               # (P, S, K)
        if compat == "fixed":
            err = err + alignment_variance * torch.log(var.clamp_min(VAR_EPS).sqrt())
        else:
            err = err + alignment_variance * torch.log(var.sqrt() + LOG_SIGMA_EPS)

    # Step 8: mixture error A_s.
    a_err = (weights * err).sum(-1)                                            # (P, S)

    # Step 9 with the drop weights of step 1 (secondary's drop vector on the primary's frames).
    if drop is not None and gamma < 1:
        d_min = gamma ** (epoch + 1)
        dvec = drop[pj_idx]                                                    # (P, D+1)
        z = torch.einsum("ptd,pd->pt", u, dvec[:, :dim]) + dvec[:, dim:]       # (P, T)
        n_u = lengths[pi_idx, None].to(x.dtype)                                # (P, 1)
        z_mean = torch.where(mask_u, z, 0.0).sum(-1, keepdim=True) / n_u       # (P, 1)
        z_var = (torch.where(mask_u, z - z_mean, 0.0).square().sum(-1, keepdim=True)
                 / (n_u - 1).clamp_min(1))                                     # (P, 1) unbiased
        z_hat = (z - z_mean) / z_var.clamp_min(STD_VAR_EPS).sqrt()             # (P, T)
        b_all = d_min + (1.0 - d_min) * torch.sigmoid(z_hat)                   # (P, T)
        b_s = torch.gather(b_all, 1, samples[pi_idx].clamp_min(0))             # (P, S)
        a_den = a_err.clamp_min(drop_floor_eps) if compat == "fixed" else a_err
        term = b_s * a_err + (1.0 - b_s) / a_den
    else:
        term = a_err

    pair_losses = torch.where(use, term, 0.0).sum(-1)                          # (P,)
    if reduction == "reference":
        loss = pair_losses.sum()
    else:
        n_frames = real_slot.sum(-1).clamp_min(1).to(x.dtype)                  # (P,) |S_i|
        per_frame = torch.where(pair_ok, pair_losses / n_frames, 0.0)
        loss = per_frame.sum() / pair_ok.sum().clamp_min(1).to(x.dtype)
    if drop is not None and not gamma < 1:
        loss = loss + drop.sum() * 0.0           # keep the unused drop branch in the graph
    if not return_details:
        return loss
    details = GTCCDetails(samples=samples, directions=directions, gmm=gmm, primary=pi_idx,
                          secondary=pj_idx, pair_losses=pair_losses, pair_skipped=~pair_ok,
                          n_failed_fits=failed.sum(), n_skipped_pairs=(~pair_ok).sum())
    return loss, details


def gtcc_loss(seqs: Sequence[torch.Tensor], *, dropouts: Sequence[torch.Tensor] | None = None,
              **kwargs):
    """List form of ``gtcc_loss_batch``: seqs (T_i, D) tensors, dropouts (D+1,) vectors or None."""
    x, mask = pad_sequences(seqs)
    drop = torch.stack(list(dropouts)) if dropouts is not None else None
    return gtcc_loss_batch(x, mask, drop=drop, **kwargs)
