"""LAV (docs/algorithms.md#lav, reductions docs/algorithms.md#pairs-and-reduction) against plain
float64 loops, with the reference's constant in-window term
(docs/reference-bugs.md#lav-regulariser-constant-pull) and pinned values."""

from __future__ import annotations

import math

import pytest
import torch

from alignprog.losses.common import pad_sequences
from alignprog.losses.lav import lav_loss, lav_loss_batch

from helpers import loop_intra_contrast

LOG3 = math.log(3.0)


# --- the documented formulas as loops -----------------------------------------------------------

def loop_soft_dtw(u: list[list[float]], v: list[list[float]], gamma: float) -> float:
    """docs/algorithms.md#soft-dtw: C_nm = ||u_n - v_m||^2; R00 = 0, borders +inf, softmin with
    the max-shift."""
    n, m = len(u), len(v)
    r = [[math.inf] * (m + 1) for _ in range(n + 1)]
    r[0][0] = 0.0
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            cost = sum((a - b) ** 2 for a, b in zip(u[i - 1], v[j - 1]))
            prev = (r[i - 1][j - 1], r[i - 1][j], r[i][j - 1])
            lo = min(prev)
            r[i][j] = cost + lo - gamma * math.log(sum(math.exp(-(x - lo) / gamma) for x in prev))
    return r[n][m]


def loop_lav(seqs, *, min_temp=0.1, cr_coefficient=0.01, window=15, margin=2.0,
             compat="fixed", reduction="reference") -> float:
    """Every ordered pair (i, j), i != j, soft-DTW computed for that order
    (docs/algorithms.md#lav)."""
    lists = [s.tolist() for s in seqs]
    regs = [loop_intra_contrast(u, window, margin, compat) for u in lists]
    terms = []
    for i, u in enumerate(lists):
        for j, v in enumerate(lists):
            if i == j:
                continue
            pair = loop_soft_dtw(u, v, min_temp) + cr_coefficient * (regs[i] + regs[j])
            terms.append(pair if reduction == "reference" else pair / (len(u) + len(v)))
    if reduction == "reference":
        return sum(terms)
    return sum(terms) / len(terms)


def videos(lengths, dim=3, seed=0, scale=1.0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(n, dim, generator=gen)).to(dtype) for n in lengths]


# --- values -------------------------------------------------------------------------------------

@pytest.mark.parametrize("compat", ["fixed", "reference"])
@pytest.mark.parametrize("reduction", ["reference", "mean"])
@pytest.mark.parametrize("window", [15, 3])
def test_matches_loop(compat, reduction, window):
    # window 3 < the lengths, so the push term (far-apart frames) takes part too.
    seqs = videos([7, 5, 9], seed=1)
    kw = dict(min_temp=0.1, cr_coefficient=0.01, window=window, margin=2.0, compat=compat,
              reduction=reduction)
    got = lav_loss(seqs, **kw).item()
    assert got == pytest.approx(loop_lav(seqs, **kw), rel=1e-11, abs=1e-11)


@pytest.mark.parametrize("gamma", [0.01, 1.0])
def test_matches_loop_other_settings(gamma):
    seqs = videos([4, 6], seed=2, scale=0.3)
    kw = dict(min_temp=gamma, cr_coefficient=0.5, window=2, margin=1.0)
    assert lav_loss(seqs, **kw).item() == pytest.approx(loop_lav(seqs, **kw), rel=1e-11)


def test_pinned_values():
    """A forward value on fixed inputs, pinned (from the loops above), so that a later memory or
    speed refactor cannot silently change the loss
    (docs/reference-bugs.md#memory-refactors-changed-losses)."""
    t = torch.arange(6, dtype=torch.float64)
    a = torch.stack([torch.cos(t / 2), torch.sin(t / 3), t / 5], 1)             # (6, 3)
    b = torch.stack([torch.cos(t[:4] / 2 + 0.3), torch.sin(t[:4] / 3), t[:4] / 4], 1)
    for compat, window, want in [("fixed", 15, PINNED_FIXED), ("reference", 15, PINNED_REF),
                                 ("fixed", 3, PINNED_FIXED_W3)]:
        got = lav_loss([a, b], compat=compat, window=window).item()
        assert got == pytest.approx(loop_lav([a, b], compat=compat, window=window), rel=1e-12)
        assert got == pytest.approx(want, rel=1e-10)


# Computed once with loop_lav (float64) on the inputs of test_pinned_values.
PINNED_FIXED = 10.073895929256773
PINNED_REF = 13.134587251809757
PINNED_FIXED_W3 = 3.465554693140356


def test_reference_mode_constant_in_window_term():
    # The reference's constant term by hand: with every frame pair in the window (T = 3 < 15),
    # the reference C(U) is margin * sum_ab ((a - b)^2 + 1) = 2 * (3 * 1 + 4 * 2 + 2 * 5) = 42 for
    # any embeddings, and it has no gradient. B = 2: total = 2 SoftDTW + c_r * 2 * (42 + 42).
    seqs = [s.requires_grad_(True) for s in videos([3, 3], seed=3)]
    total = lav_loss(seqs, compat="reference", cr_coefficient=0.01)
    sdtw_only = lav_loss(seqs, compat="reference", cr_coefficient=0.0)
    assert (total - sdtw_only).item() == pytest.approx(0.01 * 2 * (42 + 42), rel=1e-12)
    g_total = torch.autograd.grad(total, seqs)
    g_sdtw = torch.autograd.grad(sdtw_only, seqs)
    for a, b in zip(g_total, g_sdtw):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # The fixed mode pulls in-window frames together instead: the regulariser has a gradient.
    fixed = lav_loss(seqs, compat="fixed", cr_coefficient=0.01)
    g_fixed = torch.autograd.grad(fixed, seqs)
    assert any((a - b).abs().max() > 1e-6 for a, b in zip(g_fixed, g_sdtw))


def test_reduction_mean_vs_reference():
    seqs = videos([6, 6, 6], seed=4)
    total = lav_loss(seqs, reduction="reference").item()
    mean = lav_loss(seqs, reduction="mean").item()
    # Equal lengths N: mean = total / (B (B - 1) * 2N).
    assert mean == pytest.approx(total / (3 * 2 * 12), rel=1e-12)
    seqs = videos([4, 7, 2], seed=5)
    assert lav_loss(seqs, reduction="mean").item() == pytest.approx(
        loop_lav(seqs, reduction="mean"), rel=1e-11)


# --- invariances --------------------------------------------------------------------------------

@pytest.mark.parametrize("compat", ["fixed", "reference"])
def test_swap_videos(compat):
    a, b = videos([5, 8], seed=6)
    assert lav_loss([a, b], compat=compat).item() == pytest.approx(
        lav_loss([b, a], compat=compat).item(), rel=1e-13)


@pytest.mark.parametrize("reduction", ["reference", "mean"])
def test_padded_batch_equals_pairs_one_at_a_time(reduction):
    seqs = videos([5, 9, 3, 7], seed=7)
    batch = lav_loss(seqs, reduction=reduction).item()
    # Each unordered pair once as a B = 2 batch (which holds both orders (i, j) and (j, i)).
    per_pair = [lav_loss([seqs[i], seqs[j]], reduction=reduction).item()
                for i in range(4) for j in range(i + 1, 4)]
    want = sum(per_pair) if reduction == "reference" else sum(per_pair) / len(per_pair)
    assert batch == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("compat", ["fixed", "reference"])
def test_padding_garbage_changes_nothing(compat):
    seqs = videos([6, 3, 4], seed=8)
    x, mask = pad_sequences(seqs)
    x = x.clone().requires_grad_(True)
    clean = lav_loss_batch(x, mask, compat=compat, window=2)
    (g_clean,) = torch.autograd.grad(clean, x)
    dirty = x.detach().clone()
    dirty[1, 3:] = math.nan
    dirty[2, 4:] = 1e30
    dirty.requires_grad_(True)
    value = lav_loss_batch(dirty, mask, compat=compat, window=2)
    (g_dirty,) = torch.autograd.grad(value, dirty)
    assert value.item() == clean.item()
    torch.testing.assert_close(g_dirty, g_clean, rtol=0, atol=0)
    assert g_dirty[~mask].abs().sum() == 0


def test_identical_videos():
    # Soft-DTW is not a divergence, so LAV has no exact minimum at identical videos. What holds:
    # the alignment term of two identical videos lies in [-g log 3 (2N - 2), 0] (hard DTW = 0),
    # and the regulariser is the same for both, so total = 2 SoftDTW(U, U) + 4 c_r C(U).
    (u,) = videos([8], seed=9)
    align = lav_loss([u, u.clone()], min_temp=0.1, cr_coefficient=0.0).item() / 2
    assert -0.1 * LOG3 * (2 * 8 - 2) - 1e-12 <= align <= 1e-12
    total = lav_loss([u, u.clone()], min_temp=0.1, cr_coefficient=0.01).item()
    reg = loop_intra_contrast(u.tolist(), 15, 2.0, "fixed")
    assert total == pytest.approx(2 * align + 4 * 0.01 * reg, rel=1e-12)


def test_fewer_than_two_videos_give_connected_zero():
    (u,) = videos([5], seed=10)
    u.requires_grad_(True)
    value = lav_loss([u])
    assert value.item() == 0.0 and value.requires_grad
    value.backward()
    assert u.grad is not None and u.grad.abs().sum() == 0


# --- gradients and adversarial inputs -----------------------------------------------------------

@pytest.mark.parametrize("compat", ["fixed", "reference"])
@pytest.mark.parametrize("reduction", ["reference", "mean"])
def test_gradcheck(compat, reduction):
    seqs = videos([4, 3, 5], seed=11, dim=2)
    x, mask = pad_sequences(seqs)
    x.requires_grad_(True)
    # window 2 and margin 2.5 make the push term active for some far-apart frame pairs.
    assert torch.autograd.gradcheck(
        lambda z: lav_loss_batch(z, mask, window=2, margin=2.5, compat=compat,
                                 reduction=reduction, cr_coefficient=0.1), (x,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("compat", ["fixed", "reference"])
def test_adversarial_inputs_stay_finite(dtype, compat):
    gen = torch.Generator().manual_seed(12)
    far = [(1e3 * torch.randn(n, 8, generator=gen)).to(dtype) for n in (20, 13)]
    cases = [
        far,                                                        # norm ~1e3, far apart
        [far[0], far[0] + 1e3],                                     # shifted copies
        [torch.ones(1, 8, dtype=dtype), torch.zeros(2, 8, dtype=dtype)],   # lengths 1 and 2
        [torch.zeros(1, 8, dtype=dtype), torch.zeros(1, 8, dtype=dtype)],  # identical, length 1
        [torch.ones(20, 8, dtype=dtype), torch.ones(17, 8, dtype=dtype)],  # duplicated frames
        [far[0], far[0].clone()],                                   # identical videos
    ]
    for seqs in cases:
        seqs = [s.clone().requires_grad_(True) for s in seqs]
        for reduction in ("reference", "mean"):
            value = lav_loss(seqs, compat=compat, reduction=reduction, window=4)
            grads = torch.autograd.grad(value, seqs)
            assert torch.isfinite(value), (value, [s.shape for s in seqs])
            assert all(torch.isfinite(g).all() for g in grads)


def test_float32_matches_float64():
    seqs = videos([30, 24, 27], seed=13, dim=16)
    v64 = lav_loss(seqs).item()
    v32 = lav_loss([s.float() for s in seqs]).item()
    assert v32 == pytest.approx(v64, rel=1e-5)


def test_bad_mask_raises():
    x = torch.randn(2, 4, 3)
    with pytest.raises(ValueError):
        lav_loss_batch(x, torch.tensor([[True, False, True, True], [True] * 4]))
    with pytest.raises(ValueError):
        lav_loss_batch(x, torch.ones(2, 4, dtype=torch.bool), compat="paper")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compat", ["fixed", "reference"])
def test_cpu_and_cuda_agree(compat):
    for dtype, rel in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        seqs = videos([120, 97, 64], seed=14, dim=32, dtype=dtype)
        values, grads = [], []
        for device in ("cpu", "cuda"):
            xs = [s.to(device).requires_grad_(True) for s in seqs]
            value = lav_loss(xs, compat=compat)
            values.append(value.item())
            grads.append([g.cpu() for g in torch.autograd.grad(value, xs)])
        assert values[1] == pytest.approx(values[0], rel=rel)
        for a, b in zip(*grads):
            scale = a.abs().max().clamp_min(1.0)
            assert ((a - b).abs().max() / scale).item() < rel * 100
