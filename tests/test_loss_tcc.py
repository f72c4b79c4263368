"""TCC loss (docs/algorithms.md#tcc, reduction docs/algorithms.md#pairs-and-reduction).

Values are checked against a loop-form float64 reference written here from the documented
equations, in both compat modes; the reference's bugs (variance about mu_l, no epsilon,
self-pairs included and NaN: docs/reference-bugs.md#tcc-variance-about-wrong-mean,
docs/reference-bugs.md#tcc-self-pairs-nan) against hand-derived numbers. Small D and T throughout.
"""

from __future__ import annotations

import math

import pytest
import torch

from alignprog.losses.common import ordered_pairs, pad_sequences, pairwise_distances
from alignprog.losses.tcc import _distances, tcc_loss, tcc_loss_batch, tcc_pair_losses

TAU, LAM, EPS = 0.1, 0.001, 1e-6


# ---------------------------------------------------------------------------------------------
# Loop-form reference, straight from docs/algorithms.md#tcc (float64, exact distances, no
# batching).

def softmax_list(logits: list[float]) -> list[float]:
    top = max(logits)
    e = [math.exp(z - top) for z in logits]
    s = sum(e)
    return [z / s for z in e]


def ref_pair_loss(u: torch.Tensor, v: torch.Tensor, *, compat: str, tau: float = TAU,
                  lam: float = LAM, eps: float = EPS) -> float:
    """sum_i l_i for primary u (N, D), secondary v (M, D), loops over frames."""
    u = u.double().tolist()
    v = v.double().tolist()
    n, m = len(u), len(v)

    def dist(a, b):
        # The implementation floors squared distances at 1e-12 (common.SQRT_EPS) for a finite
        # gradient at 0; a reference self-pair's near-0/0 terms feel that 1e-6 shift.
        return math.sqrt(max(sum((p - q) ** 2 for p, q in zip(a, b)), 1e-12))

    betas, mus = [], []
    for i in range(n):
        alpha = softmax_list([-dist(u[i], v[k]) / tau for k in range(m)])
        v_tilde = [sum(alpha[k] * v[k][d] for k in range(m)) for d in range(len(u[0]))]
        beta = softmax_list([-dist(v_tilde, u[l]) / tau for l in range(n)])
        betas.append(beta)
        mus.append(sum(beta[l] * l for l in range(n)))
    total = 0.0
    for i in range(n):
        if compat == "reference":
            var = sum(betas[i][l] * (l - mus[l]) ** 2 for l in range(n))         # reference: mu_l
            err = (i - mus[i]) ** 2 / var if var > 0 else float("nan")         # no epsilon
        else:
            var = max(sum(betas[i][l] * (l - mus[i]) ** 2 for l in range(n)), eps)
            err = (i - mus[i]) ** 2 / var
        total += err + lam * math.log(math.sqrt(var) + 1e-20)
    return total


def ref_batch_loss(seqs, *, compat: str, reduction: str = "reference", **kw) -> float:
    b = len(seqs)
    pairs = [(i, j) for i in range(b) for j in range(b) if compat == "reference" or i != j]
    vals = [ref_pair_loss(seqs[i], seqs[j], compat=compat, **kw) for i, j in pairs]
    if reduction == "mean":
        vals = [val / len(seqs[i]) for val, (i, _) in zip(vals, pairs)]
    return sum(vals) / len(vals)


def make_seqs(lengths, dim=4, scale=0.5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(n, dim, generator=g)).to(dtype) for n in lengths]


def separated_seqs(b=2, n=12, dim=128, seed=0):
    """Random 128-d embeddings of norm ~11 (docs/reference-bugs.md#tcc-self-pairs-nan), float32."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, dim, generator=g) for _ in range(b)]


# ---------------------------------------------------------------------------------------------
# Values against the loop reference

@pytest.mark.parametrize("compat", ["fixed", "reference"])
@pytest.mark.parametrize("reduction", ["reference", "mean"])
def test_matches_loop_reference(compat, reduction):
    # A length-1 primary is 0/0 in reference compat (test_no_epsilon...), so only fixed
    # gets one here.
    seqs = make_seqs([5, 3, 4, 1 if compat == "fixed" else 2])
    got = tcc_loss(seqs, compat=compat, reduction=reduction)
    want = ref_batch_loss(seqs, compat=compat, reduction=reduction)
    assert math.isfinite(want)
    assert got.item() == pytest.approx(want, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("compat", ["fixed", "reference"])
def test_matches_loop_reference_other_keywords(compat):
    seqs = make_seqs([6, 4, 5], scale=1.0, seed=3)
    kw = dict(tau=1.0, lam=0.1, eps=1e-3)    # the reference function's own defaults
    got = tcc_loss(seqs, softmax_temp=1.0, alignment_variance=0.1, variance_eps=1e-3,
                   compat=compat)
    assert got.item() == pytest.approx(ref_batch_loss(seqs, compat=compat, **kw), rel=1e-9)


def test_pair_losses_match_loop_reference_per_pair():
    seqs = make_seqs([4, 6, 2], seed=5)
    x, mask = pad_sequences(seqs)
    first, second = ordered_pairs(3, include_self=True)
    for compat in ("fixed", "reference"):
        got = tcc_pair_losses(x, mask, first, second, compat=compat)
        want = [ref_pair_loss(seqs[i], seqs[j], compat=compat)
                for i, j in zip(first.tolist(), second.tolist())]
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-9,
                                   atol=1e-12)


def test_distances_match_exact_helper():
    # The matmul expansion of _distances against common's difference form.
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 7, 5, generator=g, dtype=torch.float64)
    b = torch.cat([a[:, :2], torch.randn(3, 4, 5, generator=g, dtype=torch.float64)], 1)
    # Equal away from 0; at distance 0 the SQRT_EPS floor gives sqrt(1e-12) = 1e-6.
    torch.testing.assert_close(_distances(a, b), pairwise_distances(a, b), rtol=1e-10,
                               atol=1.01e-6)


# ---------------------------------------------------------------------------------------------
# The reference's variance by hand: U = [0, 1] (D = 1), tau = 1. alpha_0 = (a, 1 - a) with
# a = sigmoid(1), so v~ = (1 - a, a); beta_0 = (b, 1 - b), beta_1 = (1 - b, b) with
# b = sigmoid(2a - 1), so mu = (1 - b, b). Intended variance b(1 - b) for both frames; reference
# sum_l beta_il (l - mu_l)^2 = (1 - b)^2 for both. Pair loss: reference 2 + 2 lam log(1 - b);
# fixed 2 (1 - b) / b + lam log(b (1 - b)).

def hand_case():
    a = 1 / (1 + math.exp(-1))
    b = 1 / (1 + math.exp(-(2 * a - 1)))
    lam = 0.1
    ref = 2 + 2 * lam * math.log(1 - b)
    fixed = 2 * (1 - b) / b + lam * math.log(b * (1 - b))
    return lam, ref, fixed


def test_reference_variance_about_mu_l_by_hand():
    lam, ref, fixed = hand_case()
    u = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    kw = dict(softmax_temp=1.0, alignment_variance=lam)
    # Two identical videos: every pair (self-pairs too) equals the hand-computed pair loss.
    got_ref = tcc_loss([u, u.clone()], compat="reference", **kw)
    got_fixed = tcc_loss([u, u.clone()], compat="fixed", **kw)
    # The distance floor sqrt(1e-12) at d = 0 shifts logits by 1e-6: tolerance 1e-5.
    assert got_ref.item() == pytest.approx(ref, rel=1e-5)
    assert got_fixed.item() == pytest.approx(fixed, rel=1e-5)
    assert abs(ref - fixed) > 0.1


def test_self_pairs_nan_in_reference_finite_in_fixed():
    # Well-separated random 128-d embeddings (norm ~11): beta of a self-pair is one-hot,
    # sigma2 = 0 and (i - mu_i)^2 = 0, so the reference's self-pair term is 0/0 = NaN.
    seqs = separated_seqs()
    x, mask = pad_sequences(seqs)
    first, second = ordered_pairs(2, include_self=True)                       # 00, 01, 10, 11
    ref = tcc_pair_losses(x, mask, first, second, compat="reference")
    fixed = tcc_pair_losses(x, mask, first, second, compat="fixed")
    is_self = first == second
    assert torch.isnan(ref[is_self]).all()
    assert torch.isfinite(ref[~is_self]).all()
    assert torch.isfinite(fixed).all()
    # The NaN reaches the reference batch loss (which therefore stops training,
    # docs/reference-bugs.md#tcc-self-pairs-nan); the fixed loss skips self-pairs and stays finite.
    assert torch.isnan(tcc_loss(seqs, compat="reference"))
    assert torch.isfinite(tcc_loss(seqs, compat="fixed"))
    # Fixed self-pair: mu_i = i exactly, sigma2 clamped to eps: N * lam * log(sqrt(eps)).
    n = len(seqs[0])
    torch.testing.assert_close(fixed[is_self], torch.full((2,), n * LAM * math.log(1e-3)))


def test_reference_pairs_and_reduction_over_b_squared():
    seqs = make_seqs([4, 5, 3], seed=7)
    x, mask = pad_sequences(seqs)
    first, second = ordered_pairs(3, include_self=True)
    pair = tcc_pair_losses(x, mask, first, second, compat="reference")            # (9,)
    assert tcc_loss(seqs, compat="reference").item() == pytest.approx(pair.sum().item() / 9,
                                                                       rel=1e-12)
    f2, s2 = ordered_pairs(3)
    pair_fixed = tcc_pair_losses(x, mask, f2, s2, compat="fixed")                   # (6,)
    assert tcc_loss(seqs).item() == pytest.approx(pair_fixed.sum().item() / 6, rel=1e-12)


def test_no_epsilon_in_reference_clamp_in_fixed():
    # A length-1 video cycles to itself: mu = 0, sigma2 = 0. Reference: 0/0 = NaN for the pair
    # whose primary it is; fixed: sigma2 -> eps, term = lam * log(sqrt(eps)).
    seqs = make_seqs([1, 4], seed=2)
    x, mask = pad_sequences(seqs)
    first, second = torch.tensor([0]), torch.tensor([1])
    assert torch.isnan(tcc_pair_losses(x, mask, first, second, compat="reference")).all()
    fixed = tcc_pair_losses(x, mask, first, second, compat="fixed", variance_eps=1e-4)
    assert fixed.item() == pytest.approx(LAM * math.log(1e-2), rel=1e-9)


# ---------------------------------------------------------------------------------------------
# Invariances

def test_identical_well_separated_sequences_give_the_minimum():
    # Fixed mode: (i - mu)^2 / sigma2 >= 0 and sigma2 >= eps, so each frame's loss is at least
    # lam * log(sqrt(eps)); identical, well-separated videos cycle exactly (mu_i = i) and reach it.
    n = 6
    base = torch.arange(n, dtype=torch.float64)[:, None] * torch.tensor([[3.0, -2.0, 1.0]])
    floor = n * LAM * 0.5 * math.log(EPS)
    same = tcc_loss([base, base.clone()])
    assert same.item() == pytest.approx(floor, rel=1e-9)
    for seed in range(3):
        other = base + 0.5 * make_seqs([n], dim=3, scale=1.0, seed=seed)[0]
        assert tcc_loss([base, other]).item() >= floor - 1e-12


@pytest.mark.parametrize("compat", ["fixed", "reference"])
def test_swapping_videos_gives_the_same_total(compat):
    seqs = make_seqs([5, 3], seed=11)
    a = tcc_loss(seqs, compat=compat)
    b = tcc_loss(seqs[::-1], compat=compat)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


@pytest.mark.parametrize("compat", ["fixed", "reference"])
@pytest.mark.parametrize("reduction", ["reference", "mean"])
def test_padded_batch_equals_pairs_one_at_a_time(compat, reduction):
    seqs = make_seqs([6, 2, 4], seed=4)
    got = tcc_loss(seqs, compat=compat, reduction=reduction)
    want = ref_batch_loss(seqs, compat=compat, reduction=reduction)   # unpadded, pair by pair
    assert got.item() == pytest.approx(want, rel=1e-9)
    # And pair by pair with this implementation on two-video batches.
    b = len(seqs)
    vals = []
    for i in range(b):
        for j in range(b):
            if i == j and compat == "fixed":
                continue
            if i == j:
                x, mask = pad_sequences([seqs[i]])
            else:
                x, mask = pad_sequences([seqs[i], seqs[j]])
            k = torch.tensor([0]), torch.tensor([0 if i == j else 1])
            val = tcc_pair_losses(x, mask, *k, compat=compat)
            vals.append(val / len(seqs[i]) if reduction == "mean" else val)
    torch.testing.assert_close(got, torch.cat(vals).mean(), rtol=1e-10, atol=0)


@pytest.mark.parametrize("compat", ["fixed", "reference"])
def test_garbage_in_padding_changes_nothing(compat):
    seqs = make_seqs([5, 3, 4], seed=8)
    x, mask = pad_sequences(seqs)
    x = x.clone().requires_grad_(True)
    loss = tcc_loss_batch(x, mask, compat=compat)
    (grad,) = torch.autograd.grad(loss, x)
    for fill in (1e6, float("nan"), float("inf")):
        y = x.detach().clone()
        y[~mask] = fill
        y.requires_grad_(True)
        loss2 = tcc_loss_batch(y, mask, compat=compat)
        (grad2,) = torch.autograd.grad(loss2, y)
        torch.testing.assert_close(loss2, loss, rtol=1e-12, atol=0)
        torch.testing.assert_close(grad2[mask], grad[mask], rtol=1e-10, atol=1e-12)
        assert (grad2[~mask] == 0).all()
    # Extra all-padding frames at the end change nothing either.
    wide = torch.cat([x.detach(), torch.randn(3, 4, 4, dtype=x.dtype)], 1)
    wide_mask = torch.cat([mask, torch.zeros(3, 4, dtype=torch.bool)], 1)
    torch.testing.assert_close(tcc_loss_batch(wide, wide_mask, compat=compat), loss.detach(),
                               rtol=1e-12, atol=0)


def test_translation_invariance():
    seqs = make_seqs([5, 4], seed=9)
    shifted = [s + torch.tensor([100.0, -50.0, 3.0, 7.0], dtype=s.dtype) for s in seqs]
    torch.testing.assert_close(tcc_loss(shifted), tcc_loss(seqs), rtol=1e-9, atol=0)


# ---------------------------------------------------------------------------------------------
# Reductions

def test_reduction_mean_vs_reference():
    # Equal lengths N: mean = reference / N, both compat modes.
    seqs = make_seqs([5, 5, 5], seed=12)
    for compat in ("fixed", "reference"):
        ref = tcc_loss(seqs, compat=compat)
        mean = tcc_loss(seqs, compat=compat, reduction="mean")
        torch.testing.assert_close(mean, ref / 5, rtol=1e-12, atol=0)
    # Unequal lengths: mean = mean_p(L_p / N_primary(p)), reference = mean_p(L_p).
    seqs = make_seqs([5, 2, 7], seed=13)
    x, mask = pad_sequences(seqs)
    first, second = ordered_pairs(3)
    pair = tcc_pair_losses(x, mask, first, second)
    n = torch.tensor([5.0, 2.0, 7.0], dtype=torch.float64)[first]
    torch.testing.assert_close(tcc_loss(seqs, reduction="mean"), (pair / n).mean())
    torch.testing.assert_close(tcc_loss(seqs), pair.mean())


def test_fewer_than_two_videos_is_a_connected_zero():
    for compat in ("fixed", "reference"):
        x = torch.randn(1, 4, 3, requires_grad=True)
        loss = tcc_loss_batch(x, torch.ones(1, 4, dtype=torch.bool), compat=compat)
        assert loss.item() == 0.0 and loss.requires_grad
        loss.backward()
        assert (x.grad == 0).all()


def test_bad_arguments():
    x, mask = torch.randn(2, 3, 2), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="compat"):
        tcc_loss_batch(x, mask, compat="old")
    with pytest.raises(ValueError, match="reduction"):
        tcc_loss_batch(x, mask, reduction="sum")
    with pytest.raises(ValueError, match="softmax_temp"):
        tcc_loss_batch(x, mask, softmax_temp=0.0)
    with pytest.raises(ValueError, match="mask"):
        tcc_loss_batch(x, mask.float())


# ---------------------------------------------------------------------------------------------
# Gradients and adversarial inputs

@pytest.mark.parametrize("compat", ["fixed", "reference"])
def test_gradcheck(compat):
    # Close-together embeddings keep the softmaxes soft, so the reference's variance is > 0 and
    # it is differentiable too.
    seqs = make_seqs([4, 3, 4], dim=3, scale=0.3, seed=1)
    x, mask = pad_sequences(seqs)
    x.requires_grad_(True)
    fn = lambda t: tcc_loss_batch(t, mask, softmax_temp=0.5, alignment_variance=0.1,  # noqa: E731
                                  compat=compat)
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradcheck_mean_reduction_default_keywords():
    seqs = make_seqs([3, 2], dim=2, scale=0.05, seed=6)
    x, mask = pad_sequences(seqs)
    x.requires_grad_(True)
    fn = lambda t: tcc_loss_batch(t, mask, reduction="mean")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-7, atol=1e-4, rtol=1e-4)


def adversarial_batches(dtype):
    g = torch.Generator().manual_seed(0)
    far = 1e3 * torch.nn.functional.normalize(torch.randn(3, 6, 8, generator=g), dim=-1)
    dup = torch.randn(1, 1, 8, generator=g).expand(3, 6, 8).clone()       # every frame identical
    near = torch.randn(3, 6, 8, generator=g) * 1e-7
    offset = torch.randn(3, 6, 8, generator=g) + 1e3                        # large common offset
    full = torch.ones(3, 6, dtype=torch.bool)
    short = full.clone()
    short[0, 1:] = False                                                     # length 1
    short[1, 2:] = False                                                     # length 2
    for x in (far, dup, near, offset):
        for mask in (full, short):
            yield x.to(dtype), mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["reference", "mean"])
def test_adversarial_inputs_finite(dtype, reduction):
    for x, mask in adversarial_batches(dtype):
        x = x.clone().requires_grad_(True)
        loss = tcc_loss_batch(x, mask, reduction=reduction)
        (grad,) = torch.autograd.grad(loss, x)
        assert loss.dtype == dtype
        assert torch.isfinite(loss), (x.abs().max(), mask.sum(1))
        assert torch.isfinite(grad).all()


# ---------------------------------------------------------------------------------------------
# CUDA

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compat", ["fixed", "reference"])
def test_cpu_and_cuda_agree(compat):
    dev = torch.device("cuda")
    seqs = make_seqs([7, 4, 6], dim=8, scale=0.5, seed=21)
    x, mask = pad_sequences(seqs)
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 1e-4)):
        xc = x.to(dtype).requires_grad_(True)
        xg = x.to(dtype).to(dev).requires_grad_(True)
        lc = tcc_loss_batch(xc, mask, compat=compat)
        lg = tcc_loss_batch(xg, mask.to(dev), compat=compat)
        assert lg.device.type == "cuda"
        (gc,) = torch.autograd.grad(lc, xc)
        (gg,) = torch.autograd.grad(lg, xg)
        torch.testing.assert_close(lg.cpu(), lc, rtol=tol, atol=tol)
        torch.testing.assert_close(gg.cpu(), gc, rtol=tol * 10, atol=tol * 10)
    # The reference's self-pair NaN reproduces on CUDA too.
    sep = torch.stack(separated_seqs()).to(dev)
    m = torch.ones(2, 12, dtype=torch.bool, device=dev)
    assert torch.isnan(tcc_loss_batch(sep, m, compat="reference"))
    assert torch.isfinite(tcc_loss_batch(sep, m, compat="fixed"))
