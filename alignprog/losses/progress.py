"""Progress losses (docs/algorithms.md#progress-losses): pure tensor functions, no config import.

* Learnable head: the pipeline description's weighted L1,
  ``sum_i w_i |pred_i - gt_i| / sum_i w_i`` with ``w_i = min(1 / gt_i, weight_cap)``
  (docs/algorithms.md#weighted-l1), or the plain mean; per-sample error L1 or MSE.
* ``cumulative_l2`` (no head, docs/algorithms.md#cumulative-l2): progress read off the
  embedding trajectory, the cumulative distance since the action's start divided by a
  normaliser, against the action-level ground truth ``(t - s + 1) / L`` on sampled foreground
  frames.
"""

from __future__ import annotations

from typing import Literal

import torch


def progress_weights(gt: torch.Tensor, weight_cap: float = 10.0) -> torch.Tensor:
    """min(1 / gt, weight_cap) (0.1 -> 10, 0.2 -> 5, 0.5 -> 2, 1 -> 1); constants
    (docs/algorithms.md#weighted-l1)."""
    return (1.0 / gt.clamp_min(1.0 / weight_cap)).clamp(max=weight_cap).detach()


def progress_loss(pred: torch.Tensor, gt: torch.Tensor, *, weighted: bool = True,
                  weight_cap: float = 10.0, kind: Literal["l1", "mse"] = "l1",
                  valid: torch.Tensor | None = None) -> torch.Tensor | None:
    """The loss over all samples of a batch, or None when there are none (the progress term is
    then omitted, with no gradient; docs/algorithms.md#progress-losses). ``valid`` (Q,) bool:
    only these samples count (the trainer pads its samples to a fixed count for its CUDA
    graphs); at least one must be."""
    if kind not in ("l1", "mse"):
        raise ValueError(f"kind must be 'l1' or 'mse', got {kind!r}")
    if pred.numel() == 0:
        return None
    err = (pred - gt).abs() if kind == "l1" else (pred - gt).square()     # (Q,)
    w = progress_weights(gt, weight_cap) if weighted else torch.ones_like(err)  # (Q,)
    if valid is not None:
        w = torch.where(valid, w, 0.0)
    elif not weighted:
        return err.mean()
    return (w * err).sum() / w.sum()


def _frame_segments(mask: torch.Tensor, seg_start: torch.Tensor, seg_mask: torch.Tensor
                    ) -> torch.Tensor:
    """Segment index of every frame (B, T) (canonical segments tile each video)."""
    t = torch.arange(mask.shape[1], device=mask.device)                    # (T,)
    started = (t[None, :, None] >= seg_start[:, None, :]) & seg_mask[:, None, :]  # (B, T, K)
    return (started.sum(-1) - 1).clamp(min=0)                              # (B, T)


def cumulative_distance(embeddings: torch.Tensor, mask: torch.Tensor, seg_start: torch.Tensor,
                        seg_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Path length since the start of each frame's segment, c_t (B, T), and the segment of each
    frame (B, T). c_s = 0 at a segment's first frame, c_t = c_{t-1} + ||u_t - u_{t-1}||
    (docs/algorithms.md#cumulative-l2).
    """
    seg = _frame_segments(mask, seg_start, seg_mask)                       # (B, T)
    sq = (embeddings[:, 1:] - embeddings[:, :-1]).square().sum(-1)          # (B, T-1)
    # sqrt with a zero gradient at 0 (identical consecutive frames) instead of NaN.
    step = torch.where(sq > 0, sq.clamp_min(1e-30).sqrt(), 0.0)            # (B, T-1)
    step = torch.cat([step.new_zeros(step.shape[0], 1), step], dim=1)       # (B, T) d_0 = 0
    first = torch.arange(mask.shape[1], device=mask.device)[None, :] == seg_start.gather(1, seg)
    step = torch.where(first | ~mask, 0.0, step)                           # no step into a segment
    total = step.cumsum(1)                                                  # (B, T)
    at_start = total.gather(1, seg_start.gather(1, seg))                    # (B, T)
    return total - at_start, seg


def segment_path_lengths(embeddings: torch.Tensor, mask: torch.Tensor, seg_start: torch.Tensor,
                         seg_end: torch.Tensor, seg_mask: torch.Tensor) -> torch.Tensor:
    """Total path length c_e of every segment (B, K) (0 on padded segments)."""
    cum, _ = cumulative_distance(embeddings, mask, seg_start, seg_mask)     # (B, T)
    ends = seg_end.clamp(min=0)
    return torch.where(seg_mask, cum.gather(1, ends), 0.0)                  # (B, K)


def cumulative_progress(embeddings: torch.Tensor, mask: torch.Tensor, seg_start: torch.Tensor,
                        seg_end: torch.Tensor, seg_foreground: torch.Tensor,
                        seg_mask: torch.Tensor, *, normaliser: torch.Tensor | None = None
                        ) -> torch.Tensor:
    """Predicted progress pi (B, T) of the ``cumulative_l2`` method
    (docs/algorithms.md#cumulative-l2).

    ``normaliser`` None: each action's own total path length c_e (the reference's, non-causal:
    it needs the action's end). Otherwise a (B, K) tensor of per-segment normalisers, e.g. the
    mean path length of the segment's action class over the training videos (causal; the same
    in training and evaluation, unlike the reference:
    docs/reference-bugs.md#cumulative-l2-normaliser-mismatch). Background frames get 0,
    one-frame actions 0.5, and an action with a zero normaliser a linear ramp (t - s) / (L - 1).
    """
    cum, seg = cumulative_distance(embeddings, mask, seg_start, seg_mask)   # (B, T)
    length = (seg_end - seg_start + 1).gather(1, seg)                       # (B, T)
    if normaliser is None:
        norm = segment_path_lengths(embeddings, mask, seg_start, seg_end, seg_mask)
    else:
        norm = normaliser
    norm = norm.to(cum.dtype).gather(1, seg)                                # (B, T)
    t = torch.arange(mask.shape[1], device=mask.device)[None, :]
    ramp = (t - seg_start.gather(1, seg)).to(cum.dtype) / (length - 1).clamp(min=1)
    pi = torch.where(norm > 0, cum / torch.where(norm > 0, norm, 1.0), ramp)
    pi = torch.where(length == 1, 0.5, pi)
    return torch.where(seg_foreground.gather(1, seg) & mask, pi, 0.0)       # (B, T)


def action_progress_gt(mask: torch.Tensor, seg_start: torch.Tensor, seg_end: torch.Tensor,
                       seg_foreground: torch.Tensor, seg_mask: torch.Tensor) -> torch.Tensor:
    """Action-level ground truth (B, T): (t - s + 1) / L inside actions, 0 on background."""
    seg = _frame_segments(mask, seg_start, seg_mask)                        # (B, T)
    t = torch.arange(mask.shape[1], device=mask.device)[None, :]
    s = seg_start.gather(1, seg)
    length = (seg_end - seg_start + 1).gather(1, seg)
    gt = (t - s + 1).float() / length.float()
    return torch.where(seg_foreground.gather(1, seg) & mask, gt, 0.0)


def cumulative_l2_loss(embeddings: torch.Tensor, mask: torch.Tensor, seg_start: torch.Tensor,
                       seg_end: torch.Tensor, seg_foreground: torch.Tensor,
                       seg_mask: torch.Tensor, *, frames_per_video: int = 50,
                       normaliser: torch.Tensor | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor | None:
    """Mean |pi_t - gt_t| over min(frames_per_video, #foreground) foreground frames per video,
    drawn without replacement (docs/algorithms.md#cumulative-l2; frames_per_video =
    samples x frames = 50).
    None when the batch has no foreground frame. Gradients reach the embeddings."""
    pi = cumulative_progress(embeddings, mask, seg_start, seg_end, seg_foreground, seg_mask,
                             normaliser=normaliser)                         # (B, T)
    gt = action_progress_gt(mask, seg_start, seg_end, seg_foreground, seg_mask)
    seg = _frame_segments(mask, seg_start, seg_mask)
    fg = (seg_foreground.gather(1, seg) & mask).cpu()                       # (B, T)
    if not fg.any():
        return None
    key = torch.rand(fg.shape, generator=generator)                         # (B, T) CPU
    rank = torch.where(fg, key, 2.0).argsort(1).argsort(1)                  # (B, T)
    pick = (fg & (rank < frames_per_video)).to(mask.device)                 # (B, T)
    return (pi - gt).abs()[pick].mean()
