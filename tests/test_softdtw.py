"""Soft-DTW (docs/algorithms.md#soft-dtw) against a plain per-cell float64 loop written here."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from alignprog.losses.softdtw import soft_dtw

LOG3 = math.log(3.0)


def loop_soft_dtw(c: torch.Tensor, gamma: float) -> torch.Tensor:
    """R[N, M] cell by cell, as docs/algorithms.md#soft-dtw writes it: R00 = 0, borders +inf,
    softmin with the max-shift. Torch scalar ops, so autograd through it gives the reference
    gradient."""
    n, m = c.shape
    inf = torch.tensor(math.inf, dtype=c.dtype)
    r = [[inf] * (m + 1) for _ in range(n + 1)]
    r[0][0] = torch.zeros((), dtype=c.dtype)
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            prev = torch.stack([r[i - 1][j - 1], r[i - 1][j], r[i][j - 1]])
            lo = prev.min()
            softmin = lo - gamma * torch.log(torch.exp(-(prev - lo) / gamma).sum())
            r[i][j] = c[i - 1, j - 1] + softmin
    return r[n][m]


def loop_dtw(c: torch.Tensor) -> float:
    """Hard DTW: the same recursion with a plain min."""
    n, m = c.shape
    cc = c.tolist()
    r = [[math.inf] * (m + 1) for _ in range(n + 1)]
    r[0][0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            r[i][j] = cc[i - 1][j - 1] + min(r[i - 1][j - 1], r[i - 1][j], r[i][j - 1])
    return r[n][m]


def sq_cost(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x[:, None, :] - y[None, :, :]).square().sum(-1)                    # (N, M)


def padded_batch(shapes, seed=0, dtype=torch.float64, fill=0.0):
    """Random costs of the given (n, m) sizes in one (P, N, M) tensor padded with ``fill``."""
    g = torch.Generator().manual_seed(seed)
    n_max = max(n for n, _ in shapes)
    m_max = max(m for _, m in shapes)
    cost = torch.full((len(shapes), n_max, m_max), fill, dtype=dtype)
    for p, (n, m) in enumerate(shapes):
        cost[p, :n, :m] = 3 * torch.rand(n, m, generator=g, dtype=dtype)
    len_n = torch.tensor([n for n, _ in shapes])
    len_m = torch.tensor([m for _, m in shapes])
    return cost, len_n, len_m


SHAPES = [(6, 6), (7, 4), (3, 9), (1, 5), (5, 1), (1, 1), (2, 2)]


@pytest.mark.parametrize("gamma", [0.01, 0.1, 1.0])
def test_values_match_loop(gamma):
    cost, len_n, len_m = padded_batch(SHAPES, seed=1)
    got = soft_dtw(cost, len_n, len_m, gamma)
    for p, (n, m) in enumerate(SHAPES):
        want = loop_soft_dtw(cost[p, :n, :m], gamma)
        torch.testing.assert_close(got[p], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("gamma", [0.01, 0.1, 1.0])
def test_gradients_match_loop_autograd(gamma):
    shapes = [(5, 4), (2, 6), (4, 4)]
    cost, len_n, len_m = padded_batch(shapes, seed=2)
    cost.requires_grad_(True)
    weights = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)  # a non-uniform grad_output
    (soft_dtw(cost, len_n, len_m, gamma) * weights).sum().backward()
    for p, (n, m) in enumerate(shapes):
        c = cost.detach()[p, :n, :m].clone().requires_grad_(True)
        (loop_soft_dtw(c, gamma) * weights[p]).backward()
        torch.testing.assert_close(cost.grad[p, :n, :m], c.grad, rtol=1e-10, atol=1e-12)
        # The padded part of the cost gets no gradient.
        assert cost.grad[p, n:, :].abs().sum() == 0 and cost.grad[p, :, m:].abs().sum() == 0


@pytest.mark.parametrize("gamma", [0.1, 1.0])
def test_gradcheck(gamma):
    cost, len_n, len_m = padded_batch([(4, 3), (2, 5), (1, 1)], seed=3)
    cost.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda c: soft_dtw(c, len_n, len_m, gamma), (cost,))


def test_padded_batch_equals_per_pair_and_ignores_padding():
    shapes = [(9, 5), (3, 8), (6, 6), (1, 2)]
    cost, len_n, len_m = padded_batch(shapes, seed=4, dtype=torch.float32)
    garbage = cost.clone()
    for p, (n, m) in enumerate(shapes):   # NaN and huge values where the padding is
        garbage[p, n:, :] = math.nan
        garbage[p, :, m:] = 1e30
    for c in (cost, garbage):
        c = c.clone().requires_grad_(True)
        values = soft_dtw(c, len_n, len_m, 0.1)
        values.sum().backward()
        assert torch.isfinite(c.grad).all()
        for p, (n, m) in enumerate(shapes):
            one = cost[p:p + 1, :n, :m].clone().requires_grad_(True)
            value = soft_dtw(one, None, None, 0.1)
            value.sum().backward()
            torch.testing.assert_close(values[p], value[0], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(c.grad[p, :n, :m], one.grad[0], rtol=1e-5, atol=1e-6)
            assert c.grad[p, n:].abs().sum() == 0 and c.grad[p, :, m:].abs().sum() == 0


def test_hand_computed_cases():
    g = 0.1
    # 1 x 1: R11 = C11 + softmin(0, inf, inf) = C11.
    assert soft_dtw(torch.tensor([[[2.5]]], dtype=torch.float64), None, None, g).item() == 2.5
    # 1 x 2: R12 = C12 + softmin(inf, inf, R11) = C11 + C12.
    c = torch.tensor([[[1.0, 2.0]]], dtype=torch.float64)
    assert soft_dtw(c, None, None, g).item() == pytest.approx(3.0, abs=1e-15)
    # Identical length-2 sequences with cost [[0, d], [d, 0]]:
    # R11 = 0, R12 = R21 = d, R22 = softmin(0, d, d) = -g log(1 + 2 exp(-d / g)).
    d = 0.3
    c = torch.tensor([[[0.0, d], [d, 0.0]]], dtype=torch.float64)
    want = -g * math.log(1 + 2 * math.exp(-d / g))
    assert soft_dtw(c, None, None, g).item() == pytest.approx(want, abs=1e-15)


@pytest.mark.parametrize("gamma", [0.01, 0.1, 1.0])
def test_identical_sequences(gamma):
    # Hard DTW of a sequence with itself is 0 (the diagonal path), so soft-DTW lies in
    # [-g log 3 (2N - 2), 0]: it is <= 0, not 0, because the softmin is below the min.
    x = torch.randn(12, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    value = soft_dtw(sq_cost(x, x)[None], None, None, gamma).item()
    assert -gamma * LOG3 * (2 * 12 - 2) - 1e-12 <= value <= 1e-12
    assert value == pytest.approx(loop_soft_dtw(sq_cost(x, x), gamma).item(), abs=1e-12)


def test_bounds_and_hard_dtw_limit():
    # softmin_g(a, b, c) lies in [min - g log 3, min], and R11 = C11 exactly; so by induction
    #   DTW - g log(3) (N + M - 2) <= R[N, M] <= DTW,
    # and R[N, M] -> DTW as g -> 0.
    gen = torch.Generator().manual_seed(6)
    for n, m in [(8, 5), (3, 11), (1, 7), (10, 10)]:
        c = torch.rand(n, m, generator=gen, dtype=torch.float64) * 4
        dtw = loop_dtw(c)
        gaps = []
        for gamma in [1.0, 0.1, 0.01, 1e-3, 1e-4]:
            value = soft_dtw(c[None], None, None, gamma).item()
            assert dtw - gamma * LOG3 * (n + m - 2) - 1e-12 <= value <= dtw + 1e-12
            gaps.append(dtw - value)
        assert all(a >= b - 1e-12 for a, b in zip(gaps, gaps[1:]))  # monotone in g
        assert gaps[-1] <= 1e-4 * LOG3 * (n + m - 2) + 1e-12


def test_gradient_is_an_expected_alignment():
    # dR/dC[i, j] is the probability that the soft alignment passes through (i, j): in [0, 1],
    # 1 at both corners (every path starts at (1, 1) and ends at (N, M)), and each row sums to
    # >= 1 (every path visits every row).
    cost, len_n, len_m = padded_batch([(7, 5), (4, 9)], seed=7)
    cost.requires_grad_(True)
    soft_dtw(cost, len_n, len_m, 0.5).sum().backward()
    for p, (n, m) in enumerate([(7, 5), (4, 9)]):
        e = cost.grad[p, :n, :m]
        assert (e >= 0).all() and (e <= 1 + 1e-12).all()
        assert e[0, 0].item() == pytest.approx(1.0) and e[-1, -1].item() == pytest.approx(1.0)
        assert (e.sum(1) >= 1 - 1e-12).all() and (e.sum(0) >= 1 - 1e-12).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_costs_stay_finite(dtype):
    # Embeddings of norm ~1e3: costs ~4e6, R ~1e9. The float32 rounding of R is then far above
    # g; the weights of the backward recursion must still be <= 1 (no NaN / inf).
    gen = torch.Generator().manual_seed(8)
    x = (torch.randn(40, 16, generator=gen) * 1e3).to(dtype)
    y = (torch.randn(30, 16, generator=gen) * 1e3).to(dtype)
    for c in (sq_cost(x, y), sq_cost(x, x), torch.full((40, 30), 1e12, dtype=dtype)):
        c = c[None].clone().requires_grad_(True)
        for gamma in (0.01, 0.1, 1.0):
            value = soft_dtw(c, None, None, gamma)
            (grad,) = torch.autograd.grad(value.sum(), c)
            assert torch.isfinite(value).all() and torch.isfinite(grad).all()
            assert (grad >= 0).all() and (grad <= 1 + 1e-4).all()


def test_float64_option():
    cost, len_n, len_m = padded_batch([(20, 15), (9, 13)], seed=9, dtype=torch.float32)
    cost.requires_grad_(True)
    value = soft_dtw(cost, len_n, len_m, 0.1, dtype=torch.float64)
    assert value.dtype == torch.float32
    (grad,) = torch.autograd.grad(value.sum(), cost)
    assert grad.dtype == torch.float32
    c64 = cost.detach().double().requires_grad_(True)
    v64 = soft_dtw(c64, len_n, len_m, 0.1)
    (g64,) = torch.autograd.grad(v64.sum(), c64)
    torch.testing.assert_close(value, v64.float())
    torch.testing.assert_close(grad, g64.float())


def test_bad_arguments():
    c = torch.rand(2, 3, 4)
    with pytest.raises(ValueError):
        soft_dtw(c, torch.tensor([3, 0]), None, 0.1)
    with pytest.raises(ValueError):
        soft_dtw(c, None, torch.tensor([5, 4]), 0.1)
    with pytest.raises(ValueError):
        soft_dtw(c, None, None, 0.0)
    with pytest.raises(ValueError):
        soft_dtw(c[0], None, None, 0.1)


INTERPRETER_SCRIPT = textwrap.dedent("""
    import torch
    from alignprog.losses.softdtw import soft_dtw
    torch.manual_seed(0)
    for dtype in (torch.float64, torch.float32):
        c = torch.rand(3, 9, 7, dtype=dtype, requires_grad=True)
        ln, lm = torch.tensor([9, 4, 1]), torch.tensor([7, 7, 2])
        for gamma in (0.01, 1.0):
            a = soft_dtw(c, ln, lm, gamma, backend="torch")
            (ga,) = torch.autograd.grad(a.sum(), c)
            b = soft_dtw(c, ln, lm, gamma, backend="triton")
            (gb,) = torch.autograd.grad(b.sum(), c)
            tol = 1e-12 if dtype == torch.float64 else 1e-5
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
            torch.testing.assert_close(ga, gb, rtol=tol, atol=tol)
    print("ok")
""")


def test_triton_kernels_in_interpreter():
    """The Triton kernels' logic on the CPU, through Triton's interpreter (TRITON_INTERPRET=1
    must be set before triton is imported, hence the subprocess)."""
    triton = pytest.importorskip("triton")
    if tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 8):
        # Triton 3.6's interpreter cannot take a loaded value as a loop bound (TypeError: only
        # 0-dimensional arrays ...); compiled kernels can, and the gpu test covers those.
        pytest.skip(f"the interpreter of Triton {triton.__version__} cannot run these kernels")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", INTERPRETER_SCRIPT], env=env, cwd=root,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gpu_kernel_equals_torch_path(dtype):
    pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(10)
    cases = [[(1, 1)], [(2, 2)], [(1, 7), (7, 1)], [(513, 513)], [(1500, 1500)],
             [(513, 1500), (1500, 40), (700, 1100)], [(2048, 37), (5, 2048)]]
    # float32: values to ~1e-6 relative; gradients (probabilities in [0, 1]) differ by up to ~1e-3
    # at g = 0.01 and N = 1500 because exp/log round differently (float32 vs float64 on the CPU
    # differ by as much). float64: near exact.
    tol, grad_tol = (1e-10, 1e-8) if dtype == torch.float64 else (2e-5, 1e-2)
    for shapes in cases:
        n_max = max(n for n, _ in shapes)
        m_max = max(m for _, m in shapes)
        cost = torch.rand(len(shapes), n_max, m_max, generator=gen, dtype=dtype) * 2
        cost = cost.cuda()
        len_n = torch.tensor([n for n, _ in shapes], device="cuda")
        len_m = torch.tensor([m for _, m in shapes], device="cuda")
        for gamma in (0.01, 0.1, 1.0):
            results = []
            for backend in ("torch", "triton"):
                c = cost.clone().requires_grad_(True)
                value = soft_dtw(c, len_n, len_m, gamma, backend=backend)
                (grad,) = torch.autograd.grad((value * torch.arange(1.0, len(shapes) + 1,
                                               device="cuda", dtype=dtype)).sum(), c)
                results.append((value, grad))
            (va, ga), (vb, gb) = results
            scale = va.abs().clamp_min(1.0)
            assert ((va - vb).abs() / scale).max().item() < tol, (shapes, gamma)
            assert (ga - gb).abs().max().item() < grad_tol, (shapes, gamma)
            assert torch.isfinite(gb).all()
    # Auto selects the kernel on CUDA and equals the CPU torch path.
    cost = (torch.rand(2, 300, 200, generator=gen, dtype=dtype) * 2)
    cpu = soft_dtw(cost, None, None, 0.1)
    gpu = soft_dtw(cost.cuda(), None, None, 0.1)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=tol, atol=tol)
