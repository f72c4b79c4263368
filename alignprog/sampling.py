"""Segment sampling and progress targets for the learnable head.

See docs/algorithms.md#segment-sampling (steps 1-2 of the pipeline description).

Per video: ``samples_per_video`` draws of a non-background action of at least
``min_segment_len`` frames (uniform over the valid actions, with replacement), then
``frames_per_segment`` target frames t in it without replacement; the sample is the segment from
the action start s to t and its ground truth is ``(t - s + 1) / L`` (L the action length).
Candidates are t >= s + min_segment_len - 1, so every segment has at least ``min_segment_len``
frames. Stratified mode (the reference's rule): each non-empty progress bin, early
q <= 0.33 < mid <= 0.67 < late, gets max(1, n // 3) targets, the rest are drawn uniformly from
the candidates left; with n = 5 that is one per non-empty bin plus two extras, which the
pipeline description calls "~2/~2/~1" (with n < 3 the rule still takes one per non-empty bin,
so a draw may hold up to 3 targets, as the reference's). Uniform mode draws all n uniformly.

Everything is batched over videos and draws with random keys and sorts (no Python loop over
videos, draws or frames), on the CPU, from a ``torch.Generator``: the same seed gives the same
samples whatever device the model runs on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from alignprog.runtime import to_device

# The reference's bin edges (inclusive upper edges).
BIN_EDGES = (0.33, 0.67)
BIN_NAMES = ("early", "mid", "late")


@dataclass
class SegmentSamples:
    """Q sampled (segment, target) pairs of a batch; all tensors (Q,) on the CPU."""

    video: torch.Tensor     # batch row of the video
    action: torch.Tensor    # segment index k of the action in that video's annotation
    draw: torch.Tensor      # which of the samples_per_video draws produced it
    start: torch.Tensor     # first frame s of the action (= of the segment)
    target: torch.Tensor    # target frame t; the segment is frames s..t
    length: torch.Tensor    # action length L
    gt: torch.Tensor        # (t - s + 1) / L, float32
    bin: torch.Tensor       # 0 early, 1 mid, 2 late
    stats: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.gt)

    @property
    def segment_length(self) -> torch.Tensor:
        return self.target - self.start + 1                                  # (Q,)


def progress_bin(q: torch.Tensor) -> torch.Tensor:
    """0 early (q <= 0.33), 1 mid (<= 0.67), 2 late, as the reference bins."""
    return (q > BIN_EDGES[0]).long() + (q > BIN_EDGES[1]).long()


def _rank(keys: torch.Tensor) -> torch.Tensor:
    """Rank of every entry along the last dim (0 = smallest)."""
    return keys.argsort(dim=-1).argsort(dim=-1)


def sample_segments(seg_start: torch.Tensor, seg_end: torch.Tensor,
                    seg_foreground: torch.Tensor, seg_mask: torch.Tensor, *,
                    samples_per_video: int = 10, frames_per_segment: int = 5,
                    min_segment_len: int = 3, stratified: bool = True,
                    generator: torch.Generator | None = None) -> SegmentSamples:
    """Draw the progress head's training samples for a batch (docs/algorithms.md#segment-sampling).

    Inputs are a batch's padded segment tensors (B, K) (``Batch.seg_start`` etc.: canonical,
    non-overlapping, inside each video). Returns the samples and ``stats``: videos, videos without
    a usable action (all background, or only actions shorter than ``min_segment_len``), all-
    background videos, draws, targets, and draws that got fewer than ``frames_per_segment``
    targets because their action was short.
    """
    if min(samples_per_video, frames_per_segment, min_segment_len) < 1:
        raise ValueError("samples_per_video, frames_per_segment and min_segment_len must be >= 1")
    seg_start, seg_end = seg_start.cpu(), seg_end.cpu()
    seg_foreground, seg_mask = seg_foreground.cpu(), seg_mask.cpu()
    b = seg_start.shape[0]
    n, m = frames_per_segment, min_segment_len
    seg_len = seg_end - seg_start + 1                                        # (B, K)
    valid = seg_mask & seg_foreground & (seg_len >= m)                       # (B, K)
    usable = valid.any(1)                                                    # (B,)
    stats = {"videos": b, "videos_without_usable_action": int((~usable).sum()),
             "all_background_videos": int((~(seg_mask & seg_foreground).any(1)).sum()),
             "draws": 0, "targets": 0, "short_draws": 0}
    rows = usable.nonzero().squeeze(1)                                       # (V,)
    if len(rows) == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return SegmentSamples(empty, empty, empty, empty, empty, empty,
                              torch.zeros(0), empty, stats)

    # Step 2: per usable video, samples_per_video actions, uniform over its valid actions.
    action = torch.multinomial(valid[rows].float(), samples_per_video, replacement=True,
                               generator=generator)                          # (V, S)
    video = rows[:, None].expand_as(action).reshape(-1)                      # (D,) D = V*S
    action = action.reshape(-1)                                              # (D,)
    draw = torch.arange(samples_per_video).repeat(len(rows))                 # (D,)
    s = seg_start[video, action]                                             # (D,)
    length = seg_len[video, action]                                          # (D,)

    # Step 3: candidates t = s + m - 1 + c, c = 0 .. C-1, with C = L - m + 1 >= 1.
    count = length - m + 1                                                   # (D,)
    c = torch.arange(int(count.max()))[None, :]                              # (1, Cmax)
    real = c < count[:, None]                                                # (D, Cmax)
    q = (c + m).float() / length[:, None].float()                            # (D, Cmax) progress
    bins = progress_bin(q)                                                   # (D, Cmax)
    want = count.clamp(max=n)                                                # (D,) targets/draw

    key = torch.rand(real.shape, generator=generator)                        # (D, Cmax)
    inf = torch.tensor(float("inf"))
    if stratified:
        # Step 5: rank within each bin by a random key; the first k of each bin are guaranteed.
        # Only when |T| >= 3 (step 6: otherwise uniform).
        k = max(1, n // 3)
        by_bin = torch.where(real, bins.float() + key, inf)                  # (D, Cmax)
        rank = _rank(by_bin)                                                 # (D, Cmax)
        below = torch.stack([(real & (bins < j)).sum(1) for j in range(3)], 1)  # (D, 3)
        rank_in_bin = rank - below.gather(1, bins.clamp(max=2))              # (D, Cmax)
        guaranteed = real & (rank_in_bin < k) & (count >= 3)[:, None]        # (D, Cmax)
        # The remaining slots: uniform among the candidates not yet taken (a fresh key).
        left = (want - guaranteed.sum(1)).clamp(min=0)                       # (D,)
        key2 = torch.rand(real.shape, generator=generator)
        rest = _rank(torch.where(real & ~guaranteed, key2, inf))             # (D, Cmax)
        chosen = guaranteed | (real & ~guaranteed & (rest < left[:, None]))
    else:
        chosen = real & (_rank(torch.where(real, key, inf)) < want[:, None])  # (D, Cmax)

    d_idx, c_idx = chosen.nonzero(as_tuple=True)                             # (Q,), (Q,) by time
    target = s[d_idx] + m - 1 + c_idx                                        # (Q,)
    stats.update(draws=len(video), targets=len(d_idx), short_draws=int((count < n).sum()))
    return SegmentSamples(
        video=video[d_idx], action=action[d_idx], draw=draw[d_idx], start=s[d_idx],
        target=target, length=length[d_idx], gt=q[d_idx, c_idx], bin=bins[d_idx, c_idx],
        stats=stats)


def gather_segments(embeddings: torch.Tensor, samples: SegmentSamples
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-aligned, zero-padded segment embeddings for the head: (Q, L_max, D) and lengths (Q,).

    ``embeddings`` (B, T, D) stays in the graph: progress gradients reach the encoder
    (docs/algorithms.md#head-input-and-gradient-flow).
    The samples stay on the host (L_max is read there); only their indices go to the device.
    """
    device = embeddings.device
    lengths = samples.segment_length                                        # (Q,) host
    width = int(lengths.max()) if len(lengths) else 0
    lengths_dev = to_device(lengths, device)                                # (Q,)
    seg = gather_frames(embeddings, to_device(samples.video, device),
                        to_device(samples.start, device), lengths_dev, width)
    return seg, lengths_dev


def gather_frames(embeddings: torch.Tensor, video: torch.Tensor, start: torch.Tensor,
                  length: torch.Tensor, width: int) -> torch.Tensor:
    """Frames start .. start + length - 1 of row `video` of (B, T, D) embeddings, left-aligned
    and zero-padded to `width`: (Q, width, D); `video`, `start`, `length` (Q,) on the device."""
    offs = torch.arange(width, device=embeddings.device)[None, :]           # (1, L)
    inside = offs < length[:, None]                                          # (Q, L)
    # Past its length a row reads the frames after it (zeroed below), not one shared frame:
    # thousands of copies of one index make the backward's accumulation serial (~0.7 ms on a
    # GPU with deterministic kernels, for the padded rows of the trainer's CUDA graphs).
    frame = (start[:, None] + offs).clamp(max=embeddings.shape[1] - 1)     # (Q, L)
    seg = embeddings[video[:, None], frame]                                  # (Q, L, D)
    return torch.where(inside[..., None], seg, 0.0)
