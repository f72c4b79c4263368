"""VAVA loss (docs/algorithms.md#vava): values against a float64 loop reference written from the
documented equations, invariances, adversarial inputs, the reference-mode bugs it reproduces
(the vava-* entries of docs/reference-bugs.md)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from alignprog.losses.common import pad_sequences
from alignprog.losses.vava import (optimality_offsets, vava_loss, vava_loss_batch, vava_phi,
                                   vava_terms)

from helpers import loop_intra_contrast

COMPATS = ("fixed", "reference")


# --------------------------------------------------------------------------------------------
# Plain loop reference (numpy float64) of docs/algorithms.md#vava and
# docs/algorithms.md#intra-video-regulariser, one pair at a time.


def loop_pair(u: np.ndarray, v: np.ndarray, *, compat: str, phi: float, eps: float | None = None,
              max_iter: int = 20, lambda1: float = 1.0, lambda2: float = 0.1, gamma: float = 0.5,
              zeta: float = 0.5, delta: float = 0.6, window: int = 15,
              margin: float = 2.0) -> dict:
    n, m = len(u), len(v)
    n1, m1 = n + 1, m + 1
    cost = np.full((n1, m1), zeta)
    for i in range(n):
        for j in range(m):
            cost[i + 1, j + 1] = np.linalg.norm(u[i] - v[j])
    if eps is None:
        eps = float(n) if compat == "reference" else 0.1 * cost[1:, 1:].mean()
    k = np.exp(-cost / eps)
    a, b = 1.0 / n1, 1.0 / m1
    us, vs = [a] * n1, [b] * m1
    for _ in range(max_iter):
        for j in range(m1):
            vs[j] = b / sum(k[i, j] * us[i] for i in range(n1))
        for i in range(n1):
            us[i] = a / sum(k[i, j] * vs[j] for j in range(m1))
    plan = np.array([[us[i] * k[i, j] * vs[j] for j in range(m1)] for i in range(n1)])
    dist = 1e6 * plan.sum() / (n1 * m1) if compat == "reference" else float((plan * cost).sum())
    r = [int(np.argmax(plan[i, :])) for i in range(n1)]
    c = [int(np.argmax(plan[:, j])) for j in range(m1)]
    rmin = [int(np.argmin(plan[i, :])) for i in range(n1)]
    cmin = [int(np.argmin(plan[:, j])) for j in range(m1)]
    norm = math.sqrt(1 / n1 ** 2 + 1 / m1 ** 2)

    def gauss(x):
        return math.exp(-x ** 2 / (2 * delta ** 2)) / (delta * math.sqrt(2 * math.pi))

    prior = np.zeros((n1, m1))
    reward = 0.0
    for i in range(n1):
        for j in range(m1):
            l_c = abs(j / m1 - i / n1) / norm
            if compat == "reference":
                oc, orow = (j - c[j]) / n1, (i - r[i]) / n1
            else:
                oc, orow = (j - r[i]) / m1, (i - c[j]) / n1
            l_o = (abs(oc) + abs(orow)) / (2 * norm)
            prior[i, j] = phi * gauss(l_c) + (1 - phi) * gauss(l_o)
            i_c = 1 / ((j / m1 - i / n1) ** 2 + 1)
            i_o = 1 / (0.5 * oc ** 2 + 0.5 * orow ** 2 + 1)
            reward += plan[i, j] * (phi * i_c + (1 - phi) * i_o)
    if compat == "fixed":
        prior = prior / prior.sum()
    kl = sum(plan[i, j] * math.log((plan[i, j] + 1e-8) / (prior[i, j] + 1e-8))
             for i in range(n1) for j in range(m1))
    core = dist - lambda1 * (n + m) * reward + lambda2 * (n * m / 4) * kl
    cxy = 0.0
    for i in range(n1):
        for j in range(m1):
            if r[i] == j and c[j] == i:
                cxy += cost[i, j]
            if rmin[i] == j and cmin[j] == i:
                cxy += -cost[i, j] if compat == "reference" else max(0.0, margin - cost[i, j])
    cx = loop_intra_contrast(u, window, margin, compat)
    cy = loop_intra_contrast(v, window, margin, compat)
    loss = core + gamma * (cx + cy + cxy)
    return dict(loss=loss, dist=dist, plan=plan, reward=reward, kl=kl, cxy=cxy, eps=eps,
                prior=prior)


def loop_total(seqs, *, compat, phi, reduction="reference", **kw) -> float:
    vals = []
    for p, u in enumerate(seqs):
        for q, v in enumerate(seqs):
            if p != q:
                out = loop_pair(u.numpy(), v.numpy(), compat=compat, phi=phi, **kw)["loss"]
                vals.append(out / (len(u) + len(v)) if reduction == "mean" else out)
    return sum(vals) if reduction == "reference" else sum(vals) / len(vals)


def make_seqs(lengths, dim=3, seed=0, dtype=torch.float64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(n, dim, generator=g, dtype=dtype) for n in lengths]


# --------------------------------------------------------------------------------------------
# Values


@pytest.mark.parametrize("compat", COMPATS)
@pytest.mark.parametrize("reduction", ["reference", "mean"])
def test_value_matches_loop_reference(compat, reduction):
    seqs = make_seqs([4, 6, 3], seed=1)
    # window 3 so both parts of C(U) (push outside the window, in-window term) take part; a late
    # step so that phi (0.932) mixes both priors.
    kw = dict(window=3, global_step=5000)
    got = vava_loss(seqs, compat=compat, reduction=reduction, **kw)
    want = loop_total(seqs, compat=compat, phi=vava_phi(5000), reduction=reduction, window=3)
    assert got.item() == pytest.approx(want, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("compat", COMPATS)
def test_terms_match_loop_reference(compat):
    seqs = make_seqs([5, 3], seed=2)
    terms = vava_terms(*pad_sequences(seqs), compat=compat, global_step=20000,
                       phi_schedule="exp", lambda1=0.7, lambda2=0.3, gamma=0.2, zeta=0.8,
                       delta=0.9, margin=1.5)
    phi = vava_phi(20000, "exp")
    assert phi == 0.001
    for p in range(2):
        i, j = int(terms.first[p]), int(terms.second[p])
        want = loop_pair(seqs[i].numpy(), seqs[j].numpy(), compat=compat, phi=phi, lambda1=0.7,
                         lambda2=0.3, gamma=0.2, zeta=0.8, delta=0.9, margin=1.5)
        n1, m1 = len(seqs[i]) + 1, len(seqs[j]) + 1
        np.testing.assert_allclose(terms.plan[p, :n1, :m1].numpy(), want["plan"], rtol=1e-9)
        np.testing.assert_allclose(terms.prior[p, :n1, :m1].numpy(), want["prior"], rtol=1e-9)
        for key, name in [("dist", "dist"), ("reward", "reward"), ("kl", "kl"),
                          ("contrast_xy", "cxy"), ("eps", "eps"), ("loss", "loss")]:
            assert getattr(terms, key)[p].item() == pytest.approx(want[name], rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("compat", COMPATS)
def test_explicit_epsilon_matches_loop(compat):
    seqs = make_seqs([3, 4], seed=3)
    got = vava_loss(seqs, compat=compat, epsilon=0.3)
    assert got.item() == pytest.approx(loop_total(seqs, compat=compat, phi=0.999, eps=0.3),
                                       rel=1e-9)


def test_pinned_reference_value():
    # The fork's memory refactors silently changed VAVA (mean for sum, eps = lambda2, C_XY
    # dropped, /NM; docs/reference-bugs.md#memory-refactors-changed-losses).
    # A pinned forward value on fixed inputs catches such drift; it equals the loop reference.
    k = torch.arange(5, dtype=torch.float64)
    u = torch.stack([torch.cos(k), torch.sin(0.7 * k), 0.1 * k], 1)           # (5, 3)
    v = torch.stack([torch.cos(k[:4] + 0.3), torch.sin(0.5 * k[:4]), 0.2 * k[:4]], 1)  # (4, 3)
    for compat, pinned in PINNED.items():
        got = vava_loss([u, v], compat=compat, global_step=49).item()
        assert got == pytest.approx(loop_total([u, v], compat=compat, phi=vava_phi(49)),
                                    rel=1e-10)
        assert got == pytest.approx(pinned, rel=1e-9)


# Loop-reference values of the inputs above at epoch/step 49 (phi = 0.999^7).
PINNED = {"reference": 67007.66062699948, "fixed": 255.26768809000907}


def test_phi_schedule():
    # docs/algorithms.md#vava: at e = 49, 0.993 (the fork's sqrt form) and 0.951 (the original
    # release's exp form); clipped to [0.001, 0.999].
    assert vava_phi(49) == pytest.approx(0.999 ** 7)
    assert round(vava_phi(49), 3) == 0.993
    assert round(vava_phi(49, "exp"), 3) == 0.951
    assert vava_phi(0) == 0.999 and vava_phi(0, "exp") == 0.999
    assert vava_phi(10 ** 9, "exp") == 0.001
    # Per optimiser step (the fixed mode, docs/reference-bugs.md#vava-phi-indexed-by-epoch):
    # 7500 steps (50 epochs of 150 steps) decays to 0.999^86.
    assert vava_phi(7499) == pytest.approx(0.999 ** 86)
    with pytest.raises(ValueError):
        vava_phi(0, "linear")


# --------------------------------------------------------------------------------------------
# Fixed-mode properties (the vava-* corrections of docs/reference-bugs.md)


def test_fixed_plan_marginals_and_transport_cost():
    seqs = make_seqs([6, 9, 4], dim=4, seed=4)
    for iters, tol in [(20, 1e-2), (300, 1e-9)]:
        terms = vava_terms(*pad_sequences(seqs), max_iter=iters)
        for p in range(terms.plan.shape[0]):
            n1, m1 = int(terms.n[p]) + 1, int(terms.m[p]) + 1
            block = terms.plan[p, :n1, :m1]
            # Rows are exact after the last u update; columns converge with the iterations.
            np.testing.assert_allclose(block.sum(1).numpy(), 1 / n1, rtol=1e-12)
            np.testing.assert_allclose(block.sum(0).numpy(), 1 / m1, rtol=tol)
            assert terms.plan[p].sum().item() == pytest.approx(block.sum().item())  # padding 0
            assert terms.dist[p].item() == pytest.approx((block * terms.cost[p, :n1, :m1]).sum()
                                                         .item(), rel=1e-12)
            assert terms.prior[p].sum().item() == pytest.approx(1.0)  # normalised P
            real = terms.cost[p, 1:n1, 1:m1]
            assert terms.eps[p].item() == pytest.approx(0.1 * real.mean().item())


def test_fixed_push_is_bounded():
    # The reference -Abar*D push falls without limit as the videos move apart
    # (docs/reference-bugs.md#vava-contrastive-push-unbounded); the hinge keeps C_XY >= 0 (and
    # the loss bounded below by the other terms).
    seqs = make_seqs([6, 5], dim=4, seed=5, scale=1e3)
    ref = vava_terms(*pad_sequences(seqs), compat="reference")
    fix = vava_terms(*pad_sequences(seqs), compat="fixed")
    assert (ref.contrast_xy < -1e3).all()
    assert (fix.contrast_xy >= 0).all()


def test_identical_videos_align_on_the_diagonal():
    # VAVA has no exact minimum at U = V (the KL and C(U) terms do not vanish), and its transport
    # cost ignores frame order (OT is invariant to permuting V's frames). What holds in fixed
    # mode: the plan of two identical videos peaks on the matching frame of every real row, and
    # against the time-reversed copy the transport cost is equal while the order-aware priors
    # make the loss larger (more reward I(T), less KL for U = V).
    for seed in range(3):
        u = make_seqs([7], dim=4, seed=seed)[0]
        same = vava_terms(*pad_sequences([u, u]))
        rev = vava_terms(*pad_sequences([u, u.flip(0)]))
        assert torch.equal(same.plan[0, 1:, 1:].argmax(1), torch.arange(7))
        torch.testing.assert_close(same.dist, rev.dist, rtol=1e-12, atol=1e-12)
        assert (same.reward > rev.reward).all() and (same.kl < rev.kl).all()
        assert (same.loss < rev.loss).all()


# --------------------------------------------------------------------------------------------
# Reference-mode behaviour


def test_reference_dist_is_constant():
    # sum(T) = 1 so "dist" = 1e6/(N'M') whatever the embeddings, with ~zero gradient
    # (docs/reference-bugs.md#vava-transport-cost-constant).
    seqs = [s.requires_grad_() for s in make_seqs([4, 2, 6], seed=7)]
    terms = vava_terms(*pad_sequences(seqs), compat="reference")
    want = 1e6 / ((terms.n + 1) * (terms.m + 1)).double()
    torch.testing.assert_close(terms.dist, want, rtol=1e-12, atol=0)
    grads = torch.autograd.grad(terms.dist.sum(), seqs)
    assert max(g.abs().max().item() for g in grads) < 1e-6
    assert 1e6 / (3 * 5) == pytest.approx(terms.dist[(terms.n == 2) & (terms.m == 4)].item())


def test_reference_plan_near_uniform_with_eps_n():
    # eps = N makes T almost uniform (measured max/min 1.2-1.8,
    # docs/reference-bugs.md#vava-sinkhorn-epsilon-too-large); the fixed eps does not.
    seqs = make_seqs([12, 10], dim=8, seed=8)
    ref = vava_terms(*pad_sequences(seqs), compat="reference")
    fix = vava_terms(*pad_sequences(seqs), compat="fixed")
    assert ref.eps.tolist() == [12.0, 10.0]
    for p in range(2):
        n1, m1 = int(ref.n[p]) + 1, int(ref.m[p]) + 1
        r, f = ref.plan[p, :n1, :m1], fix.plan[p, :n1, :m1]
        assert (r.max() / r.min()).item() < 2.0
        assert (f.max() / f.min()).item() > 1e3


def test_reference_prior_not_normalised_and_offsets_by_hand():
    seqs = make_seqs([3, 5], seed=9)
    ref = vava_terms(*pad_sequences(seqs), compat="reference")
    assert not ref.prior[0].sum().item() == pytest.approx(1.0, rel=1e-3)   # P unnormalised
    # Offsets of entry (i=1, j=3) with N'=2, M'=4, r_1 = 0, c_3 = 0
    # (docs/reference-bugs.md#vava-optimality-offsets-mixed):
    one = lambda x: torch.tensor(float(x), dtype=torch.float64)  # noqa: E731
    args = (one(1), one(3), one(0), one(0), one(2), one(4))
    col, row = optimality_offsets(*args, compat="reference")
    assert (col.item(), row.item()) == (3 / 2, 1 / 2)   # (j - c_j)/N', (i - r_i)/N'
    col, row = optimality_offsets(*args, compat="fixed")
    assert (col.item(), row.item()) == (3 / 4, 1 / 2)   # (j - r_i)/M', (i - c_j)/N'


def test_reference_contrast_xy_unbounded_form():
    # Reference C_XY = sum (A - Abar) * D over the augmented D (zeta entries included).
    seqs = make_seqs([4, 3], seed=10)
    t = vava_terms(*pad_sequences(seqs), compat="reference")
    for p in range(2):
        n1, m1 = int(t.n[p]) + 1, int(t.m[p]) + 1
        plan, cost = t.plan[p, :n1, :m1], t.cost[p, :n1, :m1]
        a = (plan == plan.max(1, keepdim=True).values) & (plan == plan.max(0, keepdim=True).values)
        ab = (plan == plan.min(1, keepdim=True).values) & (plan == plan.min(0, keepdim=True).values)
        want = (cost * a).sum() - (cost * ab).sum()
        assert t.contrast_xy[p].item() == pytest.approx(want.item(), rel=1e-12)


def test_intra_contrast_forms_by_hand():
    # docs/reference-bugs.md#lav-regulariser-constant-pull via intra_contrast: two frames at
    # distance 3, window 15. Reference: constant in-window term
    # sum w*margin = (1 + 2 + 2 + 1) * 2 = 12. Fixed: pull sum w*d = 2 * (2 * 3) = 12 too,
    # so use distance 1 -> 4.
    u = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    v = torch.tensor([[0.0, 0.0]], dtype=torch.float64)
    for compat, cu in [("reference", 12.0), ("fixed", 4.0)]:
        t = vava_terms(*pad_sequences([u, v]), compat=compat)
        assert t.contrast_x[0].item() == pytest.approx(cu)
        assert t.contrast_y[0].item() == pytest.approx(2.0 if compat == "reference" else 0.0)


def test_reference_reduction_is_a_sum_and_mean_divides_by_frames():
    # docs/algorithms.md#pairs-and-reduction: "reference" sums the ordered pairs; "mean"
    # averages pair/(N + M).
    seqs = make_seqs([4, 6, 3], seed=11)
    for compat in COMPATS:
        t = vava_terms(*pad_sequences(seqs), compat=compat)
        total = vava_loss(seqs, compat=compat)
        mean = vava_loss(seqs, compat=compat, reduction="mean")
        assert total.item() == pytest.approx(t.loss.sum().item(), rel=1e-12)
        assert mean.item() == pytest.approx((t.loss / (t.n + t.m)).mean().item(), rel=1e-12)
    eq = make_seqs([5, 5], seed=12)
    for compat in COMPATS:
        assert vava_loss(eq, compat=compat, reduction="mean").item() == pytest.approx(
            vava_loss(eq, compat=compat).item() / (2 * 10), rel=1e-12)


# --------------------------------------------------------------------------------------------
# Invariances


@pytest.mark.parametrize("compat", COMPATS)
def test_swap_two_videos(compat):
    seqs = make_seqs([5, 3], seed=13)
    a = vava_loss(seqs, compat=compat)
    b = vava_loss(seqs[::-1], compat=compat)
    assert a.item() == pytest.approx(b.item(), rel=1e-12)


@pytest.mark.parametrize("compat", COMPATS)
@pytest.mark.parametrize("reduction", ["reference", "mean"])
def test_padded_batch_equals_pairs_one_at_a_time(compat, reduction):
    seqs = make_seqs([5, 2, 4], seed=14)
    whole = vava_loss(seqs, compat=compat, reduction=reduction)
    # Each B = 2 call holds both orders of one unordered pair.
    parts = [vava_loss([seqs[i], seqs[j]], compat=compat, reduction=reduction)
             for i in range(3) for j in range(i + 1, 3)]
    want = sum(parts) if reduction == "reference" else sum(parts) / 3
    assert whole.item() == pytest.approx(want.item(), rel=1e-11)


@pytest.mark.parametrize("compat", COMPATS)
def test_padding_garbage_changes_nothing(compat):
    seqs = make_seqs([5, 2, 4], seed=15)
    x, mask = pad_sequences(seqs)
    junk = x.clone()
    junk[~mask] = torch.tensor([1e30, float("nan"), -7.0], dtype=x.dtype)
    x.requires_grad_()
    junk.requires_grad_()
    a = vava_loss_batch(x, mask, compat=compat)
    b = vava_loss_batch(junk, mask, compat=compat)
    assert a.item() == b.item()
    ga, = torch.autograd.grad(a, x)
    gb, = torch.autograd.grad(b, junk)
    assert torch.equal(ga, gb)
    assert (gb[~mask] == 0).all()


def test_fewer_than_two_videos_gives_attached_zero():
    x = torch.randn(1, 4, 3, requires_grad=True)
    out = vava_loss_batch(x, torch.ones(1, 4, dtype=torch.bool))
    assert out.item() == 0.0 and out.requires_grad
    out.backward()
    assert (x.grad == 0).all()


# --------------------------------------------------------------------------------------------
# Gradients and adversarial inputs


@pytest.mark.parametrize("compat", COMPATS)
def test_gradcheck(compat):
    seqs = make_seqs([3, 2, 4], dim=2, seed=16)
    x, mask = pad_sequences(seqs)
    x.requires_grad_()
    # window 2 so the regulariser's push part has a gradient; argmax masks are locally constant.
    assert torch.autograd.gradcheck(
        lambda t: vava_loss_batch(t, mask, compat=compat, window=2, global_step=3000), (x,))


@pytest.mark.parametrize("compat", COMPATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["far", "short", "duplicated", "identical", "tiny_eps"])
def test_adversarial_inputs_stay_finite(compat, dtype, case):
    g = torch.Generator().manual_seed(17)
    kw = {}
    if case == "far":              # norm ~1e3: exp(-D/eps) underflows in the plain domain
        seqs = [1e3 * torch.randn(n, 8, generator=g) for n in (6, 9, 3)]
    elif case == "short":          # length-1 and length-2 videos
        seqs = [torch.randn(n, 8, generator=g) for n in (1, 2, 1)]
    elif case == "duplicated":     # every frame the same inside a video
        seqs = [torch.randn(1, 8, generator=g).expand(n, 8).clone() for n in (5, 3)]
    elif case == "identical":      # two identical videos of identical frames: D = 0
        seqs = [torch.ones(4, 8), torch.ones(4, 8)]
    else:
        seqs = [torch.randn(n, 8, generator=g) for n in (6, 4)]
        kw = dict(epsilon=1e-4)
    seqs = [s.to(dtype).requires_grad_() for s in seqs]
    for reduction in ("reference", "mean"):
        out = vava_loss(seqs, compat=compat, reduction=reduction, **kw)
        grads = torch.autograd.grad(out, seqs)
        assert torch.isfinite(out)
        assert all(torch.isfinite(gr).all() for gr in grads)


def test_bad_arguments():
    seqs = make_seqs([3, 3])
    with pytest.raises(ValueError):
        vava_loss(seqs, compat="paper")
    with pytest.raises(ValueError):
        vava_loss(seqs, reduction="sum")
    with pytest.raises(ValueError):
        vava_loss(seqs, epsilon=0.0)
    with pytest.raises(ValueError):
        vava_loss(seqs, phi_schedule="cosine")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compat", COMPATS)
def test_cpu_and_cuda_agree(compat):
    seqs = make_seqs([12, 7, 9, 3], dim=16, seed=18)
    x, mask = pad_sequences(seqs)
    outs = []
    for dev in ("cpu", "cuda"):
        xd = x.to(dev).requires_grad_()
        val = vava_loss_batch(xd, mask.to(dev), compat=compat, window=4)
        grad, = torch.autograd.grad(val, xd)
        outs.append((val.cpu(), grad.cpu()))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-7, atol=1e-7)
    # float32 on the GPU, far-apart embeddings: finite.
    xf = (1e3 * x).float().cuda().requires_grad_()
    val = vava_loss_batch(xf, mask.cuda(), compat=compat)
    grad, = torch.autograd.grad(val, xf)
    assert torch.isfinite(val) and torch.isfinite(grad).all()
