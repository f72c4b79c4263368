"""GTCC's mixture fits as one Triton kernel, with no host sync (see
docs/algorithms.md#gtcc-mixture-fit and docs/reference-bugs.md#gtcc-mixture-fits-sequential).

``alignprog.losses.gmm.lbfgs_batched`` replays ``torch.optim.LBFGS`` (strong-Wolfe) over E fits in
lockstep with torch ops: every L-BFGS iteration is hundreds of small launches, and its loops end on
host syncs (``bool(run.any())``). Here one launch runs every fit: one program per fit, which runs
the whole replay by itself, with its own data-dependent loops (the line search's bracketing and
zoom), its own history and its own stopping tests. The formulas, the constants and the order of
the steps are those of ``lbfgs_batched`` / ``torch.optim.LBFGS``; the objective and its gradient
are the closed form of ``gmm_value_and_grad``, three passes over the M entries of the target in
blocks (normalisers; q, J and cbar; the gradient sums). So the result equals the torch path up to
the rounding of sums and of exp/log, which L-BFGS can amplify (see tests/test_gmm_triton.py).

Layout inside a program: the 3K parameters are a (4, KP) tile, rows means / "variances" / logits /
zero padding, KP = next power of 2 >= K; columns k >= K and row 3 hold 0 and stay 0 (their
gradient is 0). The history of curvature pairs (y, s, 1/(y.s)) lives in a scratch tensor of the
fit, a ring of H slots with the oldest pair at slot ``head``: read one pair at a time, it costs no
registers (the (H, 4, KP) history in registers spilled) and no select-and-sum to pick a slot.

No host sync: every shape comes from the inputs, and the kernel writes its results to tensors.
"""

from __future__ import annotations

import torch

from alignprog.runtime import to_device

try:  # Triton comes with CUDA builds of torch; without it the torch path serves everywhere.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

# Launch shape: columns of the target per (KP, BLOCK_M) tile of a pass over M, and warps per
# program. Read at each call (a benchmark may change them).
MAX_BLOCK_M = 64
NUM_WARPS = 4


def _constants(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """The float constants as a tensor of the compute dtype, read by the kernel: a float kernel
    argument would be float32, and Triton rounds constexpr floats to float32 in comparisons,
    where torch compares in the tensor's dtype. Built on the host, copied through pinned memory
    without a sync."""
    return to_device(torch.tensor(values, dtype=like.dtype), like.device)


def _launch_shape(m_max: int) -> tuple[int, int]:
    """(BLOCK_M, num_warps)."""
    return min(MAX_BLOCK_M, max(16, triton.next_power_of_2(max(m_max, 1)))), NUM_WARPS


def lbfgs_gmm(p: torch.Tensor, lengths: torch.Tensor, active: torch.Tensor, params: torch.Tensor,
              *, n_components: int, n_steps: int, lr: float, max_iter: int, max_eval: int,
              history_size: int, max_ls: int | None, tolerance_grad: float,
              tolerance_change: float, curvature_eps: float, wolfe_c1: float, wolfe_c2: float,
              kl_eps: float, var_floor: float, log_tiny: float
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``lbfgs_batched(gmm_value_and_grad, params, active, ...)`` as one kernel launch.

    p (E, M_max) targets, 0 beyond each length and finite on active rows; lengths (E,) M of each
    fit (>= 1 where active); active (E,) bool, inactive fits are neither evaluated nor moved;
    params (E, 3K) start points [means, variances, logits]. Returns the final params (E, 3K),
    the last objective value of each fit's L-BFGS run (E,) (0 where inactive or 0 steps) and the
    number of objective evaluations (E,) long, all on p's device, in p's dtype.
    ``max_ls``: None for the installed PyTorch's rule (the step's remaining evaluations), an int
    for a fixed cap. The constants are those of ``alignprog.losses.gmm``."""
    if triton is None:
        raise RuntimeError("the triton backend needs the triton package")
    e, m_max = p.shape
    out = params.to(p.dtype).contiguous().clone()                              # (E, 3K)
    f_out = torch.zeros(e, dtype=p.dtype, device=p.device)                     # (E,)
    evals = torch.zeros(e, dtype=torch.int32, device=p.device)                 # (E,)
    if e == 0:
        return out, f_out, evals.long()
    kp = max(2, triton.next_power_of_2(n_components))
    h2 = max(2, triton.next_power_of_2(history_size))
    # Per fit: H slots of (y, s) as (4, KP) tiles, then H2 slots of 1/(y.s).
    scratch = torch.empty(e, history_size * 2 * 4 * kp + h2, dtype=p.dtype, device=p.device)
    # The line search's 0.01 and 0.1 (torch.optim.lbfgs._strong_wolfe) are constants too.
    consts = _constants([lr, tolerance_grad, tolerance_change, curvature_eps, wolfe_c1, wolfe_c2,
                         kl_eps, var_floor, log_tiny, 0.01, 0.1], p)
    block_m, warps = _launch_shape(m_max)
    _lbfgs_gmm_kernel[(e,)](
        p.contiguous(), lengths.to(torch.int32).contiguous(), active.to(torch.int32).contiguous(),
        out, f_out, evals, scratch, consts, m_max, scratch.shape[1],
        K=n_components, KP=kp, H=history_size, H2=h2, BLOCK_M=block_m, N_STEPS=n_steps,
        MAX_ITER=max_iter, MAX_EVAL=max_eval, MAX_LS=-1 if max_ls is None else max_ls,
        # No a*b+c contraction: torch's elementwise kernels round the product and the sum apart.
        num_warps=warps, enable_fp_fusion=False)
    return out, f_out, evals.long()


def value_and_grad(params: torch.Tensor, p: torch.Tensor, lengths: torch.Tensor, *,
                   n_components: int, kl_eps: float, var_floor: float, log_tiny: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``gmm.gmm_value_and_grad`` by the kernel's evaluation, one program per row: J (E,) and
    dJ/dparams (E, 3K) (for the tests: the fit kernel evaluates exactly this)."""
    if triton is None:
        raise RuntimeError("the triton backend needs the triton package")
    e, m_max = p.shape
    x = params.to(p.dtype).contiguous()                                        # (E, 3K)
    j = torch.zeros(e, dtype=p.dtype, device=p.device)                         # (E,)
    grad = torch.zeros_like(x)                                                 # (E, 3K)
    if e == 0:
        return j, grad
    block_m, warps = _launch_shape(m_max)
    _value_and_grad_kernel[(e,)](
        p.contiguous(), lengths.to(torch.int32).contiguous(), x, grad, j,
        _constants([kl_eps, var_floor, log_tiny], p), m_max, K=n_components,
        KP=max(2, triton.next_power_of_2(n_components)), BLOCK_M=block_m, num_warps=warps,
        enable_fp_fusion=False)
    return j, grad


if triton is not None:

    @triton.jit
    def _cubic(x1, f1, g1, x2, f2, g2, lo, hi):
        """torch.optim.lbfgs._cubic_interpolate with bounds (lo, hi)."""
        d1 = g1 + g2 - 3 * (f1 - f2) / (x1 - x2)
        d2_square = d1 * d1 - g1 * g2
        d2 = tl.sqrt(tl.maximum(d2_square, 0.0))
        pos_up = x2 - (x2 - x1) * ((g2 + d2 - d1) / (g2 - g1 + 2 * d2))
        pos_down = x1 - (x1 - x2) * ((g1 + d2 - d1) / (g1 - g2 + 2 * d2))
        min_pos = tl.where(x1 <= x2, pos_up, pos_down)
        clipped = tl.minimum(tl.maximum(min_pos, lo), hi)
        return tl.where(d2_square >= 0, clipped, (lo + hi) / 2.0)

    @triton.jit
    def _cubic_in(x1, f1, g1, x2, f2, g2):
        """_cubic bounded by the two points (the zoom phase)."""
        lo = tl.where(x1 <= x2, x1, x2)
        hi = tl.where(x1 <= x2, x2, x1)
        return _cubic(x1, f1, g1, x2, f2, g2, lo, hi)

    @triton.jit
    def _pick(cond, t, f, g, gtd, t_old, f_old, g_old, gtd_old):
        """A bracket slot's (t, f, g, gtd): the new point where `cond`, the old one elsewhere."""
        return (tl.where(cond, t, t_old), tl.where(cond, f, f_old), tl.where(cond, g, g_old),
                tl.where(cond, gtd, gtd_old))

    @triton.jit
    def _components(m, real_m, real_k, mu, two_var, log_tiny, dtype: tl.constexpr):
        """(m - mu, unnormalised g) of a (KP, BLOCK_M) block of columns m: exp(-(m-mu)^2 / 2v)
        on the real (k, m), 0 elsewhere and below the smallest normal number (as
        gmm.gmm_components)."""
        real = real_m[None, :] & real_k[:, None]                              # (KP, BLOCK_M)
        diff = m.to(dtype)[None, :] - mu[:, None]
        expo = -(diff * diff) / two_var[:, None]
        g = tl.where(real & (expo > log_tiny), tl.exp(tl.maximum(expo, log_tiny)), 0.0)
        return diff, g

    @triton.jit
    def _kl_terms(q, pm, real_m, kl_eps):
        """log(p+eps), log(q+eps) and c = dJ/dq of a block of columns (0 beyond M)."""
        log_p = tl.log(pm + kl_eps)
        log_q = tl.log(q + kl_eps)
        c = tl.where(real_m, log_q - log_p + (q - pm) / (q + kl_eps), 0.0)
        return log_p, log_q, c

    @triton.jit
    def _gmm_value_and_grad(x, rows, p_row, m_len, kl_eps, var_floor, log_tiny,
                            K: tl.constexpr, KP: tl.constexpr, BLOCK_M: tl.constexpr):
        """J and dJ/dx (4, KP) of one fit: ``gmm.gmm_value_and_grad`` for one row."""
        means = tl.sum(tl.where(rows == 0, x, 0.0), axis=0)                    # (KP,)
        variances = tl.sum(tl.where(rows == 1, x, 0.0), axis=0)
        logits = tl.sum(tl.where(rows == 2, x, 0.0), axis=0)
        k_idx = tl.arange(0, KP)
        real_k = k_idx < K
        top = (m_len - 1).to(x.dtype)
        inside = (means >= 0) & (means <= top)
        mu = tl.where(inside, means, tl.minimum(tl.maximum(means, 0.0), top))
        var = tl.where(variances >= var_floor, variances, var_floor)
        two_var = 2.0 * var
        # pi = softmax over the K real logits (0 on the padding).
        masked = tl.where(real_k, logits, -float("inf"))
        ex = tl.exp(masked - tl.max(masked, axis=0))
        pi = ex / tl.sum(ex, axis=0)                                           # (KP,)
        offs = tl.arange(0, BLOCK_M)

        # Pass 1: the normaliser of each component over the real m < M.
        norm = tl.full([KP], 0.0, x.dtype)                                   # (KP,)
        for start in range(0, m_len, BLOCK_M):
            m = start + offs
            _, g = _components(m, m < m_len, real_k, mu, two_var, log_tiny, x.dtype)
            norm += tl.sum(g, axis=1)
        norm = tl.where(real_k, norm, 1.0)

        # Pass 2: q = pi^T G, J (two sums, as gmm.symmetric_kl), c = dJ/dq, cbar = G c.
        j_pq = tl.full([BLOCK_M], 0.0, x.dtype)      # per column, summed after the loop
        j_qp = tl.full([BLOCK_M], 0.0, x.dtype)
        c_bar = tl.full([KP], 0.0, x.dtype)                                  # (KP,)
        for start in range(0, m_len, BLOCK_M):
            m = start + offs
            real_m = m < m_len
            _, g = _components(m, real_m, real_k, mu, two_var, log_tiny, x.dtype)
            g = g / norm[:, None]                                              # (KP, BLOCK_M)
            q = tl.sum(pi[:, None] * g, axis=0)                                # (BLOCK_M,)
            pm = tl.load(p_row + m, mask=real_m, other=0.0)
            log_p, log_q, c = _kl_terms(q, pm, real_m, kl_eps)
            j_pq += tl.where(real_m, pm * (log_p - log_q), 0.0)
            j_qp += tl.where(real_m, q * (log_q - log_p), 0.0)
            c_bar += tl.sum(g * c[None, :], axis=1)

        # Pass 3: w = pi G (c - cbar) and its moments in (m - mu).
        s1 = tl.full([KP], 0.0, x.dtype)
        s2 = tl.full([KP], 0.0, x.dtype)
        for start in range(0, m_len, BLOCK_M):
            m = start + offs
            real_m = m < m_len
            diff, g = _components(m, real_m, real_k, mu, two_var, log_tiny, x.dtype)
            g = g / norm[:, None]
            q = tl.sum(pi[:, None] * g, axis=0)
            pm = tl.load(p_row + m, mask=real_m, other=0.0)
            _, _, c = _kl_terms(q, pm, real_m, kl_eps)
            w_diff = pi[:, None] * g * (c[None, :] - c_bar[:, None]) * diff
            s1 += tl.sum(w_diff, axis=1)
            s2 += tl.sum(w_diff * diff, axis=1)

        d_means = tl.where(inside & real_k, s1 / var, 0.0)
        d_vars = tl.where((variances >= var_floor) & real_k, s2 / (2.0 * (var * var)), 0.0)
        d_logits = pi * (c_bar - tl.sum(pi * c_bar, axis=0))
        grad = tl.where(rows == 0, d_means[None, :],
                        tl.where(rows == 1, d_vars[None, :],
                                 tl.where(rows == 2, d_logits[None, :], 0.0)))
        return tl.sum(j_pq) + tl.sum(j_qp), grad

    @triton.jit
    def _lbfgs_gmm_kernel(p_ptr, len_ptr, active_ptr, x_ptr, f_ptr, evals_ptr, scratch_ptr,
                          c_ptr, m_stride, scratch_stride,
                          K: tl.constexpr, KP: tl.constexpr, H: tl.constexpr, H2: tl.constexpr,
                          BLOCK_M: tl.constexpr, N_STEPS: tl.constexpr, MAX_ITER: tl.constexpr,
                          MAX_EVAL: tl.constexpr, MAX_LS: tl.constexpr):
        """One program per fit: N_STEPS calls of torch.optim.LBFGS.step (strong-Wolfe), as
        ``gmm.lbfgs_batched`` and ``gmm._strong_wolfe`` write them for one row."""
        pid = tl.program_id(0).to(tl.int64)
        lr = tl.load(c_ptr)
        tol_grad = tl.load(c_ptr + 1)
        tol_change = tl.load(c_ptr + 2)
        curv_eps = tl.load(c_ptr + 3)
        c1 = tl.load(c_ptr + 4)
        c2 = tl.load(c_ptr + 5)
        kl_eps = tl.load(c_ptr + 6)
        var_floor = tl.load(c_ptr + 7)
        log_tiny = tl.load(c_ptr + 8)
        hundredth = tl.load(c_ptr + 9)
        tenth = tl.load(c_ptr + 10)
        m_len = tl.load(len_ptr + pid)
        is_active = tl.load(active_ptr + pid) != 0
        p_row = p_ptr + pid * m_stride
        rows = tl.arange(0, 4)[:, None]                                        # (4, 1)
        cols = tl.arange(0, KP)[None, :]                                       # (1, KP)
        real_p = (rows < 3) & (cols < K)
        x = tl.load(x_ptr + pid * (3 * K) + rows * K + cols, mask=real_p, other=0.0)  # (4, KP)
        tile = rows * KP + cols                                                # (4, KP)
        slots = tl.arange(0, H2)                                               # (H2,)
        # Scratch of this fit: slot i holds y at hist + 8 i KP, s at hist + (8 i + 4) KP, and
        # 1 / (y.s) at ro_ptr + i.
        hist = scratch_ptr + pid * scratch_stride
        ro_ptr = hist + H * 8 * KP

        zero_tile = x * 0.0
        zero = tl.sum(zero_tile)                              # a 0 of x's dtype (x is finite)
        n_hist = m_len * 0                                    # pairs held
        head = m_len * 0                                      # slot of the oldest pair
        h_diag = zero + 1.0
        d = zero_tile
        t = zero
        prev_g = zero_tile
        prev_loss = zero
        f = zero
        n_iter_total = m_len * 0                              # torch's state["n_iter"]
        total_evals = m_len * 0

        n_steps = tl.where(is_active, N_STEPS, 0)
        for _step in range(0, n_steps):
            f, g = _gmm_value_and_grad(x, rows, p_row, m_len, kl_eps, var_floor, log_tiny,
                                       K, KP, BLOCK_M)
            evals = m_len * 0 + 1
            run = (tl.max(tl.abs(g)) <= tol_grad) == 0
            n_iter = m_len * 0
            while run & (n_iter < MAX_ITER):
                n_iter += 1
                n_iter_total += 1
                first = n_iter_total == 1

                # Curvature pair from the last move (only when y.s > 1e-10; FIFO of H pairs).
                y = g - prev_g
                s = d * t
                ys = tl.sum(y * s)
                if (first == 0) & (ys > curv_eps):
                    full = n_hist == H
                    at = tl.where(full, head, (head + n_hist) % H)
                    # Every thread is done reading the history before a slot is overwritten,
                    # and done writing before anyone reads it (the tiles' layouts may differ).
                    tl.debug_barrier()
                    tl.store(hist + at * 8 * KP + tile, y)
                    tl.store(hist + at * 8 * KP + 4 * KP + tile, s)
                    tl.store(ro_ptr + at, 1.0 / ys)
                    tl.debug_barrier()
                    head = tl.where(full, (head + 1) % H, head)
                    n_hist = tl.where(full, n_hist, n_hist + 1)
                    h_diag = ys / tl.sum(y * y)

                # Two-loop recursion, newest pair first (none on the first iteration: d = -g).
                q = -g
                al = tl.full([H2], 0.0, x.dtype)                             # al[i], pair i
                n_use = tl.where(first, 0, n_hist)
                for back in range(0, n_use):
                    i = n_use - 1 - back
                    at_i = hist + ((head + i) % H) * 8 * KP
                    ro_i = tl.load(ro_ptr + (head + i) % H, cache_modifier=".cg")
                    a_i = tl.sum(tl.load(at_i + 4 * KP + tile, cache_modifier=".cg") * q) * ro_i
                    al = tl.where(slots == i, a_i, al)
                    q = q - a_i * tl.load(at_i + tile, cache_modifier=".cg")
                r = q * h_diag
                for i in range(0, n_use):
                    at_i = hist + ((head + i) % H) * 8 * KP
                    ro_i = tl.load(ro_ptr + (head + i) % H, cache_modifier=".cg")
                    be_i = tl.sum(tl.load(at_i + tile, cache_modifier=".cg") * r) * ro_i
                    al_i = tl.sum(tl.where(slots == i, al, 0.0))
                    r = r + tl.load(at_i + 4 * KP + tile, cache_modifier=".cg") * (al_i - be_i)
                d = tl.where(first, -g, r)

                prev_g = g
                prev_loss = f
                # First iteration ever: t = min(1, 1/|g|_1) lr; later ones: lr.
                t = tl.where(first, tl.minimum(1.0 / tl.sum(tl.abs(g)), 1.0) * lr, lr)
                gtd = tl.sum(g * d)
                run = (gtd > -tol_change) == 0
                if run:
                    # ---- strong-Wolfe line search (gmm._strong_wolfe for one fit) ----
                    if MAX_LS < 0:
                        max_ls = MAX_EVAL - evals          # PyTorch >= 2.14: the step's budget
                    else:
                        max_ls = m_len * 0 + MAX_LS
                    d_norm = tl.max(tl.abs(d))
                    f_new, g_new = _gmm_value_and_grad(x + t * d, rows, p_row, m_len, kl_eps,
                                                       var_floor, log_tiny, K, KP, BLOCK_M)
                    ls_evals = m_len * 0 + 1
                    ls_iter = m_len * 0
                    gtd_new = tl.sum(g_new * d)
                    t_prev = zero
                    f_prev = f
                    g_prev = g
                    gtd_prev = gtd
                    done = ls_iter != 0                                        # False
                    # Bracket [slot 0, slot 1]; a one-point bracket holds the point twice.
                    t0 = t
                    t1 = t
                    f0 = f
                    f1 = f
                    g0 = g
                    g1 = g
                    gtd0 = gtd
                    gtd1 = gtd

                    bracketing = ls_iter == 0                                  # True
                    while bracketing & (ls_iter < max_ls):
                        armijo_fail = (f_new > f + c1 * t * gtd) | ((ls_iter > 1)
                                                                  & (f_new >= f_prev))
                        wolfe = tl.abs(gtd_new) <= -c2 * gtd
                        two_point = armijo_fail | ((wolfe == 0) & (gtd_new >= 0))
                        one_point = (armijo_fail == 0) & wolfe
                        t0 = tl.where(two_point, t_prev, tl.where(one_point, t, t0))
                        f0 = tl.where(two_point, f_prev, tl.where(one_point, f_new, f0))
                        g0 = tl.where(two_point, g_prev, tl.where(one_point, g_new, g0))
                        gtd0 = tl.where(two_point, gtd_prev, gtd0)
                        t1 = tl.where(two_point | one_point, t, t1)
                        f1 = tl.where(two_point | one_point, f_new, f1)
                        g1 = tl.where(two_point | one_point, g_new, g1)
                        gtd1 = tl.where(two_point, gtd_new, gtd1)
                        done = done | one_point
                        bracketing = (two_point | one_point) == 0
                        if bracketing:
                            t_next = _cubic(t_prev, f_prev, gtd_prev, t, f_new, gtd_new,
                                            t + hundredth * (t - t_prev), t * 10)
                            t_prev = t
                            f_prev = f_new
                            g_prev = g_new
                            gtd_prev = gtd_new
                            t = t_next
                            f_new, g_new = _gmm_value_and_grad(x + t * d, rows, p_row, m_len,
                                                               kl_eps, var_floor, log_tiny,
                                                               K, KP, BLOCK_M)
                            gtd_new = tl.sum(g_new * d)
                            ls_evals += 1
                            ls_iter += 1

                    # Out of trials while bracketing: the bracket is [0, t], no zoom follows.
                    t0 = tl.where(bracketing, zero, t0)
                    t1 = tl.where(bracketing, t, t1)
                    f0 = tl.where(bracketing, f, f0)
                    f1 = tl.where(bracketing, f_new, f1)
                    g0 = tl.where(bracketing, g, g0)
                    g1 = tl.where(bracketing, g_new, g1)
                    low_is_1 = f0 > f1

                    insufficient = ls_iter != ls_iter                          # False
                    zooming = ((done == 0) & (ls_iter < max_ls)
                               & ((tl.abs(t1 - t0) * d_norm < tol_change) == 0))
                    while zooming:
                        t = _cubic_in(t0, f0, gtd0, t1, f1, gtd1)
                        b_max = tl.maximum(t0, t1)
                        b_min = tl.minimum(t0, t1)
                        eps = tenth * (b_max - b_min)
                        near = tl.minimum(b_max - t, t - b_min) < eps
                        at_edge = insufficient | (t >= b_max) | (t <= b_min)
                        moved = tl.where(tl.abs(t - b_max) < tl.abs(t - b_min), b_max - eps,
                                         b_min + eps)
                        t = tl.where(near & at_edge, moved, t)
                        insufficient = near & (at_edge == 0)
                        f_new, g_new = _gmm_value_and_grad(x + t * d, rows, p_row, m_len, kl_eps,
                                                       var_floor, log_tiny, K, KP, BLOCK_M)
                        gtd_new = tl.sum(g_new * d)
                        ls_evals += 1
                        ls_iter += 1

                        f_low = tl.where(low_is_1, f1, f0)
                        to_high = (f_new > f + c1 * t * gtd) | (f_new >= f_low)
                        # Armijo fails or no lower than the low point: the trial is the high end.
                        put1 = to_high & (low_is_1 == 0)
                        put0 = to_high & low_is_1
                        t0, f0, g0, gtd0 = _pick(put0, t, f_new, g_new, gtd_new, t0, f0, g0, gtd0)
                        t1, f1, g1, gtd1 = _pick(put1, t, f_new, g_new, gtd_new, t1, f1, g1, gtd1)
                        low_is_1 = tl.where(to_high, f0 > f1, low_is_1)
                        # Otherwise: Wolfe met -> done; if the slope points away, the old low
                        # becomes the high end; the trial becomes the low end.
                        to_low = to_high == 0
                        wolfe = tl.abs(gtd_new) <= -c2 * gtd
                        done = done | (to_low & wolfe)
                        t_low = tl.where(low_is_1, t1, t0)
                        t_high = tl.where(low_is_1, t0, t1)
                        flip = to_low & (wolfe == 0) & (gtd_new * (t_high - t_low) >= 0)
                        flip0 = flip & low_is_1                    # high is slot 0
                        flip1 = flip & (low_is_1 == 0)
                        t0, f0, g0, gtd0 = _pick(flip0, t1, f1, g1, gtd1, t0, f0, g0, gtd0)
                        t1, f1, g1, gtd1 = _pick(flip1, t0, f0, g0, gtd0, t1, f1, g1, gtd1)
                        new0 = to_low & (low_is_1 == 0)
                        new1 = to_low & low_is_1
                        t0, f0, g0, gtd0 = _pick(new0, t, f_new, g_new, gtd_new, t0, f0, g0, gtd0)
                        t1, f1, g1, gtd1 = _pick(new1, t, f_new, g_new, gtd_new, t1, f1, g1, gtd1)
                        zooming = ((done == 0) & (ls_iter < max_ls)
                                   & ((tl.abs(t1 - t0) * d_norm < tol_change) == 0))

                    # ---- the step: x + t d at the low end of the bracket ----
                    t = tl.where(low_is_1, t1, t0)
                    f = tl.where(low_is_1, f1, f0)
                    g = tl.where(low_is_1, g1, g0)
                    x = x + t * d
                    evals += ls_evals
                    stop = ((evals >= MAX_EVAL) | (tl.max(tl.abs(g)) <= tol_grad)
                            | (tl.max(tl.abs(d * t)) <= tol_change)
                            | (tl.abs(f - prev_loss) < tol_change))
                    run = stop == 0
            total_evals += evals

        tl.store(x_ptr + pid * (3 * K) + rows * K + cols, x, mask=real_p)
        tl.store(f_ptr + pid, f)
        tl.store(evals_ptr + pid, total_evals)

    @triton.jit
    def _value_and_grad_kernel(p_ptr, len_ptr, x_ptr, g_ptr, f_ptr, c_ptr, m_stride,
                               K: tl.constexpr, KP: tl.constexpr, BLOCK_M: tl.constexpr):
        """One program per row: J and dJ/dparams at the given params."""
        pid = tl.program_id(0).to(tl.int64)
        rows = tl.arange(0, 4)[:, None]                                        # (4, 1)
        cols = tl.arange(0, KP)[None, :]                                       # (1, KP)
        real_p = (rows < 3) & (cols < K)
        x = tl.load(x_ptr + pid * (3 * K) + rows * K + cols, mask=real_p, other=0.0)  # (4, KP)
        f, g = _gmm_value_and_grad(x, rows, p_ptr + pid * m_stride, tl.load(len_ptr + pid),
                                   tl.load(c_ptr), tl.load(c_ptr + 1), tl.load(c_ptr + 2),
                                   K, KP, BLOCK_M)
        tl.store(g_ptr + pid * (3 * K) + rows * K + cols, g, mask=real_p)
        tl.store(f_ptr + pid, f)
