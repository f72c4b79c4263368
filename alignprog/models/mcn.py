"""The multi-head attention-fusion encoder (MCN) and its single-head variant.

Base encoder -> H per-frame head MLPs -> an attention network that weighs the heads per frame
(softmax over heads) -> the weighted sum, the aligned embeddings (B, T, D); plus the optional
GTCC drop branch, a per-frame MLP averaged over each video's frames
(docs/algorithms.md#mcn-attention-fusion).
All heads run as one grouped batched matmul per layer, on real (unpadded) frames only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from alignprog.models.encoders import BaseEncoder


@dataclass
class EncoderOutput:
    embeddings: torch.Tensor                # (B, T, D) aligned embeddings, 0 on padded frames
    mask: torch.Tensor                      # (B, T) bool, True on real frames
    attention: torch.Tensor | None = None   # (B, T, H) head weights, each real row sums to 1
    drop_logits: torch.Tensor | None = None  # (B, D+1) per-video drop classifier (GTCC)
    features: torch.Tensor | None = None    # (B, T, D) base encoder output, 0 on padded frames
    # (B, T, D) the progress head's own base encoder's output (progress.learnable.input =
    # separate; `AlignmentModel` fills it)
    progress_features: torch.Tensor | None = None


def mlp(widths: Sequence[int], activation: type[nn.Module], *, last_activation: bool = False
        ) -> nn.Sequential:
    """Linear layers through ``widths`` with ``activation`` between them."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2 or last_activation:
            layers.append(activation())
    return nn.Sequential(*layers)


class GroupedMLP(nn.Module):
    """H independent MLPs with the same widths, evaluated together with batched matmuls.

    Input (N, in) shared by all groups; output (N, H, out). ReLU between layers, none after the
    last (each MCN head: D -> 512 -> ReLU -> 128 -> ReLU -> 256 -> ReLU -> D). Initialised like
    ``nn.Linear`` per group, so it equals H separate ``nn.Sequential`` MLPs (tested).
    """

    def __init__(self, groups: int, widths: Sequence[int]) -> None:
        super().__init__()
        self.groups = groups
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for a, b in zip(widths[:-1], widths[1:]):
            bound = 1.0 / math.sqrt(a)  # nn.Linear's default init: U(-1/sqrt(in), 1/sqrt(in))
            self.weights.append(nn.Parameter(torch.empty(groups, a, b).uniform_(-bound, bound)))
            self.biases.append(nn.Parameter(torch.empty(groups, b).uniform_(-bound, bound)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("ni,gio->ngo", x, self.weights[0]) + self.biases[0]  # (N, H, w1)
        for w, b in zip(self.weights[1:], self.biases[1:]):
            h = torch.einsum("ngi,gio->ngo", torch.relu(h), w) + b            # (N, H, w_next)
        return h


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real frames: x (B, T, C), mask (B, T) -> (B, C)."""
    m = mask.unsqueeze(-1).to(x.dtype)                               # (B, T, 1)
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


class MultiHeadEncoder(nn.Module):
    """MCN: aligned embeddings from H heads fused by per-frame attention."""

    def __init__(self, base: BaseEncoder, num_heads: int, *, out_dim: int = 128,
                 head_layers: Sequence[int] = (512, 128, 256),
                 attn_layers: Sequence[int] = (512, 1024, 512, 512),
                 drop_layers: Sequence[int] | None = None) -> None:
        super().__init__()
        if base.out_dim != out_dim:
            raise ValueError(f"the base encoder emits {base.out_dim} features but the heads "
                             f"expect {out_dim} (one embedding width D everywhere)")
        self.base = base
        self.num_heads = num_heads
        self.out_dim = out_dim
        self.heads = GroupedMLP(num_heads, [out_dim, *head_layers, out_dim])
        self.attention = mlp([num_heads * out_dim, *attn_layers, num_heads], nn.Tanh,
                             last_activation=False)
        # The attention MLP: Tanh after every hidden layer, none before the softmax.
        self.drop = mlp([out_dim, *drop_layers, out_dim + 1], nn.ReLU) if drop_layers else None
        # Heads over every padded position (True) or the real frames only (False, default);
        # the trainer sets it on CUDA. Not a parameter: checkpoints do not see it.
        self.dense = False

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> EncoderOutput:
        z = self.base(x, mask)                                           # (B, T, D)
        b, t, d = z.shape
        # dense: every position of the padded batch, padding dropped afterwards; the same
        # values for real frames (everything here is per frame) and no data-dependent shape
        # (no host sync; what CUDA graphs need). Otherwise the real frames alone.
        z_real = z.reshape(b * t, d) if self.dense else z[mask]         # (N, D)
        heads = self.heads(z_real)                                       # (N, H, D)
        # Frame t's attention input is its own H embeddings, head-major: (N, H*D). The
        # reference flattens the (H, N, D) stack without permuting it
        # (docs/reference-bugs.md#mcn-attention-input-mixes-frames).
        logits = self.attention(heads.reshape(len(heads), self.num_heads * d))  # (N, H)
        weights = torch.softmax(logits, dim=-1)                          # (N, H)
        fused = (weights.unsqueeze(-1) * heads).sum(1)                   # (N, D)
        keep = mask.unsqueeze(-1)                                        # (B, T, 1)
        if self.dense:
            emb = torch.where(keep, fused.reshape(b, t, d), 0.0)                   # (B, T, D)
            attn = torch.where(keep, weights.reshape(b, t, self.num_heads), 0.0)   # (B, T, H)
        else:
            # new tensors take the dtype of what fills them (autocast may give bf16 heads
            # and fp32 softmax weights)
            emb = fused.new_zeros(b, t, d).masked_scatter(keep, fused)             # (B, T, D)
            attn = weights.new_zeros(b, t, self.num_heads).masked_scatter(keep, weights)
        drop = None
        if self.drop is not None:
            drop = masked_mean(self.drop(emb), mask)                     # (B, D+1)
        return EncoderOutput(emb, mask, attn, drop, z)


class SingleHeadEncoder(nn.Module):
    """No MCN: the base encoder's output is the embedding (`model.mcn=false`), with the optional
    drop branch (GTCC without MCN, docs/algorithms.md#drop-branch)."""

    def __init__(self, base: BaseEncoder, *, drop_layers: Sequence[int] | None = None) -> None:
        super().__init__()
        self.base = base
        self.out_dim = base.out_dim
        self.drop = mlp([base.out_dim, *drop_layers, base.out_dim + 1], nn.ReLU) \
            if drop_layers else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> EncoderOutput:
        emb = self.base(x, mask)                                         # (B, T, D)
        drop = masked_mean(self.drop(emb), mask) if self.drop is not None else None
        return EncoderOutput(emb, mask, None, drop, emb)
