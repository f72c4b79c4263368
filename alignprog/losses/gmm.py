"""Batched fit of GTCC's soft-neighbour Gaussian mixtures (see
docs/algorithms.md#gtcc-mixture-fit and docs/reference-bugs.md#gtcc-mixture-fits-sequential).

GTCC fits one K-component mixture of discrete Gaussians to every soft-neighbour distribution
alpha_s (one per ordered pair and sampled frame: 40 fits at B = 2). The reference runs them one
after the other on the CPU with ``torch.optim.LBFGS``. Here every fit of a batch runs at once, on
the inputs' device, with the same objective, the same initialisation and the same optimiser:
``lbfgs_batched`` replays ``torch.optim.LBFGS`` (lr 0.5, max_iter 4 per step, history 10,
strong-Wolfe line search, default tolerances) element by element in lockstep. Each fit keeps its
own history, step sizes, line-search bracket and stopping state; masks freeze the fits that have
stopped, so a fit's result does not depend on the other fits of the batch (up to summation order
in the reductions). The test compares it with ``torch.optim.LBFGS`` run on each vector.

``fit_gmm(..., backend=...)`` picks how the fits run: "torch" is ``lbfgs_batched`` in torch ops
(any device; the reference implementation, with a few host syncs per L-BFGS iteration), "triton"
is ``alignprog.losses.gmm_triton``, the same replay as one kernel launch with one program per fit
and no host sync, "auto" (default) Triton on CUDA when it imports, torch otherwise.

Everything here is detached (as in the reference, the fit gives constants: no gradient reaches
the embeddings). Pure tensor functions, no config import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from alignprog.losses import gmm_triton

Backend = Literal["auto", "torch", "triton"]

# Guard inside both logarithms of the symmetric KL (docs/algorithms.md#gtcc-mixture-fit).
KL_EPS = 1e-30
# Floor on the "variances" of the components (docs/algorithms.md#gtcc-mixture-fit).
VAR_FLOOR = 0.5
# torch.optim.LBFGS defaults, which the reference leaves untouched.
TOLERANCE_GRAD = 1e-7
TOLERANCE_CHANGE = 1e-9
# Condition on y.s before a curvature pair enters the history (torch.optim.LBFGS).
CURVATURE_EPS = 1e-10
# Strong-Wolfe constants of torch.optim.lbfgs._strong_wolfe.
WOLFE_C1 = 1e-4
WOLFE_C2 = 0.9


@dataclass
class GMMFit:
    """Fitted mixtures; leading dims ``...`` are the fits (E, or (P, S) inside GTCC).

    ``components`` rows are normalised over the real M of each fit and exactly 0 beyond it.
    ``ok`` is False for a failed fit (M < 2, non-finite input, non-finite or negative final J);
    the values of a failed fit are meaningless. ``means`` (raw, unclipped) and ``objective``
    (the final J) are None when a caller built the fit by hand."""

    components: torch.Tensor                 # (..., K, M) G, one discrete Gaussian per row
    weights: torch.Tensor                    # (..., K) pi = softmax(rho)
    ok: torch.Tensor | None = None           # (...,) bool
    means: torch.Tensor | None = None        # (..., K) mu as optimised (before the clip)
    objective: torch.Tensor | None = None    # (...,) final symmetric KL J
    n_evals: torch.Tensor | None = None      # (...,) long: objective evaluations of each fit


def init_params(lengths: torch.Tensor, n_components: int, dtype: torch.dtype) -> torch.Tensor:
    """The reference initialisation (docs/algorithms.md#gtcc-mixture-fit), flattened as
    [means, variances, logits]: (E,) -> (E, 3K).

    mu_k = 1 + k (M - 2) / K, v_k = M, rho_k = 1. The order matches the reference's parameter
    list, so the flat L-BFGS vectors (and their dot products) are the same."""
    m = lengths.to(dtype)[:, None]                                             # (E, 1)
    k = torch.arange(n_components, device=lengths.device, dtype=dtype)[None, :]  # (1, K)
    means = 1.0 + k * (m - 2.0) / n_components                                 # (E, K)
    variances = m.expand_as(means)                                             # (E, K)
    logits = torch.ones_like(means)                                            # (E, K)
    return torch.cat([means, variances, logits], dim=-1)                       # (E, 3K)


def _clip_mean_and_variance(means: torch.Tensor, variances: torch.Tensor, top: torch.Tensor
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """clip(mu, 0, M - 1) and max(v, 0.5) (docs/algorithms.md#gtcc-mixture-fit), (E, K) each,
    top (E, 1) = M - 1.

    The gradient passes where the value is inside the bounds or ON them, as torch.clamp's did in
    the PyTorch releases the reference ran on; PyTorch 2.14 changed torch.clamp to give 0 on the
    bound. Written with where so every version fits alike. It matters: for M = 2 all the initial
    means sit exactly on M - 1 = 1."""
    inside = (means >= 0) & (means <= top)
    mu = torch.where(inside, means, torch.minimum(means.detach().clamp_min(0), top))
    var = torch.where(variances >= VAR_FLOOR, variances, torch.full_like(variances, VAR_FLOOR))
    return mu, var


def gmm_components(params: torch.Tensor, lengths: torch.Tensor, m_max: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Components G (E, K, m_max) and weights pi (E, K) from flat params (E, 3K).

    g_k(m) ~ exp(-(m - clip(mu_k, 0, M - 1))^2 / (2 max(v_k, 0.5))), normalised over the real
    m < M of each fit (docs/algorithms.md#gtcc-mixture-fit); the 1/(sigma sqrt(2 pi)) factor
    cancels. The clipped mean puts the exponent of the nearest real m above -0.25, so the
    normaliser never underflows."""
    means, variances, logits = params.chunk(3, dim=-1)                         # (E, K) each
    top = (lengths - 1).to(params.dtype)[:, None]                              # (E, 1) M - 1
    mu, var = _clip_mean_and_variance(means, variances, top)                   # (E, K) each
    m = torch.arange(m_max, device=params.device, dtype=params.dtype)          # (m_max,)
    real = m[None, :] < lengths[:, None]                                       # (E, m_max)
    expo = -(m - mu[..., None]).square() / (2.0 * var[..., None])             # (E, K, m_max)
    # Values below the smallest normal number are set to 0 rather than computed as subnormals,
    # which are ~100x slower on CPUs; this changes g by less than finfo.tiny.
    log_tiny = math.log(torch.finfo(params.dtype).tiny)
    keep = real[:, None, :] & (expo > log_tiny)                                # (E, K, m_max)
    g = torch.where(keep, torch.exp(expo.clamp_min(log_tiny)), 0.0)
    g = g / g.sum(-1, keepdim=True)
    return g, torch.softmax(logits, dim=-1)


def symmetric_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """J = sum p (log(p+eps) - log(q+eps)) + sum q (log(q+eps) - log(p+eps)), (E, M) -> (E,).

    Two sums added, as docs/algorithms.md#gtcc-mixture-fit writes it: J >= 0 in exact
    arithmetic, and rounding can make a near-perfect fit slightly negative, which the reference
    (and ``fit_gmm``) count as failed.
    Padded entries (p = q = 0) add exactly 0."""
    log_p = torch.log(p + KL_EPS)
    log_q = torch.log(q + KL_EPS)
    return (p * (log_p - log_q)).sum(-1) + (q * (log_q - log_p)).sum(-1)


def gmm_objective(params: torch.Tensor, p: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Symmetric KL between each target p (E, M) and its mixture q = pi^T G: (E,)."""
    g, pi = gmm_components(params, lengths, p.shape[-1])
    q = torch.einsum("ek,ekm->em", pi, g)                                      # (E, M)
    return symmetric_kl(p, q)


def gmm_value_and_grad(params: torch.Tensor, p: torch.Tensor, lengths: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """J (E,) and dJ/dparams (E, 3K) in closed form: what autograd gives through
    ``gmm_objective`` (tested), in about a third of the work on the (E, K, M) tensors.

    With c_m = dJ/dq_m = log(q_m+eps) - log(p_m+eps) + (q_m - p_m)/(q_m+eps), cbar_k =
    sum_m G_km c_m and w_km = pi_k G_km (c_m - cbar_k) (the gradient on the exponent of g_km):
    dJ/dmu_k = sum_m w_km (m - mu_k)/v_k, dJ/dv_k = sum_m w_km (m - mu_k)^2/(2 v_k^2), each
    zero where the clip / floor is active (strictly outside the bounds, see
    ``_clip_mean_and_variance``), and dJ/drho_k = pi_k (cbar_k - sum_k' pi_k' cbar_k')."""
    means, variances, logits = params.chunk(3, dim=-1)                         # (E, K) each
    top = (lengths - 1).to(params.dtype)[:, None]                              # (E, 1)
    inside = (means >= 0) & (means <= top)                                     # (E, K)
    mu, var = _clip_mean_and_variance(means, variances, top)                   # (E, K) each
    m = torch.arange(p.shape[-1], device=params.device, dtype=params.dtype)    # (M,)
    real = m[None, :] < lengths[:, None]                                       # (E, M)
    diff = m - mu[..., None]                                                   # (E, K, M)
    expo = -diff.square() / (2.0 * var[..., None])                             # (E, K, M)
    log_tiny = math.log(torch.finfo(params.dtype).tiny)
    g = torch.where(real[:, None, :] & (expo > log_tiny), torch.exp(expo.clamp_min(log_tiny)), 0.0)
    g = g / g.sum(-1, keepdim=True)                                            # (E, K, M) G
    pi = torch.softmax(logits, dim=-1)                                         # (E, K)
    q = torch.einsum("ek,ekm->em", pi, g)                                      # (E, M)
    log_p = torch.log(p + KL_EPS)
    log_q = torch.log(q + KL_EPS)
    j = (p * (log_p - log_q)).sum(-1) + (q * (log_q - log_p)).sum(-1)         # (E,)
    c = log_q - log_p + (q - p) / (q + KL_EPS)                                 # (E, M) dJ/dq
    c_bar = torch.einsum("ekm,em->ek", g, c)                                   # (E, K) dJ/dpi
    w = pi[..., None] * g * (c[:, None, :] - c_bar[..., None])                 # (E, K, M)
    w_diff = w * diff                                                          # (E, K, M)
    d_means = torch.where(inside, w_diff.sum(-1) / var, 0.0)
    d_vars = torch.where(variances >= VAR_FLOOR,
                         (w_diff * diff).sum(-1) / (2.0 * var.square()), 0.0)
    d_logits = pi * (c_bar - (pi * c_bar).sum(-1, keepdim=True))
    return j, torch.cat([d_means, d_vars, d_logits], dim=-1)                   # (E,), (E, 3K)


# ------------------------------------------------------------------------------------------------
# Batched L-BFGS: torch.optim.LBFGS (strong-Wolfe) replayed for E independent problems at once.
# ------------------------------------------------------------------------------------------------

# fun(x_rows (R, n), rows (R,) long) -> (f (R,), g (R, n)): the objective of the listed problems.
Objective = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _evaluate(fun: Objective, x: torch.Tensor, sel: torch.Tensor, f_old: torch.Tensor,
              g_old: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(f, g) at x for the problems where ``sel``, the old values elsewhere. Only the selected
    rows are computed, so late line-search trials of a few fits cost a few rows, not E."""
    rows = sel.nonzero().squeeze(1)                                            # (R,)
    if rows.numel() == 0:
        return f_old, g_old
    f_rows, g_rows = fun(x[rows], rows)
    return f_old.index_copy(0, rows, f_rows.to(f_old.dtype)), g_old.index_copy(0, rows, g_rows)


def _where(cond: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """torch.where with an (E,) condition broadcast over the trailing dims of a and b."""
    while cond.dim() < max(torch.as_tensor(a).dim(), torch.as_tensor(b).dim()):
        cond = cond.unsqueeze(-1)
    return torch.where(cond, a, b)


def _put(arr: torch.Tensor, pos: torch.Tensor, val: torch.Tensor, sel: torch.Tensor
         ) -> torch.Tensor:
    """arr[e, pos[e]] = val[e] where sel[e]; arr (E, 2, ...), val (E, ...) (a bracket slot)."""
    slots = torch.arange(arr.shape[1], device=arr.device)
    hit = sel[:, None] & (slots[None, :] == pos[:, None])                      # (E, 2)
    return _where(hit, val.unsqueeze(1).expand_as(arr), arr)


def _take(arr: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """arr[e, pos[e]]: (E, 2, ...) -> (E, ...)."""
    return arr[torch.arange(arr.shape[0], device=arr.device), pos]


def _cubic_interpolate(x1, f1, g1, x2, f2, g2, lo=None, hi=None):
    """torch.optim.lbfgs._cubic_interpolate, elementwise over (E,) tensors."""
    if lo is None:
        lo = torch.where(x1 <= x2, x1, x2)
        hi = torch.where(x1 <= x2, x2, x1)
    d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
    d2_square = d1 ** 2 - g1 * g2
    d2 = d2_square.clamp_min(0).sqrt()
    pos_up = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
    pos_down = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
    min_pos = torch.where(x1 <= x2, pos_up, pos_down)
    clipped = torch.minimum(torch.maximum(min_pos, lo), hi)
    return torch.where(d2_square >= 0, clipped, (lo + hi) / 2.0)


def _strong_wolfe(fun: Objective, x, t, d, f, g, gtd, run, max_ls):
    """torch.optim.lbfgs._strong_wolfe for the fits where ``run`` (E,) is True.

    Bracketing, then zoom, each as a loop over trials in which every still-searching fit takes
    one trial; the others wait unchanged. Returns (f, g, t, n_evals), meaningful where ``run``."""
    d_norm = d.abs().amax(-1)                                                  # (E,)
    f_new, g_new = _evaluate(fun, x + t[:, None] * d, run, f, g)
    n_evals = run.long()
    ls_iter = torch.zeros_like(n_evals)
    gtd_new = (g_new * d).sum(-1)
    t_prev, f_prev, g_prev, gtd_prev = torch.zeros_like(t), f, g, gtd
    done = torch.zeros_like(run)
    # Bracket [a, b] per fit (slot 1 = slot 0 for a one-point bracket).
    b_t = torch.stack([t, t], 1)                                               # (E, 2)
    b_f = torch.stack([f, f], 1)                                               # (E, 2)
    b_g = torch.stack([g, g], 1)                                               # (E, 2, n)
    b_gtd = torch.stack([gtd, gtd], 1)                                         # (E, 2)

    # Bracketing phase.
    bracketing = run.clone()
    while True:
        live = bracketing & (ls_iter < max_ls)
        if not bool(live.any()):
            break
        armijo_fail = (f_new > f + WOLFE_C1 * t * gtd) | ((ls_iter > 1) & (f_new >= f_prev))
        wolfe = gtd_new.abs() <= -WOLFE_C2 * gtd
        two_point = live & (armijo_fail | (~wolfe & (gtd_new >= 0)))
        one_point = live & ~armijo_fail & wolfe
        b_t = _where(two_point, torch.stack([t_prev, t], 1), b_t)
        b_f = _where(two_point, torch.stack([f_prev, f_new], 1), b_f)
        b_g = _where(two_point, torch.stack([g_prev, g_new], 1), b_g)
        b_gtd = _where(two_point, torch.stack([gtd_prev, gtd_new], 1), b_gtd)
        b_t = _where(one_point, torch.stack([t, t], 1), b_t)
        b_f = _where(one_point, torch.stack([f_new, f_new], 1), b_f)
        b_g = _where(one_point, torch.stack([g_new, g_new], 1), b_g)
        done = done | one_point
        bracketing = bracketing & ~(two_point | one_point)
        cont = live & ~(two_point | one_point)
        if not bool(cont.any()):
            continue
        t_next = _cubic_interpolate(t_prev, f_prev, gtd_prev, t, f_new, gtd_new,
                                    lo=t + 0.01 * (t - t_prev), hi=t * 10)
        t_prev = _where(cont, t, t_prev)
        f_prev = _where(cont, f_new, f_prev)
        g_prev = _where(cont, g_new, g_prev)
        gtd_prev = _where(cont, gtd_new, gtd_prev)
        t = _where(cont, t_next, t)
        f_new, g_new = _evaluate(fun, x + t[:, None] * d, cont, f_new, g_new)
        gtd_new = _where(cont, (g_new * d).sum(-1), gtd_new)
        n_evals = n_evals + cont.long()
        ls_iter = ls_iter + cont.long()

    # Out of trials while bracketing: the bracket is [0, t] (no zoom follows, ls_iter == max_ls).
    exhausted = bracketing
    b_t = _where(exhausted, torch.stack([torch.zeros_like(t), t], 1), b_t)
    b_f = _where(exhausted, torch.stack([f, f_new], 1), b_f)
    b_g = _where(exhausted, torch.stack([g, g_new], 1), b_g)
    low = (b_f[:, 0] > b_f[:, 1]).long()                                       # (E,) 0 or 1

    # Zoom phase.
    insufficient = torch.zeros_like(run)
    zooming = run & ~done
    while True:
        zooming = zooming & ~done & (ls_iter < max_ls)
        zooming = zooming & ~((b_t[:, 1] - b_t[:, 0]).abs() * d_norm < TOLERANCE_CHANGE)
        if not bool(zooming.any()):
            break
        t_try = _cubic_interpolate(b_t[:, 0], b_f[:, 0], b_gtd[:, 0],
                                   b_t[:, 1], b_f[:, 1], b_gtd[:, 1])
        b_max, b_min = b_t.amax(1), b_t.amin(1)
        eps = 0.1 * (b_max - b_min)
        near = torch.minimum(b_max - t_try, t_try - b_min) < eps
        at_edge = insufficient | (t_try >= b_max) | (t_try <= b_min)
        moved = torch.where((t_try - b_max).abs() < (t_try - b_min).abs(), b_max - eps, b_min + eps)
        t_try = torch.where(near & at_edge, moved, t_try)
        insufficient = torch.where(zooming, near & ~at_edge, insufficient)
        t = _where(zooming, t_try, t)
        f_new, g_new = _evaluate(fun, x + t[:, None] * d, zooming, f_new, g_new)
        gtd_new = _where(zooming, (g_new * d).sum(-1), gtd_new)
        n_evals = n_evals + zooming.long()
        ls_iter = ls_iter + zooming.long()

        high = 1 - low
        f_low = _take(b_f, low)
        to_high = zooming & ((f_new > f + WOLFE_C1 * t * gtd) | (f_new >= f_low))
        to_low = zooming & ~to_high
        # Armijo fails or no lower than the low point: the trial replaces the high end.
        b_t = _put(b_t, high, t, to_high)
        b_f = _put(b_f, high, f_new, to_high)
        b_g = _put(b_g, high, g_new, to_high)
        b_gtd = _put(b_gtd, high, gtd_new, to_high)
        low = torch.where(to_high, (b_f[:, 0] > b_f[:, 1]).long(), low)
        high = 1 - low
        # Otherwise: Wolfe met -> done; if the slope points away, the old low becomes the high
        # end; the trial becomes the low end.
        done = done | (to_low & (gtd_new.abs() <= -WOLFE_C2 * gtd))
        flip = (to_low & ~(gtd_new.abs() <= -WOLFE_C2 * gtd)
                & (gtd_new * (_take(b_t, high) - _take(b_t, low)) >= 0))
        b_t = _put(b_t, high, _take(b_t, low), flip)
        b_f = _put(b_f, high, _take(b_f, low), flip)
        b_g = _put(b_g, high, _take(b_g, low), flip)
        b_gtd = _put(b_gtd, high, _take(b_gtd, low), flip)
        b_t = _put(b_t, low, t, to_low)
        b_f = _put(b_f, low, f_new, to_low)
        b_g = _put(b_g, low, g_new, to_low)
        b_gtd = _put(b_gtd, low, gtd_new, to_low)

    return _take(b_f, low), _take(b_g, low), _take(b_t, low), n_evals


def lbfgs_batched(fun: Objective, x: torch.Tensor, active: torch.Tensor, *, n_steps: int,
                  lr: float = 1.0, max_iter: int = 20, max_eval: int | None = None,
                  history_size: int = 100, tolerance_grad: float = TOLERANCE_GRAD,
                  tolerance_change: float = TOLERANCE_CHANGE, max_ls: int | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_steps`` calls of ``torch.optim.LBFGS(..., line_search_fn="strong_wolfe").step`` on E
    independent problems at once. x (E, n) start points; ``fun`` evaluates listed rows;
    ``active`` (E,) bool: inactive rows are never moved. Returns (x, number of evaluations (E,)).

    ``max_ls=None``: each line search may use the step's remaining evaluation budget,
    ``max_eval - evals so far``, as the installed PyTorch (2.14) does; an int gives a fixed
    trial cap (older PyTorch releases passed 25)."""
    if max_eval is None:
        max_eval = max_iter * 5 // 4
    e, n = x.shape
    hist_cap = history_size
    old_dirs = x.new_zeros(e, hist_cap, n)                                      # (E, H, n) y
    old_stps = x.new_zeros(e, hist_cap, n)                                      # (E, H, n) s
    ro = x.new_zeros(e, hist_cap)                                               # (E, H) 1/(y.s)
    n_hist = torch.zeros(e, dtype=torch.long, device=x.device)
    h_diag = x.new_ones(e)
    d = x.new_zeros(e, n)
    t = x.new_zeros(e)
    prev_g = x.new_zeros(e, n)
    prev_loss = x.new_zeros(e)
    n_iter_total = torch.zeros(e, dtype=torch.long, device=x.device)          # state["n_iter"]
    total_evals = torch.zeros(e, dtype=torch.long, device=x.device)
    slots = torch.arange(hist_cap, device=x.device)

    for _ in range(n_steps):
        f, g = _evaluate(fun, x, active, x.new_zeros(e), torch.zeros_like(x))
        evals = active.long()
        run = active & ~(g.abs().amax(-1) <= tolerance_grad)
        for n_iter in range(1, max_iter + 1):
            if not bool(run.any()):
                break
            n_iter_total = n_iter_total + run.long()
            first = run & (n_iter_total == 1)
            later = run & (n_iter_total > 1)

            # Curvature pair from the last move (torch: only when y.s > 1e-10; FIFO of H).
            y = g - prev_g
            s = d * t[:, None]
            ys = (y * s).sum(-1)
            append = later & (ys > CURVATURE_EPS)
            full = n_hist == hist_cap
            shift = append & full
            old_dirs = _where(shift, old_dirs.roll(-1, dims=1), old_dirs)
            old_stps = _where(shift, old_stps.roll(-1, dims=1), old_stps)
            ro = _where(shift, ro.roll(-1, dims=1), ro)
            pos = torch.where(full, hist_cap - 1, n_hist)
            hit = append[:, None] & (slots[None, :] == pos[:, None])           # (E, H)
            old_dirs = torch.where(hit[..., None], y[:, None, :], old_dirs)
            old_stps = torch.where(hit[..., None], s[:, None, :], old_stps)
            ro = torch.where(hit, (1.0 / ys)[:, None], ro)
            n_hist = torch.where(append & ~full, n_hist + 1, n_hist)
            h_diag = torch.where(append, ys / (y * y).sum(-1), h_diag)

            # Two-loop recursion over each fit's own history length.
            q = -g
            al = x.new_zeros(e, hist_cap)
            for i in range(hist_cap - 1, -1, -1):
                use = later & (i < n_hist)
                a_i = (old_stps[:, i] * q).sum(-1) * ro[:, i]
                al[:, i] = torch.where(use, a_i, 0.0)
                q = _where(use, q - a_i[:, None] * old_dirs[:, i], q)
            r = q * h_diag[:, None]
            for i in range(hist_cap):
                use = later & (i < n_hist)
                be_i = (old_dirs[:, i] * r).sum(-1) * ro[:, i]
                r = _where(use, r + old_stps[:, i] * (al[:, i] - be_i)[:, None], r)
            d = _where(first, -g, _where(later, r, d))

            prev_g = _where(run, g, prev_g)
            prev_loss = _where(run, f, prev_loss)
            t_first = torch.clamp(1.0 / g.abs().sum(-1), max=1.0) * lr
            t = torch.where(first, t_first, torch.where(later, torch.full_like(t, lr), t))

            gtd = (g * d).sum(-1)
            run = run & ~(gtd > -tolerance_change)
            if not bool(run.any()):
                break
            budget = (max_eval - evals) if max_ls is None else torch.full_like(evals, max_ls)
            f_ls, g_ls, t_ls, ls_evals = _strong_wolfe(fun, x, t, d, f, g, gtd, run, budget)
            t = _where(run, t_ls, t)
            x = _where(run, x + t[:, None] * d, x)
            f = _where(run, f_ls, f)
            g = _where(run, g_ls, g)
            evals = evals + torch.where(run, ls_evals, 0)

            stop = ((evals >= max_eval) | (g.abs().amax(-1) <= tolerance_grad)
                    | ((d * t[:, None]).abs().amax(-1) <= tolerance_change)
                    | ((f - prev_loss).abs() < tolerance_change))
            run = run & ~stop
        total_evals = total_evals + evals
    return x, total_evals


@torch.no_grad()
def fit_gmm(p: torch.Tensor, lengths: torch.Tensor, *, n_components: int = 15,
            max_steps: int = 8, lr: float = 0.5, max_iter: int = 4, history_size: int = 10,
            max_ls: int | None = None, backend: Backend = "auto") -> GMMFit:
    """Fit a K-component discrete-Gaussian mixture to every probability vector of a batch.

    p (E, M_max): row e is a distribution over its first ``lengths[e]`` entries (the rest is
    ignored). As docs/algorithms.md#gtcc-mixture-fit: initialisation ``init_params``, objective
    ``symmetric_kl``, optimiser L-BFGS (lr 0.5, max_iter 4 per step, history 10, strong-Wolfe)
    for ``max_steps`` steps, all fits at once (``lbfgs_batched``), in p's dtype and on p's
    device, without gradient (the reference's fits are detached too).

    Failures are per fit, never an exit as in the reference
    (docs/reference-bugs.md#gtcc-mixture-fits-sequential): M < 2 (the reference refuses it), a
    non-finite p (the reference's NaN alpha rows, docs/reference-bugs.md#gtcc-exp-underflow), or
    a final J that is non-finite or negative (the reference's failure test) give ``ok`` False;
    nothing is raised. ``max_ls``: see ``lbfgs_batched`` (None: the
    rule of the installed PyTorch, 2.14; 25: older releases).

    ``backend``: "torch" runs ``lbfgs_batched`` (any device and dtype), "triton" the one-launch
    kernel of ``gmm_triton`` (float32 / float64, CUDA, or CPU under TRITON_INTERPRET=1), "auto"
    Triton for float32 / float64 CUDA tensors when it imports, torch otherwise. Both give the same
    fits up to rounding (tests/test_gmm_triton.py); the Triton path makes no host sync.
    """
    if p.dim() != 2 or lengths.shape != p.shape[:1]:
        raise ValueError(f"p must be (E, M) with lengths (E,), got {tuple(p.shape)} and "
                         f"{tuple(lengths.shape)}")
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    kernel_dtype = p.dtype in (torch.float32, torch.float64)
    if backend == "auto":
        backend = ("triton" if p.is_cuda and kernel_dtype and gmm_triton.triton is not None
                   else "torch")
    if backend == "triton" and (gmm_triton.triton is None or not kernel_dtype):
        raise ValueError("backend='triton' needs the triton package and a float32 or float64 p, "
                         f"got {p.dtype}" + ("" if gmm_triton.triton else " (triton missing)"))
    p = p.detach()
    lengths = lengths.to(device=p.device, dtype=torch.long)
    m_max = p.shape[-1]
    real = torch.arange(m_max, device=p.device)[None, :] < lengths[:, None]    # (E, M)
    finite_in = torch.where(real, p, 0.0).isfinite().all(-1)
    p = torch.where(real, p, 0.0)
    active = (lengths >= 2) & finite_in
    # Rows that are not fitted get a uniform stand-in over min(M_max, 2) entries, so that no NaN
    # enters the batched arithmetic; they are never moved and come back with ok False.
    safe_lengths = torch.where(active, lengths, torch.full_like(lengths, min(m_max, 2)))
    safe_real = torch.arange(m_max, device=p.device)[None, :] < safe_lengths[:, None]  # (E, M)
    uniform = safe_real.to(p.dtype) / safe_lengths[:, None].to(p.dtype)
    safe_p = torch.where(active[:, None], p, uniform)                          # (E, M)

    def value_and_grad(params: torch.Tensor, rows: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        return gmm_value_and_grad(params, safe_p[rows], safe_lengths[rows])

    params = init_params(safe_lengths, n_components, p.dtype)                  # (E, 3K)
    max_eval = max_iter * 5 // 4                     # torch.optim.LBFGS's default
    if backend == "triton":
        params, _, n_evals = gmm_triton.lbfgs_gmm(
            safe_p, safe_lengths, active, params, n_components=n_components, n_steps=max_steps,
            lr=lr, max_iter=max_iter, max_eval=max_eval, history_size=history_size,
            max_ls=max_ls, tolerance_grad=TOLERANCE_GRAD, tolerance_change=TOLERANCE_CHANGE,
            curvature_eps=CURVATURE_EPS, wolfe_c1=WOLFE_C1, wolfe_c2=WOLFE_C2, kl_eps=KL_EPS,
            var_floor=VAR_FLOOR, log_tiny=math.log(torch.finfo(p.dtype).tiny))
    else:
        params, n_evals = lbfgs_batched(value_and_grad, params, active, n_steps=max_steps,
                                        lr=lr, max_iter=max_iter, max_eval=max_eval,
                                        history_size=history_size, max_ls=max_ls)
    g, pi = gmm_components(params, safe_lengths, m_max)
    q = torch.einsum("ek,ekm->em", pi, g)                                      # (E, M)
    j = symmetric_kl(safe_p, q)
    ok = active & j.isfinite() & (j >= 0) & params.isfinite().all(-1)
    return GMMFit(components=g, weights=pi, ok=ok, means=params[:, :n_components], objective=j,
                  n_evals=n_evals)
