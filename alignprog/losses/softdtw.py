"""Batched soft-DTW (Cuturi & Blondel 2017) with its exact gradient, for LAV
(docs/algorithms.md#soft-dtw).

    R_{0,0} = 0,  R_{n,0} = R_{0,m} = +inf,
    R_{n,m} = C_{n,m} + softmin_g(R_{n-1,m-1}, R_{n-1,m}, R_{n,m-1}),
    softmin_g(a, b, c) = -g log(exp(-a/g) + exp(-b/g) + exp(-c/g))   (with the max-shift),

value R_{N,M} (unnormalised, may be negative). The gradient E = dR_{N,M}/dC is the standard backward
"E" recursion (Cuturi & Blondel, Algorithm 2): E[N, M] = 1 and, over the successors s of cell t,

    E[t] = sum_s E[s] exp((R[s] - C[s] - R[t]) / g).

The weight exp((R[s] - C[s] - R[t]) / g) is the softmin probability of t among the three
predecessors of s. The forward pass already computes these probabilities, exp((lo_s - R[t]) / g)
over their sum (lo_s the smallest predecessor of s), so it keeps them and the backward pass is
three multiply-adds per cell. Same numbers, but no cancellation: evaluating R[s] - C[s] - R[t]
directly lost everything once R was large (float32 costs ~1e6 gave E = inf and NaN gradients),
whereas the stored probabilities lie in [0, 1] and sum to 1 for each s, so 0 <= E <= 1.

The reference runs this on the CPU with numba in float64, one pair at a time
(docs/reference-bugs.md#lav-regulariser-constant-pull,
docs/reference-bugs.md#cpu-bound-reference-loops). Here every pair of a batch runs at once, on
the inputs' device:

* ``backend="torch"``: an anti-diagonal wavefront. Cells (n, m) with n + m = k depend only on the
  diagonals k - 1 and k - 2, so each of the N + M - 1 steps is a few vectorised ops over all pairs
  and all cells of the diagonal. Works on any device and dtype.
* ``backend="triton"``: the same wavefront as a Triton kernel, one program per pair, which sweeps
  the diagonals in one launch instead of about a dozen small launches per diagonal. Same layout and
  the same formulas, so it equals the torch path up to the rounding of exp/log.
* ``backend="auto"`` (default): Triton on CUDA when it imports, the torch path otherwise.

Both store R, the probabilities and E in a *skewed* layout, ``R_s[p, k, n] = R[p, n, k - n]`` of
shape (P, N + M + 3, N + 2): a diagonal is one contiguous row, so the wavefront reads and writes
contiguous slices. Cells outside a pair's (len_n, len_m) rectangle hold +inf in R (and in the
skewed cost) and 0 in E, so the padded part of the cost matrix is never read: padding, even NaN,
changes neither value nor gradient.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch.autograd.function import once_differentiable

from alignprog.runtime import checks_values

try:  # Triton comes with CUDA builds of torch; without it the torch path serves everywhere.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

Backend = Literal["auto", "torch", "triton"]


def soft_dtw(cost: torch.Tensor, len_n: torch.Tensor | None = None,
             len_m: torch.Tensor | None = None, gamma: float = 0.1, *,
             dtype: torch.dtype | None = None, backend: Backend = "auto") -> torch.Tensor:
    """Soft-DTW values R[len_n, len_m] of a batch of cost matrices: (P, N, M) -> (P,).

    ``len_n``, ``len_m`` (P,): the real size of each pair's cost matrix (default N and M), each
    >= 1; ``cost[p, len_n[p]:, :]`` and ``cost[p, :, len_m[p]:]`` are ignored. ``gamma`` > 0 is
    the softmin temperature (LAV's ``min_temp``). ``dtype``: the dtype of the recursion, e.g.
    ``torch.float64`` to run a float32 cost in double precision as the reference does; by
    default the cost's dtype (half precisions are raised to float32). The result and the gradient
    come back in the cost's dtype. Differentiable once (no double backward).
    """
    if cost.dim() != 3:
        raise ValueError(f"cost must be (P, N, M), got shape {tuple(cost.shape)}")
    if not gamma > 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    if backend not in ("auto", "torch", "triton"):
        raise ValueError(f"backend must be 'auto', 'torch' or 'triton', got {backend!r}")
    p, n, m = cost.shape
    if n == 0 or m == 0:
        raise ValueError(f"cost matrices must have at least one row and column, got {n}x{m}")
    len_n = _lengths(len_n, p, n, cost.device, "len_n")
    len_m = _lengths(len_m, p, m, cost.device, "len_m")
    if dtype is None:
        dtype = cost.dtype if cost.dtype in (torch.float32, torch.float64) else torch.float32
    if backend == "auto":
        backend = "triton" if cost.is_cuda and triton is not None else "torch"
    if backend == "triton" and triton is None:
        raise RuntimeError("backend='triton' needs the triton package")
    return _SoftDTW.apply(cost, len_n, len_m, float(gamma), dtype, backend == "triton")


def _lengths(lengths: torch.Tensor | None, p: int, size: int, device: torch.device,
             name: str) -> torch.Tensor:
    if lengths is None:
        return torch.full((p,), size, dtype=torch.long, device=device)
    lengths = torch.as_tensor(lengths, device=device).long().reshape(-1)          # (P,)
    if lengths.shape[0] != p:
        raise ValueError(f"{name} must have {p} entries, got {lengths.shape[0]}")
    # One host sync (skipped for the trainer's own batches): a bad length would silently read
    # another cell.
    if checks_values(lengths) and bool(((lengths < 1) | (lengths > size)).any()):
        raise ValueError(f"{name} must lie in [1, {size}], got {lengths.tolist()}")
    return lengths


# --- skewed layout ------------------------------------------------------------------------------

def _valid(len_n: torch.Tensor, len_m: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """(P, K, W) bool: skewed cell (k, i) is a real cell (i, j = k - i) of the pair."""
    k = torch.arange(n + m + 3, device=len_n.device)[:, None]                   # (K, 1)
    i = torch.arange(n + 2, device=len_n.device)[None, :]                       # (1, W)
    j = k - i                                                                   # (K, W)
    i_ok = (i >= 1) & (i <= len_n[:, None, None])                               # (P, 1, W)
    j_ok = (j >= 1) & (j <= len_m[:, None, None])                               # (P, K, W)
    return i_ok & j_ok


def _skew(cost: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """cost (P, N, M) -> (P, K, W), cs[p, k, i] = cost[p, i - 1, k - i - 1], +inf off the pair."""
    p, n, m = cost.shape
    k = torch.arange(n + m + 3, device=cost.device)[:, None]                    # (K, 1)
    i = torch.arange(n + 2, device=cost.device)[None, :]                        # (1, W)
    flat = (i - 1).clamp(0, n - 1) * m + (k - i - 1).clamp(0, m - 1)            # (K, W)
    cs = cost.reshape(p, n * m)[:, flat.reshape(-1)].reshape(p, n + m + 3, n + 2)  # (P, K, W)
    return torch.where(valid, cs, math.inf)


def _unskew(es: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """(P, K, W) -> (P, N, M): out[p, a, b] = es[p, a + b + 2, a + 1] (cell (a+1, b+1))."""
    p, _, w = es.shape
    a = torch.arange(n, device=es.device)[:, None]                              # (N, 1)
    b = torch.arange(m, device=es.device)[None, :]                              # (1, M)
    flat = (a + b + 2) * w + a + 1                                              # (N, M)
    return es.reshape(p, -1)[:, flat.reshape(-1)].reshape(p, n, m)              # (P, N, M)


# --- torch wavefront ----------------------------------------------------------------------------

def _forward_torch(cs: torch.Tensor, n: int, m: int,
                   gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """R (P, K, W) and the softmin probabilities (3, P, K, W) of (diag, up, left), skewed."""
    p, kk, w = cs.shape
    r = torch.full((p, kk, w), math.inf, dtype=cs.dtype, device=cs.device)      # (P, K, W)
    r[:, 0, 0] = 0.0
    prob = torch.zeros((3, p, kk, w), dtype=cs.dtype, device=cs.device)         # (3, P, K, W)
    inv_gamma = 1.0 / gamma
    for k in range(2, n + m + 1):
        lo, hi = max(1, k - m), min(n, k - 1)      # rows i of diagonal k inside the N x M grid
        here = slice(lo, hi + 1)
        # R[i-1, j-1], R[i-1, j], R[i, j-1]
        prev = torch.stack((r[:, k - 2, lo - 1:hi], r[:, k - 1, lo - 1:hi], r[:, k - 1, here]))
        low = prev.amin(0)                                                      # (P, L)
        low = torch.where(torch.isinf(low), 0.0, low)   # all +inf (off the pair): no inf - inf
        weight = torch.exp((low - prev) * inv_gamma)                            # (3, P, L)
        # >= 1 on real cells (the min contributes exp(0) = 1); 1 keeps 0/0 off the others.
        total = weight.sum(0).clamp_min(1.0)                                    # (P, L)
        r[:, k, here] = cs[:, k, here] + (low - gamma * torch.log(total))
        prob[:, :, k, here] = weight / total
    return r, prob


def _backward_torch(prob: torch.Tensor, len_n: torch.Tensor, len_m: torch.Tensor, n: int,
                    m: int) -> torch.Tensor:
    """E[i, j] = dR[len_n, len_m] / dC[i, j] in the skewed layout (P, K, W)."""
    p_diag, p_up, p_left = prob
    e = torch.zeros_like(p_diag)                                                # (P, K, W)
    e[torch.arange(e.shape[0], device=e.device), len_n + len_m, len_n] = 1.0   # E[end] = 1
    for k in range(n + m, 1, -1):
        lo, hi = max(1, k - m), min(n, k - 1)
        here, nxt = slice(lo, hi + 1), slice(lo + 1, hi + 2)
        acc = e[:, k, here]                        # a view: accumulates in place onto the seed
        # Successors s of t = (i, j) and which predecessor of s t is. Cells off the pair have
        # E = 0, so they add nothing.
        acc.addcmul_(e[:, k + 1, nxt], p_up[:, k + 1, nxt])      # s = (i+1, j): t is "up"
        acc.addcmul_(e[:, k + 1, here], p_left[:, k + 1, here])  # s = (i, j+1): t is "left"
        acc.addcmul_(e[:, k + 2, nxt], p_diag[:, k + 2, nxt])    # s = (i+1, j+1): t is "diag"
    return e


# --- Triton kernels -----------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _sdtw_fwd_kernel(c_ptr, r_ptr, prob_ptr, len_n_ptr, len_m_ptr, gamma_ptr, stride_p,
                         stride_k, stride_plane, BLOCK: tl.constexpr):
        """One program per pair: sweep the diagonals k = 2 .. len_n + len_m of R in place."""
        pid = tl.program_id(0).to(tl.int64)
        ln = tl.load(len_n_ptr + pid)
        lm = tl.load(len_m_ptr + pid)
        gamma = tl.load(gamma_ptr)
        inv_gamma = tl.load(gamma_ptr + 1)
        c_base = c_ptr + pid * stride_p
        r_base = r_ptr + pid * stride_p
        pd_base = prob_ptr + pid * stride_p          # planes: diag, up, left
        pu_base = pd_base + stride_plane
        pl_base = pu_base + stride_plane
        offs = tl.arange(0, BLOCK)
        for k in range(2, ln + lm + 1):
            lo = tl.maximum(k - lm, 1)
            hi = tl.minimum(k - 1, ln)
            row0 = k * stride_k
            row1 = (k - 1) * stride_k
            row2 = (k - 2) * stride_k
            for start in range(lo, hi + 1, BLOCK):
                i = start + offs
                live = i <= hi
                # .cg: read from L2, where the other threads' stores of the last diagonal are.
                diag = tl.load(r_base + row2 + i - 1, mask=live, other=float("inf"),
                               cache_modifier=".cg")
                up = tl.load(r_base + row1 + i - 1, mask=live, other=float("inf"),
                             cache_modifier=".cg")
                left = tl.load(r_base + row1 + i, mask=live, other=float("inf"),
                               cache_modifier=".cg")
                c = tl.load(c_base + row0 + i, mask=live, other=0.0)
                # Every real cell has a finite predecessor, so low is finite and total >= 1.
                low = tl.minimum(tl.minimum(diag, up), left)
                w_d = tl.exp((low - diag) * inv_gamma)
                w_u = tl.exp((low - up) * inv_gamma)
                w_l = tl.exp((low - left) * inv_gamma)
                total = w_d + w_u + w_l
                tl.store(r_base + row0 + i, c + (low - gamma * tl.log(total)), mask=live)
                tl.store(pd_base + row0 + i, w_d / total, mask=live)
                tl.store(pu_base + row0 + i, w_u / total, mask=live)
                tl.store(pl_base + row0 + i, w_l / total, mask=live)
            tl.debug_barrier()     # diagonal k complete before any thread reads it

    @triton.jit
    def _sdtw_bwd_kernel(prob_ptr, e_ptr, len_n_ptr, len_m_ptr, stride_p, stride_k,
                         stride_plane, BLOCK: tl.constexpr):
        """One program per pair: the E recursion over diagonals k = len_n + len_m .. 2.

        E holds 1 at the end cell and 0 elsewhere on entry; probabilities and E of cells off
        the pair are 0, so successors off the pair add nothing."""
        pid = tl.program_id(0).to(tl.int64)
        ln = tl.load(len_n_ptr + pid)
        lm = tl.load(len_m_ptr + pid)
        pd_base = prob_ptr + pid * stride_p
        pu_base = pd_base + stride_plane
        pl_base = pu_base + stride_plane
        e_base = e_ptr + pid * stride_p
        offs = tl.arange(0, BLOCK)
        end_k = ln + lm
        for step in range(0, end_k - 1):
            k = end_k - step
            lo = tl.maximum(k - lm, 1)
            hi = tl.minimum(k - 1, ln)
            row0 = k * stride_k
            row1 = (k + 1) * stride_k
            row2 = (k + 2) * stride_k
            for start in range(lo, hi + 1, BLOCK):
                i = start + offs
                live = i <= hi
                acc = tl.load(e_base + row0 + i, mask=live, other=0.0)
                e_d = tl.load(e_base + row1 + i + 1, mask=live, other=0.0, cache_modifier=".cg")
                e_r = tl.load(e_base + row1 + i, mask=live, other=0.0, cache_modifier=".cg")
                e_g = tl.load(e_base + row2 + i + 1, mask=live, other=0.0, cache_modifier=".cg")
                acc += e_d * tl.load(pu_base + row1 + i + 1, mask=live, other=0.0)  # (i+1, j)
                acc += e_r * tl.load(pl_base + row1 + i, mask=live, other=0.0)      # (i, j+1)
                acc += e_g * tl.load(pd_base + row2 + i + 1, mask=live, other=0.0)  # (i+1, j+1)
                tl.store(e_base + row0 + i, acc, mask=live)
            tl.debug_barrier()


def _launch_config(n: int) -> tuple[int, int]:
    """(BLOCK, num_warps): a diagonal of up to N cells in chunks of at most 1024."""
    block = min(1024, max(32, triton.next_power_of_2(n)))
    return block, max(1, min(8, block // 128))


def _forward_triton(cs, len_n, len_m, n, gamma):
    p, kk, w = cs.shape
    r = torch.full((p, kk, w), math.inf, dtype=cs.dtype, device=cs.device)      # (P, K, W)
    r[:, 0, 0] = 0.0
    prob = torch.zeros((3, p, kk, w), dtype=cs.dtype, device=cs.device)         # (3, P, K, W)
    # gamma travels as a tensor of the compute dtype: a float argument would be cut to float32.
    # Filled on the device (a copy from the host could not be captured in a CUDA graph).
    g = torch.full((2,), gamma, dtype=cs.dtype, device=cs.device)
    g[1:] = 1.0 / gamma
    block, warps = _launch_config(n)
    _sdtw_fwd_kernel[(p,)](cs, r, prob, len_n.to(torch.int32), len_m.to(torch.int32), g,
                           kk * w, w, p * kk * w, BLOCK=block, num_warps=warps)
    return r, prob


def _backward_triton(prob, len_n, len_m, n):
    _, p, kk, w = prob.shape
    e = torch.zeros((p, kk, w), dtype=prob.dtype, device=prob.device)          # (P, K, W)
    # E[end] = 1, from a device tensor (a Python 1.0 would be copied from the host)
    e.index_put_((torch.arange(p, device=e.device), len_n + len_m, len_n),
                 torch.ones((), dtype=e.dtype, device=e.device))
    block, warps = _launch_config(n)
    _sdtw_bwd_kernel[(p,)](prob, e, len_n.to(torch.int32), len_m.to(torch.int32),
                           kk * w, w, p * kk * w, BLOCK=block, num_warps=warps)
    return e


# --- autograd -----------------------------------------------------------------------------------

class _SoftDTW(torch.autograd.Function):
    @staticmethod
    def forward(ctx, cost, len_n, len_m, gamma, dtype, use_triton):
        p, n, m = cost.shape
        cs = _skew(cost.detach().to(dtype), _valid(len_n, len_m, n, m))         # (P, K, W)
        if use_triton:
            r, prob = _forward_triton(cs, len_n, len_m, n, gamma)
        else:
            r, prob = _forward_torch(cs, n, m, gamma)
        end = r[torch.arange(p, device=r.device), len_n + len_m, len_n]        # (P,)
        ctx.save_for_backward(prob, len_n, len_m)      # the backward needs neither R nor C
        ctx.sizes, ctx.use_triton, ctx.out_dtype = (n, m), use_triton, cost.dtype
        return end.to(cost.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        prob, len_n, len_m = ctx.saved_tensors
        n, m = ctx.sizes
        if ctx.use_triton:
            e = _backward_triton(prob, len_n, len_m, n)
        else:
            e = _backward_torch(prob, len_n, len_m, n, m)
        grad = _unskew(e, n, m) * grad_out.to(e.dtype)[:, None, None]          # (P, N, M)
        return grad.to(ctx.out_dtype), None, None, None, None, None
