"""VAVA: optimal transport with virtual frames, priors and a contrastive part.

See docs/algorithms.md#vava and the vava-* entries of docs/reference-bugs.md.

For an ordered pair (U: N frames, V: M frames), N' = N + 1, M' = M + 1, rows i = 0..N, columns
j = 0..M, index 0 on each side the virtual "drop / background" frame:

1. D = [zeta, zeta; zeta, ||u_n - v_m||]  (N', M'): the cost with the virtual row and column.
2. T = Sinkhorn(D; a = 1/N', b = 1/M', K = exp(-D/eps)), ``max_iter`` unrolled steps (v, then u).
3. Priors from the consistency distance l_c (to the diagonal i/N' = j/M') and the optimality
   distance l_o (to the plan's row/column argmaxes r_i = argmax_j T_ij, c_j = argmax_i T_ij):
   P^x = exp(-l_x^2 / (2 delta^2)) / (delta sqrt(2 pi)), P = phi P^c + (1 - phi) P^o.
4. I(T) = phi sum T*I^c + (1 - phi) sum T*I^o (inverse-difference-moment reward),
   KL = sum T log((T + 1e-8) / (P + 1e-8))  (the fork's form, both modes).
5. L = dist - lambda1 (N + M) I(T) + lambda2 (N M / 4) KL
   pair loss = L + gamma (C(U) + C(V) + C_XY), C the regulariser ``intra_contrast``
   (docs/algorithms.md#intra-video-regulariser)
   and C_XY the cross-video term on the augmented D (mutual argmax A, mutual argmin Abar).

phi = clip(0.999^floor(sqrt(t + 1)), 0.001, 0.999) with ``phi_schedule="sqrt"`` (the fork's
form, the default) or clip(0.999^(t + 1), 0.001, 0.999) with ``"exp"`` (the original release's),
t = ``global_step``. The reference passes the *epoch* as t, so phi barely decays
(docs/reference-bugs.md#vava-phi-indexed-by-epoch); the fix is "phi per optimiser step": with
``compat="fixed"`` the training loop passes the optimiser step count as ``global_step``, so the
same formula actually decays (sqrt form: 0.999^86 = 0.92 after 7500 steps instead of 0.993 after
50 epochs). The loss cannot tell the two apart; the caller decides which counter it passes.

``compat="reference"`` reproduces the fork's early snapshot (bugs included); ``compat="fixed"``
(default) applies these corrections (the vava-* entries of docs/reference-bugs.md):

* dist: reference 1e6 * sum(T) / (N'M'), a constant 1e6/(N'M') since sum(T) = 1
  (docs/reference-bugs.md#vava-transport-cost-constant); fixed
  sum(T * D), the transport cost over the augmented D (virtual entries cost zeta).
* eps: reference eps = N, the first video's length, which makes T almost uniform
  (docs/reference-bugs.md#vava-sinkhorn-epsilon-too-large); fixed
  eps = 0.1 * mean of the pair's N*M real distances ||u_n - v_m|| (not the zeta entries), kept in
  the graph (eps is a function of the embeddings, so the gradient is the true one).
  ``epsilon=<float>`` overrides both.
* Sinkhorn: both modes run all ``max_iter`` iterations (the reference's early-stop test never
  fires; docs/algorithms.md#sinkhorn) in the log domain. That is an exact reparametrisation of the
  reference's u/v iteration (same iterates), so reference values match wherever the reference is
  finite, and stay finite where its exp(-D/eps) underflows (far-apart embeddings, small eps).
* optimality prior l_o and reward I^o: reference
  l_o = (|j - c_j| / N' + |i - r_i| / N') / (2 sqrt(1/N'^2 + 1/M'^2)),
  I^o = 1 / (1/2 ((j - c_j)/N')^2 + 1/2 ((i - r_i)/N')^2 + 1),
  which subtract row from column indices and divide the column offset by N'
  (docs/reference-bugs.md#vava-optimality-offsets-mixed). Fixed: the
  offset of (i, j) from its row's optimum (i, r_i) is the column offset |j - r_i| / M', from its
  column's optimum (c_j, j) the row offset |i - c_j| / N':
  l_o = (|j - r_i| / M' + |i - c_j| / N') / (2 sqrt(1/N'^2 + 1/M'^2)),
  I^o = 1 / (1/2 ((j - r_i)/M')^2 + 1/2 ((i - c_j)/N')^2 + 1).
* P: reference unnormalised (docs/reference-bugs.md#vava-prior-not-normalised); fixed
  P / sum(P) over the pair's real entries, so that it is a distribution like T and the KL is
  >= 0 (up to the 1e-8 floors).
* C_XY: reference sum (A - Abar) * D, whose push -Abar*D is unbounded below
  (docs/reference-bugs.md#vava-contrastive-push-unbounded): moving a mutual-argmin pair apart
  lowers the loss without limit. Fixed: sum A * D + sum Abar * max(0, margin - D), a hinge with
  the regulariser's margin. Below the margin it has the reference's gradient (-1 per Abar
  entry); beyond it the pair is "apart enough" and the term is 0, so C_XY >= 0 and cannot
  dominate the objective.
* C(U), C(V): ``intra_contrast(compat=...)``: reference the constant in-window term
  (docs/reference-bugs.md#lav-regulariser-constant-pull), fixed the LAV paper's pull.

Both modes keep the early-snapshot forms that the fork's later memory refactors had broken
(docs/reference-bugs.md#memory-refactors-changed-losses: sums not means, the regulariser with
gradient, Sinkhorn eps = N not lambda2, C_XY present, no division by NM), the fork's Gaussian
normalisation and lambdas applied once per pair (the original release's slips are not
reproduced, docs/reference-bugs.md#vava-original-release-slips), and run on any device
(docs/reference-bugs.md#cpu-bound-reference-loops).

A (mutual argmax: T_ij is the largest entry of its row and of its column, first index on ties as
torch.argmax) and Abar (mutual argmin, likewise) and r_i, c_j are non-differentiable constants, as
in the reference; the gradient flows through T, D and (fixed mode) eps.

Reductions (docs/algorithms.md#pairs-and-reduction): ``"reference"`` sums the pair loss over the
B(B-1) ordered pairs; ``"mean"`` is the mean over ordered pairs of pair_loss / (N + M), N + M
the number of real frames of the pair's two videos. Even so the terms keep different scales (the
KL part ~ NM/(N+M), C(U) up to ~N^4), so "mean" is for logging and comparisons across lengths,
not a calibrated O(1) objective.

Masks must be left-aligned (real frames first, as ``pad_sequences`` makes them): frame positions
enter the priors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence

import torch

from alignprog.losses.common import (Compat, Reduction, check_compat, intra_contrast,
                                     pad_sequences, pairwise_distances, take_rows)

PhiSchedule = Literal["sqrt", "exp"]

# The fork's KL floors T and P at 1e-8 (docs/algorithms.md#vava, step 8).
KL_FLOOR = 1e-8
# The reference scales the (constant) "dist" by 1e6 (docs/algorithms.md#vava, step 3).
REFERENCE_DIST_SCALE = 1e6
# Fixed eps = 0.1 * mean real distance of the pair, instead of the reference's eps = N
# (docs/reference-bugs.md#vava-sinkhorn-epsilon-too-large).
FIXED_EPS_SCALE = 0.1
FIXED_EPS_FLOOR = 1e-4  # smallest eps, in distance units (the virtual cost zeta is 0.5)


@dataclass
class VavaTerms:
    """Per-pair pieces of the VAVA objective for the ordered pairs (first[p], second[p]): the
    B(B-1)/2 pairs i < j first, then the same pairs swapped."""

    first: torch.Tensor        # (P,) index of U in the batch
    second: torch.Tensor       # (P,) index of V in the batch
    n: torch.Tensor            # (P,) N, real frames of U
    m: torch.Tensor            # (P,) M, real frames of V
    cost: torch.Tensor         # (P, T+1, T+1) augmented D (0 outside the pair's N' x M' block)
    plan: torch.Tensor         # (P, T+1, T+1) Sinkhorn plan T (0 outside the block)
    prior: torch.Tensor        # (P, T+1, T+1) P (normalised in fixed mode; 0 outside the block)
    eps: torch.Tensor          # (P,) Sinkhorn entropy
    dist: torch.Tensor         # (P,)
    reward: torch.Tensor       # (P,) I(T)
    kl: torch.Tensor           # (P,)
    contrast_xy: torch.Tensor  # (P,) C_XY
    contrast_x: torch.Tensor   # (P,) C(U)
    contrast_y: torch.Tensor   # (P,) C(V)
    loss: torch.Tensor         # (P,) pair loss


def vava_phi(global_step: int | torch.Tensor, schedule: PhiSchedule = "sqrt"
             ) -> float | torch.Tensor:
    """phi (docs/algorithms.md#vava): the fork's clip(0.999^floor(sqrt(t+1))) or the original
    release's clip(0.999^(t+1)), in [0.001, 0.999]. A 0-dim tensor step gives a 0-dim float64
    tensor on its device (the trainer's CUDA graphs read the step from the device rather than
    baking it in)."""
    if schedule not in ("sqrt", "exp"):
        raise ValueError(f"phi_schedule must be 'sqrt' or 'exp', got {schedule!r}")
    if isinstance(global_step, torch.Tensor):
        t = global_step.to(torch.float64)
        power = torch.floor(torch.sqrt(t + 1.0)) if schedule == "sqrt" else t + 1.0
        return torch.pow(0.999, power).clamp(0.001, 0.999)
    if schedule == "sqrt":
        power = math.floor(math.sqrt(global_step + 1))
    else:
        power = global_step + 1
    return min(max(0.999 ** power, 0.001), 0.999)


def _log_sinkhorn(cost: torch.Tensor, eps: torch.Tensor, log_a: torch.Tensor,
                  log_b: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
                  iters: int) -> torch.Tensor:
    """Sinkhorn (docs/algorithms.md#sinkhorn) in the log domain: u = 1/N' then ``iters`` x
    (v <- b/(K^T u), u <- a/(K v)), T = diag(u) K diag(v), K = exp(-D/eps). Same iterates as the
    plain form, no underflow. cost (P, R, C), eps (P,), log_a (P,), log_b (P,), rows (P, R),
    cols (P, C) bool.

    Padding: log K is a huge negative finite number outside the pair's block (exp gives exactly 0,
    unlike -inf it keeps fully padded lines finite, so no NaN reaches the gradient), and log u,
    log v are reset to 0 on padded rows/columns so that they never offset that filler."""
    valid = rows[:, :, None] & cols[:, None, :]                              # (P, R, C)
    filler = torch.finfo(cost.dtype).min / 4  # two of them still add up to a finite number
    log_k = torch.where(valid, -cost / eps[:, None, None], filler)           # (P, R, C)
    log_u = torch.where(rows, log_a[:, None], 0.0)                           # (P, R)
    log_v = torch.where(cols, log_b[:, None], 0.0)                           # (P, C)
    for _ in range(iters):
        # v_j = b / sum_i u_i K_ij
        lse = torch.logsumexp(log_u[:, :, None] + log_k, 1)                  # (P, C)
        log_v = torch.where(cols, log_b[:, None] - lse, 0.0)
        # u_i = a / sum_j K_ij v_j
        lse = torch.logsumexp(log_k + log_v[:, None, :], 2)                  # (P, R)
        log_u = torch.where(rows, log_a[:, None] - lse, 0.0)
    log_plan = log_u[:, :, None] + log_k + log_v[:, None, :]                 # (P, R, C)
    # -inf outside the block: exp gives an exact 0 there.
    return torch.where(valid, log_plan, float("-inf")).exp()


def _mutual_extreme(plan: torch.Tensor, valid: torch.Tensor, largest: bool) -> torch.Tensor:
    """Mask of entries that are the max (min) of both their row and their column (P, R, C)."""
    fill = float("-inf") if largest else float("inf")
    t = torch.where(valid, plan, fill)
    pick = torch.argmax if largest else torch.argmin
    r = pick(t, dim=2)                                                       # (P, R) best column
    c = pick(t, dim=1)                                                       # (P, C) best row
    idx_r = torch.arange(plan.shape[1], device=plan.device)
    idx_c = torch.arange(plan.shape[2], device=plan.device)
    return (valid & (r[:, :, None] == idx_c[None, None, :])
            & (c[:, None, :] == idx_r[None, :, None]))                       # (P, R, C)


def optimality_offsets(i: torch.Tensor, j: torch.Tensor, r_i: torch.Tensor, c_j: torch.Tensor,
                       n1: torch.Tensor, m1: torch.Tensor,
                       compat: Compat) -> tuple[torch.Tensor, torch.Tensor]:
    """The signed (column, row) offsets of entry (i, j) that l_o and I^o use
    (docs/algorithms.md#vava, steps 5 and 7).

    r_i = argmax_j T_ij (a column), c_j = argmax_i T_ij (a row); all arguments broadcast.
    Reference: ((j - c_j) / N', (i - r_i) / N'), row and column indices mixed, N' for both
    (docs/reference-bugs.md#vava-optimality-offsets-mixed).
    Fixed: ((j - r_i) / M', (i - c_j) / N'), the offset from the row's optimum (i, r_i) along the
    columns and from the column's optimum (c_j, j) along the rows."""
    if compat == "reference":
        return (j - c_j) / n1, (i - r_i) / n1
    return (j - r_i) / m1, (i - c_j) / n1


def vava_terms(x: torch.Tensor, mask: torch.Tensor, *, global_step: int | torch.Tensor = 0,
               max_iter: int = 20, lambda1: float = 1.0, lambda2: float = 0.1,
               gamma: float = 0.5, zeta: float = 0.5, delta: float = 0.6,
               epsilon: float | None = None, window: int = 15, margin: float = 2.0,
               phi_schedule: PhiSchedule = "sqrt", compat: Compat = "fixed") -> VavaTerms:
    """Every ordered pair's VAVA terms for a left-aligned padded batch x (B, T, D), mask (B, T).

    See the module docstring for the objective and the compat differences. Needs B >= 2."""
    check_compat(compat, "reference")
    if epsilon is not None and not epsilon > 0:
        raise ValueError(f"epsilon must be > 0 or None, got {epsilon}")
    bsz, t, _ = x.shape
    dev, dt = x.device, x.dtype
    # Zero the padded frames: their content (even NaN) then reaches neither values nor gradients.
    x = torch.where(mask[:, :, None], x, 0.0)                               # (B, T, D)
    phi = vava_phi(global_step if isinstance(global_step, torch.Tensor) else int(global_step),
                   phi_schedule)
    lengths = mask.sum(1)                                                    # (B,)

    # Distances of the B(B-1)/2 unordered pairs only; (j, i) uses the transpose (halves the
    # (Q, T, T, D) difference tensor of pairwise_distances).
    iu, ju = torch.triu_indices(bsz, bsz, offset=1, device=dev)              # (Q,), (Q,)
    d_unordered = pairwise_distances(take_rows(x, iu), take_rows(x, ju))     # (Q, T, T)
    first = torch.cat([iu, ju])                                              # (P,)
    second = torch.cat([ju, iu])                                             # (P,)
    d_real = torch.cat([d_unordered, d_unordered.transpose(1, 2)])           # (P, T, T)
    n, m = lengths[first], lengths[second]                                   # (P,), (P,)
    n1, m1 = (n + 1).to(dt), (m + 1).to(dt)                                  # (P,) N', M'

    # Step numbers: those of docs/algorithms.md#vava.
    # Step 1: virtual row and column (index 0) filled with zeta.
    cost = torch.nn.functional.pad(d_real, (1, 0, 1, 0), value=zeta)         # (P, T+1, T+1)
    idx = torch.arange(t + 1, device=dev)                                    # (T+1,)
    rows = idx[None, :] <= n[:, None]                                        # (P, T+1) i <= N
    cols = idx[None, :] <= m[:, None]                                        # (P, T+1) j <= M
    valid = rows[:, :, None] & cols[:, None, :]                              # (P, T+1, T+1)
    cost = torch.where(valid, cost, 0.0)  # padded garbage never enters a sum

    # Step 2: Sinkhorn.
    if epsilon is not None:
        eps = torch.full_like(n1, float(epsilon))                            # (P,)
    elif compat == "reference":
        eps = n.to(dt)                                     # (P,) eps = N, the reference's bug
    else:
        real = valid.clone()
        real[:, 0, :] = False
        real[:, :, 0] = False                                                # (P, T+1, T+1)
        eps = FIXED_EPS_SCALE * torch.where(real, cost, 0.0).sum((1, 2)) / (n * m).to(dt)
        # Identical videos have D = 0 on every real entry, hence eps = 0 and 0/0 in -D/eps:
        # the floor keeps the log-domain Sinkhorn finite (its plan is then near-hard).
        eps = eps.clamp_min(FIXED_EPS_FLOOR)
    plan = _log_sinkhorn(cost, eps, -n1.log(), -m1.log(), rows, cols, max_iter)  # (P, T+1, T+1)

    # Step 3: the transport term.
    if compat == "reference":
        dist = REFERENCE_DIST_SCALE * plan.sum((1, 2)) / (n1 * m1)      # constant (reference bug)
    else:
        dist = (plan * cost).sum((1, 2))

    # Steps 4-7: priors and rewards. The argmaxes are constants (no gradient), as in the reference.
    with torch.no_grad():
        t_arg = torch.where(valid, plan, float("-inf"))
        r = t_arg.argmax(2).to(dt)                                           # (P, T+1) r_i
        c = t_arg.argmax(1).to(dt)                                           # (P, T+1) c_j
    ii = idx.to(dt)[None, :, None]                                           # (1, T+1, 1) i
    jj = idx.to(dt)[None, None, :]                                           # (1, 1, T+1) j
    n1_, m1_ = n1[:, None, None], m1[:, None, None]                          # (P, 1, 1)
    r_i, c_j = r[:, :, None], c[:, None, :]                    # (P, T+1, 1), (P, 1, T+1)
    norm = torch.sqrt(1.0 / n1_.square() + 1.0 / m1_.square())               # (P, 1, 1)
    diag_gap = jj / m1_ - ii / n1_                                           # (P, T+1, T+1)
    l_c = diag_gap.abs() / norm
    off_col, off_row = optimality_offsets(ii, jj, r_i, c_j, n1_, m1_, compat)  # (P, T+1, T+1)
    l_o = (off_col.abs() + off_row.abs()) / (2.0 * norm)                     # (P, T+1, T+1)
    gauss = 1.0 / (delta * math.sqrt(2.0 * math.pi))  # the fork's normalisation, not the original's
    p_c = gauss * torch.exp(-l_c.square() / (2.0 * delta ** 2))
    p_o = gauss * torch.exp(-l_o.square() / (2.0 * delta ** 2))
    prior = torch.where(valid, phi * p_c + (1.0 - phi) * p_o, 0.0)           # (P, T+1, T+1)
    if compat == "fixed":
        prior = prior / prior.sum((1, 2), keepdim=True)          # normalised P (reference: not)
    i_c = 1.0 / (diag_gap.square() + 1.0)
    i_o = 1.0 / (0.5 * off_col.square() + 0.5 * off_row.square() + 1.0)
    reward = (plan * (phi * i_c + (1.0 - phi) * i_o)).sum((1, 2))           # (P,) I(T)

    # Step 8: the fork's KL with the 1e-8 floors; entries outside the block have T = 0 and add 0.
    kl = (plan * torch.log((plan + KL_FLOOR) / (prior + KL_FLOOR))).sum((1, 2))  # (P,)

    # Step 9: the core objective L.
    nf, mf = n.to(dt), m.to(dt)
    core = dist - lambda1 * (nf + mf) * reward + lambda2 * (nf * mf / 4.0) * kl

    # Steps 10-11: contrastive part and pair loss.
    with torch.no_grad():
        a_max = _mutual_extreme(plan, valid, largest=True)                   # (P, T+1, T+1) A
        a_min = _mutual_extreme(plan, valid, largest=False)                  # (P, T+1, T+1) Abar
    pull = torch.where(a_max, cost, 0.0).sum((1, 2))
    if compat == "reference":
        push = -torch.where(a_min, cost, 0.0).sum((1, 2))          # unbounded (reference bug)
    else:
        push = torch.where(a_min, torch.relu(margin - cost), 0.0).sum((1, 2))  # hinge
    contrast_xy = pull + push                                                # (P,)
    c_video = intra_contrast(x, mask, window=window, margin=margin, compat=compat)  # (B,)
    contrast_x, contrast_y = c_video[first], c_video[second]                 # (P,), (P,)
    loss = core + gamma * (contrast_x + contrast_y + contrast_xy)            # (P,)
    return VavaTerms(first=first, second=second, n=n, m=m, cost=cost, plan=plan, prior=prior,
                     eps=eps, dist=dist, reward=reward, kl=kl, contrast_xy=contrast_xy,
                     contrast_x=contrast_x, contrast_y=contrast_y, loss=loss)


def vava_loss_batch(x: torch.Tensor, mask: torch.Tensor, *, global_step: int | torch.Tensor = 0,
                    max_iter: int = 20, lambda1: float = 1.0, lambda2: float = 0.1,
                    gamma: float = 0.5, zeta: float = 0.5, delta: float = 0.6,
                    epsilon: float | None = None, window: int = 15, margin: float = 2.0,
                    phi_schedule: PhiSchedule = "sqrt", compat: Compat = "fixed",
                    reduction: Reduction = "reference") -> torch.Tensor:
    """VAVA over all ordered pairs of a left-aligned padded batch x (B, T, D), mask (B, T) bool.

    ``global_step``: the epoch with ``compat="reference"`` (as the reference), the optimiser step
    with ``compat="fixed"`` (docs/reference-bugs.md#vava-phi-indexed-by-epoch), fed to
    ``vava_phi(global_step, phi_schedule)``; an int or a 0-dim tensor on x's device.
    ``epsilon``: Sinkhorn entropy; None = N (reference) or 0.1 * mean real distance (fixed).
    ``reduction``: "reference" = sum over ordered pairs; "mean" = mean over ordered pairs of
    pair_loss / (N + M). Fewer than 2 videos: a zero attached to the graph
    (docs/algorithms.md#pairs-and-reduction). See the module docstring for the objective and
    every compat difference."""
    check_compat(compat, reduction)
    if x.shape[0] < 2:
        return torch.where(mask[:, :, None], x, 0.0).sum() * 0.0  # padding garbage may be NaN
    terms = vava_terms(x, mask, global_step=global_step, max_iter=max_iter, lambda1=lambda1,
                       lambda2=lambda2, gamma=gamma, zeta=zeta, delta=delta, epsilon=epsilon,
                       window=window, margin=margin, phi_schedule=phi_schedule, compat=compat)
    if reduction == "reference":
        return terms.loss.sum()
    return (terms.loss / (terms.n + terms.m).to(x.dtype)).mean()


def vava_loss(seqs: Sequence[torch.Tensor], **kwargs) -> torch.Tensor:
    """List form: (T_i, D) tensors -> ``vava_loss_batch(*pad_sequences(seqs), **kwargs)``."""
    x, mask = pad_sequences(seqs)
    return vava_loss_batch(x, mask, **kwargs)
