"""Base encoders: padded batch of per-frame inputs -> per-frame embeddings (spec ALGORITHMS §1.1-1.3).

Every encoder takes a zero-padded batch ``x`` of shape (B, T, *F) and a boolean ``mask`` of shape
(B, T) (True = real frame, padding at the end of each row, as `alignprog.data.batching.Batch` builds
it) and returns (B, T, out_dim) with exact zeros on padded frames. A video must embed the same
whether it is alone or padded inside a longer batch, and whatever sits in its padded positions:
padded inputs are never read into a real frame's output.

The reference code takes a list of per-video tensors and loops over frames (spec §1.1, B34); here
everything is batched tensor code. The modules are pure: no config import, no device choice; new
tensors take their device and dtype from the inputs (STYLE habit 7).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F


class BaseEncoder(nn.Module):
    """Per-frame encoder of a padded batch; subclasses set `out_dim` and implement `forward`."""

    out_dim: int
    # Trailing per-frame input shape rank: 1 for (B, T, D) features, 3 for (B, T, C, H, W) maps.
    frame_ndim: int = 1

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: (B, T, *F) float, mask: (B, T) bool (True = real frame). Returns (B, T, out_dim); padded frames are 0."""
        raise NotImplementedError

    def _check(self, x: torch.Tensor, mask: torch.Tensor) -> None:
        if x.dim() != 2 + self.frame_ndim:
            raise ValueError(f"{type(self).__name__} expects x of rank {2 + self.frame_ndim} "
                             f"(B, T, *F), got shape {tuple(x.shape)}")
        if mask.shape != x.shape[:2]:
            raise ValueError(f"mask must have shape (B, T) = {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool, got {mask.dtype}")


def _scatter_frames(values: torch.Tensor, b_idx: torch.Tensor, t_idx: torch.Tensor,
                    batch: int, frames: int) -> torch.Tensor:
    """Place per-real-frame rows (N, D) into a zero (B, T, D) tensor (out-of-place, differentiable)."""
    out = values.new_zeros((batch, frames, values.shape[-1]))  # (B, T, D)
    return out.index_put((b_idx, t_idx), values)               # (B, T, D), zeros on padding


# ---------------------------------------------------------------------------------------------
# §1.1 resnet50
# ---------------------------------------------------------------------------------------------

class ResNet50Encoder(BaseEncoder):
    """Spec §1.1 "resnet50": 3-D convs over a k-frame stack of ResNet-50 layer3 maps, max-pool, MLP.

    Input (B, T, C, H, W) with C = `in_channels` (1024, 14x14 maps in the DOC pipeline). For output
    frame r the stack holds frames r-k+1 .. r (the intended window; fix of B5). With
    `reference_window=True` it holds r-k .. r-1 as the reference does, which never reads frame r
    and makes frame 0 independent of the input; use it only to reproduce published numbers.
    Frames before 0 (and, defensively, any frame whose mask is False) enter the stack as zero maps.

    `conv_channels` and `mlp_dim` default to the spec's fixed widths (1024, 512) and 512; they exist
    so tests can build a small model. `out_dim` is honoured (fix of B10; the reference always emits
    128). The last Linear is followed by ReLU as in the reference, so embeddings are non-negative.

    Real frames are processed in chunks of `chunk_frames` to bound the forward peak memory of the
    (n, C, k, H, W) stacks and conv activations; during training the activations of every chunk
    are still kept for backward.
    """

    frame_ndim = 3

    def __init__(self, in_channels: int = 1024, temporal_depth: int = 2, out_dim: int = 128,
                 reference_window: bool = False, chunk_frames: int = 64,
                 conv_channels: Sequence[int] = (1024, 512), mlp_dim: int = 512) -> None:
        super().__init__()
        if in_channels < 1 or out_dim < 1 or mlp_dim < 1:
            raise ValueError(f"in_channels, out_dim and mlp_dim must be >= 1, got "
                             f"{in_channels}, {out_dim}, {mlp_dim}")
        if temporal_depth < 1:
            raise ValueError(f"temporal_depth must be >= 1, got {temporal_depth}")
        if chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1, got {chunk_frames}")
        if len(conv_channels) != 2 or min(conv_channels) < 1:
            raise ValueError(f"conv_channels must be two positive widths, got {tuple(conv_channels)}")
        c1, c2 = (int(c) for c in conv_channels)
        self.in_channels = in_channels
        self.temporal_depth = temporal_depth
        self.out_dim = out_dim
        self.reference_window = reference_window
        self.chunk_frames = chunk_frames
        # §1.1 step 2: two 3x3x3 convs with "same" padding (padding 1 for kernel 3) and bias.
        self.conv = nn.Sequential(
            nn.Conv3d(in_channels, c1, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv3d(c1, c2, kernel_size=3, padding=1), nn.ReLU(),
        )
        # §1.1 step 4: 512 -> 512 -> 512 -> D, ReLU after every layer (non-negative embeddings).
        self.mlp = nn.Sequential(
            nn.Linear(c2, mlp_dim), nn.ReLU(),
            nn.Linear(mlp_dim, mlp_dim), nn.ReLU(),
            nn.Linear(mlp_dim, out_dim), nn.ReLU(),
        )

    def window_offsets(self, device: torch.device | None = None) -> torch.Tensor:
        """Frame offsets of the stack relative to the output frame, oldest first: (k,) int64."""
        k = self.temporal_depth
        last = -1 if self.reference_window else 0  # B5: reference ends at r-1, intended at r
        return torch.arange(last - k + 1, last + 1, device=device)  # (k,)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self._check(x, mask)
        if x.shape[2] != self.in_channels:
            raise ValueError(f"resnet50 encoder expects {self.in_channels} input channels, "
                             f"got x of shape {tuple(x.shape)}")
        batch, frames = mask.shape
        b_idx, t_idx = mask.nonzero(as_tuple=True)          # (N,), (N,) real frames, row-major
        offsets = self.window_offsets(device=x.device)      # (k,)
        embs = []
        for start in range(0, b_idx.numel(), self.chunk_frames):
            b = b_idx[start:start + self.chunk_frames]      # (n,)
            t = t_idx[start:start + self.chunk_frames]      # (n,)
            src = t[:, None] + offsets[None, :]             # (n, k) source frame per stack slot
            # §1.1 step 1: indices below 0 are zero maps. Clamp only to gather safely; the
            # `valid` test below zeroes those slots (and any masked frame, so padding never leaks).
            src_c = src.clamp(min=0)                        # (n, k)
            valid = (src >= 0) & mask[b[:, None], src_c]    # (n, k)
            stack = x[b[:, None], src_c]                    # (n, k, C, H, W)
            # torch.where (not a multiply) so NaN/inf garbage in unused slots cannot propagate.
            stack = torch.where(valid[:, :, None, None, None], stack, 0.0)
            stack = stack.transpose(1, 2)                   # (n, C, k, H, W): depth = time
            feat = self.conv(stack)                         # (n, c2, k, H, W)
            feat = feat.amax(dim=(2, 3, 4))                 # (n, c2) §1.1 step 3 global max-pool
            embs.append(self.mlp(feat))                     # (n, D)
        if embs:
            emb = torch.cat(embs, dim=0)                    # (N, D)
        else:  # no real frame at all: keep the output dtype that a forward would produce
            emb = self.mlp(x.new_zeros((0, self.mlp[0].in_features)))  # (0, D)
        return _scatter_frames(emb, b_idx, t_idx, batch, frames)  # (B, T, D)


# ---------------------------------------------------------------------------------------------
# §1.2 temporal_stacking
# ---------------------------------------------------------------------------------------------

def stacking_schedule(in_dim: int, channels: int, out_dim: int, temporal_depth: int,
                      num_layers: int) -> list[tuple[int, int, int]]:
    """(in, out, kernel) of each Conv1d of spec §1.2; defaults give 2048->256 (k=2), 256->128, 5 x 128->128.

    Widths: channels, channels/2, ... while >= out_dim, then out_dim repeated until `num_layers`
    convs. `num_layers` is a minimum (spec §9 "min layers"): a long halving chain is kept whole.
    """
    if in_dim < 1 or temporal_depth < 1 or num_layers < 1:
        raise ValueError(f"in_dim, temporal_depth and num_layers must be >= 1, got "
                         f"{in_dim}, {temporal_depth}, {num_layers}")
    if not 1 <= out_dim < channels:
        raise ValueError(f"temporal_stacking needs 1 <= out_dim < channels (spec 1.2), got "
                         f"out_dim={out_dim}, channels={channels}")
    widths = [channels]
    while widths[-1] % 2 == 0 and widths[-1] // 2 >= out_dim:
        widths.append(widths[-1] // 2)
    if widths[-1] != out_dim:
        # The spec's halving list only ends at out_dim when channels = out_dim * 2^j.
        raise ValueError(f"temporal_stacking: halving channels={channels} never reaches "
                         f"out_dim={out_dim}; channels must be out_dim times a power of two (spec 1.2)")
    widths += [out_dim] * max(0, num_layers - len(widths))
    ins = [in_dim] + widths[:-1]
    kernels = [temporal_depth] + [3] * (len(widths) - 1)
    return list(zip(ins, widths, kernels))


class StackingEncoder(BaseEncoder):
    """Spec §1.2 "temporal_stacking": a stack of bias-free Conv1d over time on (B, T, in_dim) features.

    "Same" padding exactly as PyTorch's ``padding="same"`` (left (k-1)//2 zeros, the rest on the
    right): with the even kernel k=2 of layer 0 the one padding frame goes on the right, so output t
    sees x_t and x_{t+1} (one-frame look-ahead, as the reference). The padding is applied
    explicitly (`F.pad`) rather than through ``padding="same"``, which warns for even kernels.
    Activations are zeroed at padded positions before every conv, so the frame after a video's
    last real frame reads as zero exactly as the "same" padding of the lone video does: outputs
    do not depend on how much padding follows, or what it holds.
    """

    def __init__(self, in_dim: int = 2048, channels: int = 256, out_dim: int = 128,
                 temporal_depth: int = 2, num_layers: int = 7) -> None:
        super().__init__()
        self.schedule = stacking_schedule(in_dim, channels, out_dim, temporal_depth, num_layers)
        self.in_dim = in_dim
        self.out_dim = out_dim
        self.temporal_depth = temporal_depth
        self.convs = nn.ModuleList(
            nn.Conv1d(ci, co, kernel_size=k, stride=1, padding=0, bias=False)  # §1.2: no bias
            for ci, co, k in self.schedule)
        # PyTorch's "same" split: (k-1)//2 frames on the left, the remainder on the right.
        self.pads = [((k - 1) // 2, k - 1 - (k - 1) // 2) for _, _, k in self.schedule]

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self._check(x, mask)
        if x.shape[2] != self.in_dim:
            raise ValueError(f"stacking encoder expects {self.in_dim} input features, got x of "
                             f"shape {tuple(x.shape)}")
        keep = mask[:, None, :]                              # (B, 1, T)
        h = x.transpose(1, 2)                                # (B, F, T): channels = features
        for i, (conv, pad) in enumerate(zip(self.convs, self.pads)):
            h = torch.where(keep, h, 0.0)                    # padded frames read as "same" zeros
            h = F.pad(h, pad)                                # (B, C, T + k - 1) "same" padding
            h = conv(h)                                      # (B, C_i, T)
            if i < len(self.convs) - 1:                      # §1.2: no ReLU after the last conv
                h = torch.relu(h)
        h = torch.where(keep, h, 0.0)                        # (B, D, T) padded outputs are 0
        return h.transpose(1, 2)                             # (B, T, D)


# ---------------------------------------------------------------------------------------------
# §1.3 naive
# ---------------------------------------------------------------------------------------------

class NaiveEncoder(BaseEncoder):
    """Spec §1.3 "naive", the intended per-frame MLP built from `layers` (fix of B7).

    Defaults: 2048 -> 1024 -> ReLU -> 512 -> ReLU -> 512 -> ReLU -> 256 -> ReLU -> 128 (no final
    activation). Only real frames are run through it, so padded garbage reaches neither the output
    nor the weight gradients.
    """

    def __init__(self, in_dim: int = 2048, layers: Sequence[int] = (1024, 512, 512, 256),
                 out_dim: int = 128) -> None:
        super().__init__()
        widths = [in_dim, *(int(w) for w in layers)]
        if min(widths) < 1 or out_dim < 1:
            raise ValueError(f"naive encoder widths must be >= 1, got in_dim={in_dim}, "
                             f"layers={list(layers)}, out_dim={out_dim}")
        self.in_dim = in_dim
        self.out_dim = out_dim
        mods: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            mods += [nn.Linear(a, b), nn.ReLU()]
        mods.append(nn.Linear(widths[-1], out_dim))
        self.mlp = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self._check(x, mask)
        if x.shape[2] != self.in_dim:
            raise ValueError(f"naive encoder expects {self.in_dim} input features, got x of "
                             f"shape {tuple(x.shape)}")
        batch, frames = mask.shape
        b_idx, t_idx = mask.nonzero(as_tuple=True)     # (N,), (N,)
        emb = self.mlp(x[b_idx, t_idx])                 # (N, F) -> (N, D)
        return _scatter_frames(emb, b_idx, t_idx, batch, frames)  # (B, T, D)


# ---------------------------------------------------------------------------------------------
# Variants by name (STYLE habit 3)
# ---------------------------------------------------------------------------------------------

ENCODERS: dict[str, type[BaseEncoder]] = {
    "resnet50": ResNet50Encoder,
    "stacking": StackingEncoder,
    "temporal_stacking": StackingEncoder,  # the reference's name (spec §1.2)
    "naive": NaiveEncoder,
}


def build_encoder(name: str, **kwargs) -> BaseEncoder:
    """The encoder registered under `name`, built with `kwargs` (constructor arguments)."""
    try:
        cls = ENCODERS[name]
    except KeyError:
        raise ValueError(f"unknown encoder {name!r}; valid names: {', '.join(sorted(ENCODERS))}") from None
    return cls(**kwargs)
