"""The Triton fit of GTCC's mixtures (alignprog.losses.gmm_triton) against the torch reference
path (``lbfgs_batched``, tests/test_gmm.py compares that one with torch.optim.LBFGS).

In float64 both run the same replay of torch.optim.LBFGS with the same formulas, so they take the
same branches (same evaluation counts) and differ only by the rounding of sums and exp/log, which
the L-BFGS iterations amplify a little: J within 1e-7 (1 + J), mixtures within 1e-6 (the
interpreter run gives ~1e-10 and ~1e-8). That holds for targets up to M ~ 60. Longer targets
(M ~ 450, GTCC's) make the fit chaotic: a relative change of 1e-15 in p (one ulp) sends ~5% of
the fits of the torch path itself down another path after 8 steps, some to a worse local optimum,
some to a better one (measured on CPU). There, and in float32 (where the rounding differences
steer the line searches apart, as between the torch path and torch.optim.LBFGS), the fits are
compared by quality. The kernel's evaluation of J and its gradient is compared on its own, tightly.

Without CUDA the kernel runs in Triton's interpreter, on CPU tensors. TRITON_INTERPRET=1 must be
set before the kernel is defined, i.e. before ``alignprog.losses`` is imported, which the test
session has done long before: so that test runs this file in a subprocess (``python
tests/test_gmm_triton.py``), kept small since the interpreter is slow (~10 s on 2 cores).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from alignprog.losses import gmm_triton
from alignprog.losses.gmm import (KL_EPS, VAR_FLOOR, GMMFit, fit_gmm, gmm_value_and_grad,
                                  init_params)
from alignprog.losses.gtcc import gtcc_loss_batch
from alignprog.runtime import trusted_inputs
from test_gmm import pad, realistic_alphas

needs_triton = pytest.mark.skipif(gmm_triton.triton is None, reason="needs triton")


def soft_neighbours(lengths: list[int], *, dtype=torch.float64, seed: int = 0, nan_row: bool = False
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft-neighbour distributions alpha (E, M_max) of the given lengths (M = 1 and 2 allowed),
    optionally followed by an all-NaN row (the reference's underflowed 0/0 alpha,
    docs/reference-bugs.md#gtcc-exp-underflow)."""
    p, m = pad(realistic_alphas(lengths, dtype=dtype, seed=seed))
    if nan_row:
        p = torch.cat([p, torch.full((1, p.shape[1]), float("nan"), dtype=dtype)])
        m = torch.cat([m, m[-1:]])
    return p, m


def assert_same_fits(ref: GMMFit, got: GMMFit, *, same_path_share: float = 1.0) -> None:
    """float64 fits of the two backends agree: the same ok and, on at least ``same_path_share``
    of the fits, the same number of evaluations (the same L-BFGS path) and equal results within
    rounding; the few others (a comparison decided by the last bits) fit as well."""
    assert torch.equal(got.ok, ref.ok)
    same = got.n_evals == ref.n_evals
    assert float(same.double().mean()) >= same_path_share, (ref.n_evals, got.n_evals)
    j_ref, j_got = ref.objective[ref.ok], got.objective[ref.ok]
    assert torch.all(j_got <= j_ref + 1e-3 * (1 + j_ref))
    keep = same & ref.ok
    j_ref, j_got = ref.objective[keep], got.objective[keep]
    assert torch.all((j_got - j_ref).abs() <= 1e-7 * (1 + j_ref.abs())), (j_ref, j_got)
    assert torch.allclose(got.components[keep], ref.components[keep], rtol=0, atol=1e-6)
    assert torch.allclose(got.weights[keep], ref.weights[keep], rtol=0, atol=1e-6)
    assert torch.allclose(got.means[keep], ref.means[keep], rtol=1e-6, atol=1e-4)


def assert_as_good(ref: GMMFit, got: GMMFit, *, share: float = 1.0, slack: float = 0.02
                   ) -> None:
    """Fits of the same quality: the same ok, J_got <= J_ref + slack (1 + J_ref) on at least
    ``share`` of the fits, and the mean J no worse by more than ``slack``."""
    assert torch.equal(got.ok, ref.ok)
    j_ref, j_got = ref.objective[ref.ok].double(), got.objective[ref.ok].double()
    as_good = (j_got <= j_ref + slack * (1 + j_ref)).double().mean()
    assert float(as_good) >= share, (float(as_good), j_ref, j_got)
    assert float(j_got.mean()) <= float(j_ref.mean()) * (1 + slack) + 1e-6


def assert_same_evaluation(device: str) -> None:
    """The kernel's J and gradient equal ``gmm_value_and_grad`` at random parameters, some on
    the bounds of the clip (means at 0 and M - 1, a variance at the 0.5 floor) or beyond."""
    p, m = soft_neighbours([1, 2, 3, 8, 20, 70, 200], seed=1)
    p, m = p.to(device), m.to(device)
    gen = torch.Generator().manual_seed(1)
    params = init_params(m.cpu(), 15, p.dtype) + torch.randn(7, 45, generator=gen,
                                                              dtype=p.dtype)
    params[3, 0], params[4, 1], params[5, 15], params[6, 16] = 0.0, 19.0, 0.5, -1.0
    params = params.to(device)
    j_ref, g_ref = gmm_value_and_grad(params, p, m)
    j, g = gmm_triton.value_and_grad(params, p, m, n_components=15, kl_eps=KL_EPS,
                                     var_floor=VAR_FLOOR,
                                     log_tiny=math.log(torch.finfo(p.dtype).tiny))
    assert torch.allclose(j, j_ref, rtol=1e-12, atol=1e-14)
    assert torch.allclose(g, g_ref, rtol=1e-9, atol=1e-12 * float(g_ref.abs().max()))


def compare_backends(device: str) -> None:
    """The checks of the interpreter run: the evaluation; fits of mixed lengths with M = 1, 2
    and a NaN row; the older PyTorch line-search cap (max_ls 25); float32."""
    assert_same_evaluation(device)
    p, m = soft_neighbours([1, 2, 3, 11, 40], seed=4, nan_row=True)
    p, m = p.to(device), m.to(device)
    ref, got = fit_gmm(p, m, backend="torch"), fit_gmm(p, m, backend="triton")
    assert got.ok.tolist() == [False, True, True, True, True, False]
    assert got.n_evals[0] == got.n_evals[-1] == 0
    assert_same_fits(ref, got)

    p, m = soft_neighbours([6, 27], seed=2)
    p, m = p.to(device), m.to(device)
    assert_same_fits(fit_gmm(p, m, backend="torch", max_ls=25),
                     fit_gmm(p, m, backend="triton", max_ls=25))

    p, m = soft_neighbours([9, 30], dtype=torch.float32, seed=5)
    p, m = p.to(device), m.to(device)
    assert_as_good(fit_gmm(p, m, backend="torch"), fit_gmm(p, m, backend="triton"))


def test_backend_choice():
    p, m = soft_neighbours([5, 8])
    with pytest.raises(ValueError, match="backend"):
        fit_gmm(p, m, backend="cuda")
    with pytest.raises(ValueError, match="triton"):
        fit_gmm(p.half(), m, backend="triton")
    # "auto" on CPU tensors is the torch path, bit for bit.
    auto, ref = fit_gmm(p, m), fit_gmm(p, m, backend="torch")
    assert torch.equal(auto.components, ref.components) and torch.equal(auto.n_evals, ref.n_evals)


@needs_triton
@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA present: the gpu test runs the kernel")
def test_triton_equals_torch_interpreted():
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-W", "ignore::RuntimeWarning", __file__], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.gpu
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_equals_torch_cuda():
    compare_backends("cuda")
    # GTCC's size at B = 8: 1120 fits of M ~ 450, where the fit is chaotic (see the top):
    # compare the quality, in float64 and in float32 (training's dtype).
    gen = torch.Generator().manual_seed(3)
    p, m = soft_neighbours(torch.randint(380, 451, (1120,), generator=gen).tolist(), seed=3)
    for dtype, share in ((torch.float64, 0.85), (torch.float32, 0.6)):
        pd, md = p.to("cuda", dtype), m.cuda()
        assert_as_good(fit_gmm(pd, md, backend="torch"), fit_gmm(pd, md, backend="triton"),
                       share=share, slack=0.05)


@pytest.mark.gpu
@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_on_cuda():
    p, m = soft_neighbours([7, 30, 64], dtype=torch.float32)
    p, m = p.cuda(), m.cuda()
    x = torch.randn(2, 50, 16, device="cuda")
    mask = torch.arange(50, device="cuda")[None, :] < torch.tensor([[50], [41]], device="cuda")
    kw = dict(drop=torch.randn(2, 17, device="cuda"), generator=torch.Generator().manual_seed(0))
    fit_gmm(p, m)                                   # compile and warm up first
    with trusted_inputs():                          # the input checks would read values
        gtcc_loss_batch(x, mask, **kw)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fit = fit_gmm(p, m)
        with trusted_inputs():
            loss = gtcc_loss_batch(x, mask, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert bool(fit.ok.all()) and bool(torch.isfinite(loss))


if __name__ == "__main__":  # the interpreter run of test_triton_equals_torch_interpreted
    torch.set_num_threads(1)
    compare_backends("cpu")
