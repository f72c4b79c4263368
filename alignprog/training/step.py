"""One optimizer step, written once for every way a step runs.

    total = alignment + lambda * progress          (`objective`; the head-only stage: progress)
    backward: balance=fixed, total.backward(); balance=gradient, lambda from the two gradients
        on the embeddings and the alignment loss's scale divided out (`balanced_backward`)
    several processes: gradients and losses averaged over the ranks, one all_reduce
    balance=fixed: head gradients divided by lambda (the head learns at the natural scale)
    clipping (global, separate or none)
    Adam, skipped on the device when the loss or a gradient is not finite
    skip counters

`take_step` does all of it from the two losses. The eager step calls it after the forward pass,
a CUDA graph captures it (`graphs.py`; no host sync then), and each rank of a multi-process run
calls it on its own batch. It returns a `StepMetrics` of device scalars, read at the steps that
log (`StepMetrics.read`: one host sync). How the two objectives are balanced is `backward`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
from torch import nn
from torch.nn.utils import clip_grads_with_norm_, get_total_norm

from alignprog.config import TrainConfig
from alignprog.training.distributed import Dist

Scalar = torch.Tensor | float

# balance=gradient: a gradient on the embeddings shorter than this counts as none
NO_GRADIENT = 1e-30


class StepOwner(Protocol):
    """What a step needs from the trainer."""

    cfg: object                   # .train: TrainConfig
    device: torch.device
    dist: Dist
    optimizer: torch.optim.Optimizer
    encoder_params: list[nn.Parameter]
    head_params: list[nn.Parameter]
    lam: float                    # balance=fixed
    balance: str                  # "gradient" or "fixed"
    balance_ratio: float
    # parameters between the tensor both losses read and the alignment loss (GTCC's drop
    # branch; the fusion when the head reads the base features); None when the losses read
    # no tensor in common (the head has its own base encoder)
    alignment_params: list[nn.Parameter] | None
    lam_sum: torch.Tensor         # () float64: balance=gradient, the lambdas since validation
    lam_steps: torch.Tensor       # () long: how many
    learnable: bool
    skipped_steps: torch.Tensor   # () long, on the device
    bad_run: torch.Tensor         # () long: consecutive bad steps


@dataclass
class StepMetrics:
    """One step's numbers: losses and gradient norms as device scalars (after a multi-process
    step: the ranks' means), the batch's counts as ints (summed over the ranks)."""

    step: int
    epoch: int
    lam: Scalar                            # the step's lambda (balance=gradient: its own)
    samples: int
    videos: int
    frames: int
    alignment: Scalar
    progress: Scalar | None = None
    total: Scalar | None = None            # None: nothing to learn from (see `no_loss`)
    bad: Scalar | None = None              # a non-finite loss or gradient: no update
    grad_encoder: Scalar | None = None     # before clipping
    grad_head: Scalar | None = None
    grad_encoder_clipped: Scalar | None = None
    grad_head_clipped: Scalar | None = None
    no_loss: bool = False                  # skipped without a loss (no progress sample, ...)
    ranks: int | None = None               # several processes: how many
    extra: dict = field(default_factory=dict)            # host values: lr, seconds, ...

    TENSORS = ("alignment", "progress", "lam", "total", "bad", "grad_encoder", "grad_head",
               "grad_encoder_clipped", "grad_head_clipped")

    def values(self) -> dict[str, Scalar | None]:
        return {k: getattr(self, k) for k in self.TENSORS}

    def read(self, counters: dict[str, torch.Tensor] | None = None) -> dict:
        """The record of this step (and `counters`) with every device value read, in one host
        sync: the dict that logs, displays and metrics.jsonl show."""
        values = self.values() | dict(counters or {})
        keys = [k for k, v in values.items() if isinstance(v, torch.Tensor)]
        if keys:
            # Scalars may sit on the CPU (counters of a CPU run, a multi-process record) and
            # on the GPU: stack them on one device.
            device = next((values[k].device for k in keys if values[k].device.type != "cpu"),
                          values[keys[0]].device)
            read = torch.stack([values[k].detach().to(device, torch.float64).reshape(())
                                for k in keys]).tolist()
            values |= dict(zip(keys, read))
        out = {"step": self.step, "epoch": self.epoch, "alignment": values["alignment"],
               "progress": values["progress"], "lambda": values["lam"], "samples": self.samples,
               "videos": self.videos, "frames": self.frames}
        if self.ranks is not None:
            out["ranks"] = self.ranks
        if self.no_loss:
            out["no_loss"] = True
        skipped = self.no_loss or bool(values["bad"])
        out["total"] = None if skipped else values["total"]
        progress = values["progress"]
        if progress is not None and self.ranks is None:
            # as the device computes it: the float32 loss times lambda in float32
            progress = float(torch.tensor(progress, dtype=torch.float32) * values["lam"])
        elif progress is not None:
            progress = values["lam"] * progress
        out["weighted_progress"] = progress
        for k in ("grad_encoder", "grad_head", "grad_encoder_clipped", "grad_head_clipped"):
            if values[k] is not None:
                out[k] = values[k]
        out["skipped"] = skipped
        for k in counters or {}:
            out[k] = int(values[k])
        return out | self.extra

    def with_values(self, **values) -> StepMetrics:
        return replace(self, **values)


def objective(alignment: torch.Tensor | None, progress: torch.Tensor | None, lam: float, *,
              head_only: bool = False) -> torch.Tensor | None:
    """The loss the step minimises: alignment + lambda * progress; the progress loss alone in
    the head-only stage; None when there is nothing to learn from."""
    if head_only:
        return progress
    if progress is None:
        return alignment
    return alignment + lam * progress


def backward(owner: StepOwner, alignment: torch.Tensor, progress: torch.Tensor | None,
             embeddings: torch.Tensor | None, *, head_only: bool = False
             ) -> tuple[torch.Tensor | None, Scalar]:
    """Backpropagate the step's objective: (the total, detached, or None when there is
    nothing to learn from; the lambda of the step). balance=gradient goes through
    `balanced_backward` (also a step without a progress sample: its alignment gradient is
    scaled as on every other step); balance=fixed and the head-only stage through
    `objective`'s total, whose head gradients `rescale_head` divides by lambda later."""
    if owner.balance == "gradient" and not head_only:
        if owner.alignment_params is None:
            return unshared_backward(alignment, progress)
        if embeddings is None:
            raise ValueError("balance=gradient weighs the losses by their gradients on the "
                             "embeddings: pass the embeddings both losses read")
        return balanced_backward(owner, alignment, progress, embeddings)
    total = objective(alignment, progress, owner.lam, head_only=head_only)
    if total is None:
        return None, owner.lam
    total.backward()
    return total.detach(), owner.lam


def unshared_backward(alignment: torch.Tensor, progress: torch.Tensor | None
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """balance=gradient when no parameter feeds both losses (the head reads a base encoder of
    its own): each loss's gradient reaches only its own parameters, at its natural scale,
    from one backward of alignment + progress; nothing to balance, lambda 1 (0 without a
    progress term). The total is float64, as `balanced_backward`'s."""
    total = alignment if progress is None else alignment + progress
    total.backward()
    lam = torch.full((), 0.0 if progress is None else 1.0, dtype=torch.float64,
                     device=alignment.device)
    return total.detach().double(), lam


def _inverse(norm: torch.Tensor) -> torch.Tensor:
    """1 / norm, or 0 for a norm at or below NO_GRADIENT (no gradient to scale)."""
    return torch.where(norm > NO_GRADIENT, 1.0 / norm, 0.0)


def balanced_backward(owner: StepOwner, alignment: torch.Tensor, progress: torch.Tensor | None,
                      embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """balance=gradient (docs/algorithms.md#balancing-the-objectives): with g_a and g_p the
    gradients of the alignment and progress losses on the tensor both read (`embeddings`: the
    head's input), the encoder gets the gradient of

        alignment / |g_a| + ratio * progress / |g_p|

    (the weights detached), so the progress gradient there is `ratio` times as long as the
    alignment's and the alignment loss's scale drops out; the head gets grad(progress), its
    natural scale. Without a progress term the encoder gets the gradient of alignment / |g_a|
    alone. The step's lambda, in the units of alignment + lambda * progress, is
    ratio * |g_a| / |g_p| (0 without progress); the total returned is that sum, float64, NaN
    when a gradient is not finite (the step is then skipped as bad).

    Every part of the graph is walked once, with no host sync: g_a comes with the gradients
    of `owner.alignment_params` (those between `embeddings` and the alignment loss), g_p with
    the head's, and one backward from `embeddings` with the weighted sum walks the rest.
    """
    above = [p for p in owner.alignment_params if p.requires_grad]
    g_align, *g_above = torch.autograd.grad(alignment, [embeddings, *above], allow_unused=True)
    # Norms and weights in float64: a saturated head's progress gradient may be tiny, and
    # ratio / |g_p| and lambda must not overflow.
    norm_align = torch.linalg.vector_norm(g_align, dtype=torch.float64)
    w_align = _inverse(norm_align)
    _accumulate(above, g_above, w_align)
    # the weighted sum in at least fp32 (the point is bf16/fp16 under autocast in features mode)
    work = torch.promote_types(g_align.dtype, torch.float32)
    g_emb = g_align.to(work) * w_align.to(work)
    lam = torch.zeros((), dtype=torch.float64, device=norm_align.device)
    finite = torch.isfinite(norm_align)
    total = alignment.detach().double()
    if progress is not None:
        head = [p for p in owner.head_params if p.requires_grad]
        g_prog, *g_head = torch.autograd.grad(progress, [embeddings, *head], allow_unused=True)
        norm_prog = torch.linalg.vector_norm(g_prog, dtype=torch.float64)
        g_emb = g_emb + g_prog.to(work) * (owner.balance_ratio * _inverse(norm_prog)).to(work)
        _accumulate(head, g_head, None)
        lam = owner.balance_ratio * norm_align * _inverse(norm_prog)
        finite = finite & torch.isfinite(norm_prog)
        total = total + lam * progress.detach().double()
    torch.autograd.backward([embeddings], [g_emb.to(embeddings.dtype)])
    return torch.where(finite, total, torch.nan), lam


def _accumulate(params: list[nn.Parameter], grads: list[torch.Tensor | None],
                weight: torch.Tensor | None) -> None:
    """Add `grads` (times `weight`, a device scalar, when given) to the parameters' .grad,
    laid out as the parameter (autograd.grad may return another stride order, which the fused
    Adam refuses; a backward's accumulation would have matched it)."""
    for p, g in zip(params, grads):
        if g is None:
            continue
        if weight is not None:
            g = g * weight.to(g.dtype)
        if g.stride() != p.stride():
            g = torch.empty_like(p).copy_(g)
        p.grad = g if p.grad is None else p.grad + g


def total_norm(params: list[nn.Parameter], device: torch.device) -> torch.Tensor:
    """The global L2 norm of the parameters' gradients, a 0-dim float32 tensor on `device`
    (0 when none has a gradient); no host sync."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=device)
    return get_total_norm(grads).float()


def clip_to(params: list[nn.Parameter], norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale the gradients of `params` (global norm `norm`) down to at most `max_norm`
    (`clip_grads_with_norm_`: coefficient max_norm / (norm + 1e-6), at most 1); the norm after."""
    if any(p.grad is not None for p in params):
        clip_grads_with_norm_(params, max_norm, norm)
    return norm * (max_norm / (norm + 1e-6)).clamp(max=1.0)


def clip_gradients(owner: StepOwner, *, head_only: bool = False
                   ) -> tuple[torch.Tensor, ...]:
    """Clipping in the configured mode: (encoder norm, head norm) before and after, device
    scalars. Global: one norm over all parameters; separate: each part its own threshold (the
    head-only stage clips the head alone); none. A run without a head has a head norm of 0."""
    tc: TrainConfig = owner.cfg.train
    enc = total_norm(owner.encoder_params, owner.device)
    head = total_norm(owner.head_params, owner.device)
    enc_c, head_c = enc, head
    if head_only or tc.clip_mode == "separate":
        if not head_only:
            enc_c = clip_to(owner.encoder_params, enc, tc.encoder_clip)
        if owner.head_params:
            head_c = clip_to(owner.head_params, head, tc.head_clip)
    elif tc.clip_mode == "global":
        both = torch.linalg.vector_norm(torch.stack([enc, head]))
        coef = clip_to(owner.encoder_params + owner.head_params, both, tc.encoder_clip) / both
        coef = torch.where(both > 0, coef, 1.0)
        enc_c, head_c = enc * coef, head * coef
    return enc, head, enc_c, head_c


def rescale_head(owner: StepOwner, head_only: bool) -> None:
    """balance=fixed: the head received lambda * grad(progress); dividing by lambda lets it
    learn at the natural scale while the encoder keeps the lambda-scaled signal
    (balance=gradient gives the head grad(progress) itself)."""
    if (owner.learnable and not head_only and owner.balance == "fixed" and owner.lam > 0
            and owner.lam != 1):
        grads = [p.grad for p in owner.head_params if p.grad is not None]
        if grads:
            torch._foreach_div_(grads, owner.lam)


def _optimizer_step(owner: StepOwner, bad: torch.Tensor, release_grads: bool) -> None:
    """Adam unless `bad`. The fused optimizer (CUDA) skips on the device (found_inf, no host
    sync, capturable); on the CPU the host decides, which costs nothing there."""
    opt = owner.optimizer
    if opt.defaults.get("fused"):
        opt.found_inf = bad.float()
        try:
            opt.step()
        finally:
            del opt.found_inf
    elif not bool(bad):
        opt.step()
    if release_grads:   # not inside a CUDA graph, whose gradients are its own buffers
        opt.zero_grad(set_to_none=True)
    owner.skipped_steps += bad
    owner.bad_run.copy_(torch.where(bad, owner.bad_run + 1, 0))


def take_step(owner: StepOwner, alignment: torch.Tensor, progress: torch.Tensor | None,
              info: StepMetrics, *, embeddings: torch.Tensor | None = None,
              head_only: bool = False, release_grads: bool = True) -> StepMetrics:
    """The step from the two losses (device scalars with their autograd graphs) and the
    embeddings both read (balance=gradient measures the gradients there); `info` holds the
    host counts (step, epoch, samples, ...). Gradients must be zero (None) on entry."""
    metrics = info.with_values(alignment=alignment.detach(),
                               progress=None if progress is None else progress.detach())
    if owner.dist.active:
        return _take_step_ranks(owner, metrics, alignment, progress, embeddings, head_only,
                                release_grads)
    total, lam = backward(owner, alignment, progress, embeddings, head_only=head_only)
    metrics = metrics.with_values(lam=lam)
    if total is None:   # nothing to learn from (head only, no sample): skipped, not bad
        owner.skipped_steps += 1
        return metrics.with_values(no_loss=True, bad=torch.ones((), dtype=torch.bool))
    return _update(owner, metrics.with_values(total=total), ~torch.isfinite(total), head_only,
                   release_grads)


def finish_accumulated(owner: StepOwner,
                       parts: list[tuple[StepMetrics, torch.Tensor, torch.Tensor | None,
                                         torch.Tensor | None, Scalar]],
                       *, head_only: bool = False) -> StepMetrics:
    """The one update after the backward of several batches (`train.accumulate`, one process):
    `parts` holds per batch (host counts, alignment loss, progress loss or None, the total
    `backward` returned or None, its lambda), their gradients summed in .grad. The gradients
    become the mean over the batches that had a loss, then head rescale, clipping and Adam as
    in `take_step`; the step is bad when any batch's total is not finite. The record holds the
    batches' mean losses, totals and lambdas and their summed counts."""
    first = parts[0][0]
    progress = [p for _, _, p, _, _ in parts if p is not None]
    metrics = first.with_values(
        videos=sum(info.videos for info, *_ in parts),
        frames=sum(info.frames for info, *_ in parts),
        samples=sum(info.samples for info, *_ in parts),
        alignment=torch.stack([a.float() for _, a, *_ in parts]).mean(),
        progress=torch.stack([p.float() for p in progress]).mean() if progress else None,
        extra={"batches": len(parts)})
    counted = [(total, lam) for *_, total, lam in parts if total is not None]
    if not counted:   # no batch had anything to learn from: skipped, not bad
        owner.skipped_steps += 1
        return metrics.with_values(no_loss=True, bad=torch.ones((), dtype=torch.bool))
    totals = torch.stack([total.double() for total, _ in counted])
    lams = [lam for _, lam in counted]
    lam = (sum(lams) / len(lams) if not any(isinstance(v, torch.Tensor) for v in lams)
           else torch.stack([torch.as_tensor(v, dtype=torch.float64, device=owner.device)
                             for v in lams]).mean())
    grads = [p.grad for p in owner.encoder_params + owner.head_params if p.grad is not None]
    if grads and len(counted) > 1:
        torch._foreach_div_(grads, float(len(counted)))
    bad = ~torch.isfinite(totals).all()
    return _update(owner, metrics.with_values(total=totals.mean(), lam=lam), bad, head_only,
                   release_grads=True)


def _update(owner: StepOwner, metrics: StepMetrics, bad: torch.Tensor, head_only: bool,
            release_grads: bool) -> StepMetrics:
    rescale_head(owner, head_only)
    enc, head, enc_c, head_c = clip_gradients(owner, head_only=head_only)
    bad = bad | ~torch.isfinite(enc) | ~torch.isfinite(head)
    _optimizer_step(owner, bad, release_grads)
    if owner.balance == "gradient" and metrics.progress is not None and not head_only:
        # the epoch's mean lambda, for the validation total (on the device: no sync)
        owner.lam_sum += torch.where(bad, 0.0, torch.as_tensor(metrics.lam, device=owner.device))
        owner.lam_steps += ~bad
    return metrics.with_values(bad=bad, grad_encoder=enc, grad_head=head,
                               grad_encoder_clipped=enc_c, grad_head_clipped=head_c)


def _take_step_ranks(owner: StepOwner, metrics: StepMetrics, alignment_loss: torch.Tensor,
                     progress_loss: torch.Tensor | None, embeddings: torch.Tensor | None,
                     head_only: bool, release_grads: bool) -> StepMetrics:
    """One rank's step of several, without a host sync: every rank with a loss runs its
    backward (a non-finite one too), one all_reduce averages the gradients and sums the
    losses, and a non-finite loss or gradient anywhere, which the sum carries to every rank,
    skips the step on the device everywhere. What only the hosts know (which ranks have a
    loss and a progress term, which parameters have a gradient, the counts) goes through the
    host group first (`Dist.host_sum`); a step where no rank has a loss is skipped without
    counting as bad."""
    dist, device = owner.dist, owner.device
    has_loss = progress_loss is not None or not head_only
    has_progress = progress_loss is not None
    total, lam = None, owner.lam
    if has_loss:
        total, lam = backward(owner, alignment_loss, progress_loss, embeddings,
                              head_only=head_only)
    params = [p for p in owner.encoder_params + owner.head_params if p.requires_grad]
    counts = dist.host_sum([int(has_loss), int(has_progress), metrics.videos, metrics.frames,
                            metrics.samples] + [int(p.grad is not None) for p in params])
    n_loss, n_prog, videos, frames, samples = counts[:5]
    metrics = metrics.with_values(videos=videos, frames=frames, samples=samples,
                                  ranks=dist.world_size)

    if not n_loss:   # nothing to learn from on any rank (head only, no sample): skipped, not bad
        owner.optimizer.zero_grad(set_to_none=True)
        owner.skipped_steps += 1
        return metrics.with_values(progress=None, no_loss=True,
                                   bad=torch.ones((), dtype=torch.bool, device=device))

    def scalar(value) -> torch.Tensor:   # a float becomes a device fill, not a blocking copy
        if isinstance(value, torch.Tensor):
            return value.detach().to(device, torch.float64).reshape(())
        return torch.full((), float(value), dtype=torch.float64, device=device)

    zero = scalar(0.0)
    total_t = scalar(total) if total is not None else zero
    # (alignment, progress, total, lambda, non-finite totals) of this rank, summed over ranks
    stats = torch.stack([scalar(alignment_loss), scalar(progress_loss) if has_progress else zero,
                         total_t, scalar(lam) if has_progress else zero,
                         (~torch.isfinite(total_t)).double()])
    summed = dist.average_gradients(params, [c > 0 for c in counts[5:]], stats)
    align_sum, prog_sum, total_sum, lam_sum, n_bad = summed.double().unbind()
    fallback = owner.lam if owner.balance == "fixed" else 0.0
    step_lam = (torch.where(n_bad > 0, fallback, lam_sum / n_prog) if n_prog
                else scalar(fallback))
    metrics = metrics.with_values(alignment=align_sum / dist.world_size,
                                  progress=prog_sum / n_prog if n_prog else None,
                                  lam=step_lam, total=total_sum / n_loss)
    return _update(owner, metrics, n_bad > 0, head_only, release_grads)
