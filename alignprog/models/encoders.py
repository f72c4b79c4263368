"""Base encoders: padded batch of per-frame inputs -> per-frame embeddings.

See docs/algorithms.md#base-encoders (resnet50, stacking, naive).

Every encoder takes a zero-padded batch ``x`` of shape (B, T, *F) and a boolean ``mask`` of shape
(B, T) (True = real frame, padding at the end of each row, as `alignprog.data.batching.Batch` builds
it) and returns (B, T, out_dim) with exact zeros on padded frames. A video must embed the same
whether it is alone or padded inside a longer batch, and whatever sits in its padded positions:
padded inputs are never read into a real frame's output.

The reference code takes a list of per-video tensors and loops over frames
(docs/reference-bugs.md#cpu-bound-reference-loops); here everything is batched tensor code. The
modules are pure: no config import, no device choice; new tensors take their device and dtype
from the inputs, so the modules run on any device and in any dtype.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F

from alignprog.runtime import known_lengths


class BaseEncoder(nn.Module):
    """Per-frame encoder of a padded batch; subclasses set `out_dim` and implement `forward`."""

    out_dim: int
    # Trailing per-frame input shape rank: 1 for (B, T, D) features, 3 for (B, T, C, H, W) maps.
    frame_ndim: int = 1

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: (B, T, *F) float, mask: (B, T) bool (True = real frame). Returns (B, T, out_dim);
        padded frames are 0."""
        raise NotImplementedError

    def _check(self, x: torch.Tensor, mask: torch.Tensor) -> None:
        if x.dim() != 2 + self.frame_ndim:
            raise ValueError(f"{type(self).__name__} expects x of rank {2 + self.frame_ndim} "
                             f"(B, T, *F), got shape {tuple(x.shape)}")
        if mask.shape != x.shape[:2]:
            raise ValueError(f"mask must have shape (B, T) = {tuple(x.shape[:2])}, got "
                             f"{tuple(mask.shape)}")
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be bool, got {mask.dtype}")


def _scatter_frames(values: torch.Tensor, b_idx: torch.Tensor, t_idx: torch.Tensor,
                    batch: int, frames: int) -> torch.Tensor:
    """Place per-real-frame rows (N, D) into a zero (B, T, D) tensor (out-of-place,
    differentiable)."""
    out = values.new_zeros((batch, frames, values.shape[-1]))  # (B, T, D)
    return out.index_put((b_idx, t_idx), values)               # (B, T, D), zeros on padding


# ---------------------------------------------------------------------------------------------
# resnet50 (docs/algorithms.md#resnet50)
# ---------------------------------------------------------------------------------------------

class ResNet50Encoder(BaseEncoder):
    """The "resnet50" encoder: 3-D convs over a k-frame stack of layer3 maps, max-pool, MLP.

    Input (B, T, C, H, W) with C = `in_channels` (1024, 14x14 maps in the pipeline description).
    For output frame r the stack holds frames r-k+1 .. r (the intended window; the reference is
    off by one: docs/reference-bugs.md#resnet50-window-off-by-one). With
    `reference_window=True` it holds r-k .. r-1 as the reference does, which never reads frame r
    and makes frame 0 independent of the input; use it only to reproduce published numbers.
    Frames before 0 (and, defensively, any frame whose mask is False) enter the stack as zero maps.
    In `dense` mode (a GPU) it runs every padded position, unless the caller gives the batch's
    frame counts on the host (`alignprog.runtime.host_lengths`, the trainer's eager step): then
    each video's real frames only, as off the GPU, with no host sync.

    `conv_channels` and `mlp_dim` default to the documented fixed widths (1024, 512) and 512; they
    exist so tests can build a small model. `out_dim` is honoured (the reference always emits
    128: docs/reference-bugs.md#one-embedding-width-everywhere). The last Linear is followed by
    ReLU as in the reference, so embeddings are non-negative.

    The parameters are the documented two `nn.Conv3d` (so checkpoints keep their keys), but the
    forward never runs a 3-D convolution or builds the (n, C, k, H, W) stacks; it computes the same
    sums with 2-D convolutions, exactly up to float rounding (tests/test_resnet50_fast.py):

    * conv1, per frame once: with "same" padding in depth, stack slot s feeds output depth d
      through the kernel's temporal tap j = s - d + 1 (taps outside 0..2 fall on the padding). So
      each frame meets each tap at most once whichever stack it sits in: one Conv2d of every frame
      with the three taps side by side, Y = conv2d(x_t, [W_0; W_1; W_2]) (3*c1 channels), and
      stack r's depth-d map is  b + sum_s Y_{s-d+1}[r + offset_s], a sum of row-shifted channel
      slices of Y. 3 taps per frame instead of the k*k = 4 the stacks need (and the 6 a padded
      Conv3d runs for k = 2).
    * conv2 on the k depth maps of one stack is a Conv2d from k*c1 to k*c2 channels whose weight
      holds tap d_in - d_out + 1 in block (d_out, d_in) (zero outside the kernel).
    * max-pool: ReLU and the per-channel bias commute with a max over (depth, H, W), so the max is
      taken on conv2's raw output and bias + ReLU act on the (n, c2) result; only the arg-max
      indices are kept for backward, not the conv2 output.

    The frames run as rows: per video `halo` zero frames (the frames before 0 that the first
    stacks read), then its frames up to its last real one, so a stack slot is a plain row shift.
    Channels-last layout throughout (what cuDNN's tensor-core kernels read). Rows are processed in
    balanced chunks of at most `chunk_frames` (by default as many as fit `CHUNK_BYTES` of
    temporaries); a chunk recomputes conv1 on the `halo` rows before it. During training the
    activations kept for backward are conv1's input and the stacks, (C + k*c1) * H * W values per
    frame: ~2.4 MB in fp32, ~1.2 MB in bf16 at the default sizes, 33 GB in bf16 (52 GB in fp32)
    peak for two videos of 8192 frames on an H200, the 12 GB input included.
    """

    frame_ndim = 3
    # Temporaries of one chunk (gathered input, Y, the stacks, conv2's output; the same again in
    # backward): 534 frames per chunk at the default sizes in fp32, 1069 in bf16, a few GB next
    # to an 80 GB card. Measured on an H200 (2 videos, 450 + 380 frames): bigger chunks are not
    # slower, and some chunk sizes (256-300 frames) made cuDNN pick a 2.6x slower bf16 kernel
    # for conv2, so the budget is large enough to run such a batch in one chunk.
    CHUNK_BYTES = 4 * 2**30

    def __init__(self, in_channels: int = 1024, temporal_depth: int = 2, out_dim: int = 128,
                 reference_window: bool = False, chunk_frames: int | None = None,
                 conv_channels: Sequence[int] = (1024, 512), mlp_dim: int = 512) -> None:
        super().__init__()
        if in_channels < 1 or out_dim < 1 or mlp_dim < 1:
            raise ValueError(f"in_channels, out_dim and mlp_dim must be >= 1, got "
                             f"{in_channels}, {out_dim}, {mlp_dim}")
        if temporal_depth < 1:
            raise ValueError(f"temporal_depth must be >= 1, got {temporal_depth}")
        if chunk_frames is not None and chunk_frames < 1:
            raise ValueError(f"chunk_frames must be >= 1 (or None: from a memory budget), "
                             f"got {chunk_frames}")
        if len(conv_channels) != 2 or min(conv_channels) < 1:
            raise ValueError(f"conv_channels must be two positive widths, got "
                             f"{tuple(conv_channels)}")
        c1, c2 = (int(c) for c in conv_channels)
        self.in_channels = in_channels
        self.temporal_depth = temporal_depth
        self.out_dim = out_dim
        self.reference_window = reference_window
        self.chunk_frames = chunk_frames
        # The stack sums as Triton kernels on a GPU (`stack_sum_triton`); False: torch ops
        # there too (the tests compare the two). Not a parameter.
        self.fused_stacks = True
        # Run every padded position (True; padding as zero maps, outputs dropped) instead of
        # each video's frames only: the same values with no host sync and shapes fixed by
        # (B, T), for CUDA graphs, at the cost of the padding's FLOPs. Not a parameter.
        self.dense = False
        # Two 3x3x3 convs with "same" padding (padding 1 for kernel 3) and bias.
        # Kept as the documented modules (parameters and state_dict keys); forward uses their
        # weights through 2-D convolutions (class docstring).
        self.conv = nn.Sequential(
            nn.Conv3d(in_channels, c1, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv3d(c1, c2, kernel_size=3, padding=1), nn.ReLU(),
        )
        # 512 -> 512 -> 512 -> D, ReLU after every layer (non-negative embeddings).
        self.mlp = nn.Sequential(
            nn.Linear(c2, mlp_dim), nn.ReLU(),
            nn.Linear(mlp_dim, mlp_dim), nn.ReLU(),
            nn.Linear(mlp_dim, out_dim), nn.ReLU(),
        )

    def window_offsets(self, device: torch.device | None = None) -> torch.Tensor:
        """Frame offsets of the stack relative to the output frame, oldest first: (k,) int64."""
        k = self.temporal_depth
        last = -1 if self.reference_window else 0  # reference ends at r-1, intended at r
        return torch.arange(last - k + 1, last + 1, device=device)  # (k,)

    def conv1_taps(self) -> tuple[int, int]:
        """First and last temporal tap of conv1 that any stack uses: all three for k >= 2; only
        the centre one for k = 1 (a lone slot sees taps 0 and 2 only on the depth padding)."""
        return (0, 2) if self.temporal_depth > 1 else (1, 1)

    def chunk_size(self, height: int, width: int, element_size: int) -> int:
        """Most frames per chunk: `chunk_frames`, or as many as fit `CHUNK_BYTES` of temporaries."""
        if self.chunk_frames is not None:
            return self.chunk_frames
        c1, c2 = self.conv[0].out_channels, self.conv[2].out_channels
        lo, hi = self.conv1_taps()
        k = self.temporal_depth
        # gathered input (+ its autocast copy), Y, stacks (+ their gradient), conv2 output
        per_frame = height * width * element_size * (
            2 * self.in_channels + (hi - lo + 1) * c1 + 2 * k * c1 + k * c2)
        return max(1, self.CHUNK_BYTES // per_frame)

    def _weights(self, dtype: torch.dtype | None):
        """The Conv3d parameters as the 2-D convolutions' weights (channels-last), cast once
        to the autocast `dtype` if given (conv2's bias is added after the max-pool, in forward).

        w1: (J*c1, C, 3, 3), tap block j - lo for taps lo..hi. w2: (k*c2, k*c1, 3, 3), block
        (d_out, e) = conv2 tap j = d_in - d_out + 1 with d_in = k-1-e (zero outside 0..2); the
        stacks' depth blocks run newest first (e = k-1-d), which makes every conv1 term a
        contiguous channel slice of Y (see `forward`)."""
        conv1, conv2 = self.conv[0], self.conv[2]
        k = self.temporal_depth
        lo, hi = self.conv1_taps()
        c1, c2 = conv1.out_channels, conv2.out_channels
        w1 = conv1.weight[:, :, lo:hi + 1]                               # (c1, C, J, 3, 3)
        w1 = w1.permute(2, 0, 3, 4, 1).reshape(-1, 3, 3, self.in_channels)  # (J*c1, 3, 3, C)
        w1 = w1.permute(0, 3, 1, 2)                                      # (J*c1, C, 3, 3) CL
        d_out = torch.arange(k, device=w1.device)
        d_in = k - 1 - torch.arange(k, device=w1.device)                 # depth of block e
        pad = max(0, k - 2)                                              # taps -pad .. 2+pad
        tap = d_in[None, :] - d_out[:, None] + 1 + pad                   # (k, k) [d_out, e]
        w2 = F.pad(conv2.weight, (0, 0, 0, 0, pad, pad))                 # (c2, c1, 3+2pad, 3, 3)
        w2 = w2[:, :, tap]                                               # (c2, c1, k, k, 3, 3)
        w2 = w2.permute(2, 0, 4, 5, 3, 1).reshape(k * c2, 3, 3, k * c1)  # (k*c2, 3, 3, k*c1)
        w2 = w2.permute(0, 3, 1, 2)                                      # (k*c2, k*c1, 3, 3) CL
        b1 = conv1.bias.repeat(k)                                        # (k*c1,) per block
        if dtype is not None:
            w1, w2, b1 = (p.to(dtype) for p in (w1, w2, b1))
        return w1, b1, w2

    def _stack_terms(self) -> list[tuple[int, int, int, int]]:
        """How conv1's per-frame taps Y sum into the stacks: one (row, y_channel, h_channel,
        width) per stack slot s. Slot s (frame r + o_s) feeds stack block e (depth d = k-1-e)
        through tap j = e + s - k + 2, so it adds Y's channels [y_channel, +width) of the frame
        `row` = halo + o_s rows up into the stack's channels [h_channel, +width)."""
        k = self.temporal_depth
        c1 = self.conv[0].out_channels
        lo, hi = self.conv1_taps()
        offsets = self.window_offsets().tolist()
        halo = -min(offsets)
        terms = []
        for s, o in enumerate(offsets):
            e_lo, e_hi = max(0, lo - s + k - 2), min(k - 1, hi - s + k - 2)
            if e_lo <= e_hi:
                j_lo = e_lo + s - k + 2 - lo                     # Y's tap block of e_lo
                terms.append((halo + o, j_lo * c1, e_lo * c1, (e_hi - e_lo + 1) * c1))
        return terms

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self._check(x, mask)
        if x.shape[2] != self.in_channels:
            raise ValueError(f"resnet50 encoder expects {self.in_channels} input channels, "
                             f"got x of shape {tuple(x.shape)}")
        batch, frames, _, height, width = x.shape
        k = self.temporal_depth
        halo = -min(self.window_offsets().tolist())                       # frames read before r
        # Rows to run through conv1: for each video, `halo` zero frames (frames before 0
        # are zero maps), then every frame up to its last real one. A video's frames
        # are then consecutive rows and the frame at offset o of row i is row i + o, always: the
        # stacks are plain row shifts, with no test for the start of a video. Hole frames (mask
        # False inside a video; never made by the batcher) run as zero maps and their outputs
        # are dropped; padding after a video's last real frame is never read.
        col = torch.arange(frames + halo, device=mask.device)            # (T + halo,)
        known = known_lengths() if self.dense else None
        if known is not None and known.shape == (batch,):
            # the host knows each video's frames (runtime.host_lengths): its real rows only,
            # indices made on the host, so no padding computed and no host sync
            length = known.to("cpu", torch.long).clamp(0, frames)         # (B,) on the host
            pin = mask.is_cuda   # page-locked: an asynchronous copy that never waits
            b_row, c_row = ((i.pin_memory() if pin else i).to(mask.device, non_blocking=True)
                            for i in _video_rows(length, frames, halo))   # (R,), (R,)
        elif self.dense:  # every position: no data-dependent shape, no host sync
            b_row = torch.arange(batch, device=mask.device).repeat_interleave(frames + halo)
            c_row = col.repeat(batch)                                     # (R,) = (B*(T+halo),)
        else:
            length = (mask * (col[None, :frames] + 1)).amax(dim=1) if frames else \
                col.new_zeros(batch)                                      # (B,) last real + 1
            b_row, c_row = _video_rows(length, frames, halo)              # (R,), (R,)
        t_row = (c_row - halo).clamp(min=0)                               # (R,) frame (0 on zeros)
        real = (c_row >= halo) & mask[b_row, t_row]                       # (R,) real frames
        src = b_row * frames + t_row                                      # (R,) row in (B*T)
        x_cl = x.permute(0, 1, 3, 4, 2).flatten(0, 1)                    # (B*T, H, W, C) view
        amp = torch.is_autocast_enabled(x.device.type)
        w1, b1, w2 = self._weights(torch.get_autocast_dtype(x.device.type) if amp else None)
        if amp and x.dtype != w1.dtype:
            # cast once, in the layout the convolutions read (one pass over x, where the gather,
            # zeroing and autocast's cast of every chunk would each be one): the same values
            x_cl = torch.empty(x_cl.shape, dtype=w1.dtype, device=x.device).copy_(x_cl)
        elem = torch.finfo(w1.dtype if amp else x.dtype).bits // 8
        terms = self._stack_terms()
        rows = b_row.numel()
        # balanced chunks (no small last chunk: small GEMMs run far below the card's rate)
        limit = self.chunk_size(height, width, elem)
        chunks = -(-max(rows - halo, 0) // limit)
        step = -(-(rows - halo) // chunks) if chunks else 1
        embs = []
        for start in range(halo, rows, step):  # stacks of rows start..stop-1 (none for row < halo)
            stop = min(start + step, rows)
            xs = x_cl.index_select(0, src[start - halo:stop])             # (n+halo, H, W, C)
            xs.masked_fill_(~real[start - halo:stop, None, None, None], 0.0)  # zero frames
            y = F.conv2d(xs.permute(0, 3, 1, 2), w1, padding=1)           # (n+halo, J*c1, H, W)
            h = _StackSum.apply(y, b1, terms, stop - start, self.fused_stacks)  # (n, k*c1, H, W)
            z = F.conv2d(h, w2, padding=1)                                 # (n, k*c2, H, W)
            # Global max over (depth, H, W); channels-last puts depth next to c2
            z = z.permute(0, 2, 3, 1).reshape(stop - start, -1, w2.shape[0] // k)  # (n, HWk, c2)
            # conv2's bias after the max (exact: rounding is monotonic), added in its own dtype
            feat = torch.relu(z.max(dim=1).values + self.conv[2].bias)    # (n, c2)
            embs.append(self.mlp(feat))                                   # (n, D)
        if embs:
            emb = torch.cat(embs, dim=0)                                  # (R - halo, D)
        else:  # no real frame at all: keep the output dtype that a forward would produce
            emb = self.mlp(x.new_zeros((0, self.mlp[0].in_features)))   # (0, D)
        emb = torch.where(real[halo:, None], emb, 0.0)                    # zero/hole rows -> 0
        # Scatter into (B, halo + T, D): each row has its own slot (zero frames in the first
        # `halo` columns), so no sync to select the real rows and no duplicate indices.
        out = emb.new_zeros((batch, frames + halo, emb.shape[-1]))       # (B, halo+T, D)
        out = out.index_put((b_row[halo:], c_row[halo:]), emb)
        return out[:, halo:].contiguous()                                 # (B, T, D)


def _video_rows(length: torch.Tensor, frames: int, halo: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(video, column) of each row conv1 runs, on `length`'s device: per video of `length`
    frames (B,), its `halo` zero frames and its frames (none for an empty video); column c is
    frame c - halo."""
    col = torch.arange(frames + halo, device=length.device)               # (T + halo,)
    grid = (col[None, :] < (length + halo)[:, None]) & (length > 0)[:, None]  # (B, T + halo)
    return grid.nonzero(as_tuple=True)                                    # (R,), (R,)


class _StackSum(torch.autograd.Function):
    """relu(b1 + the k row-shifted channel slices of conv1's per-frame taps Y): conv1's output
    on every stack of a chunk (see ResNet50Encoder). Written out so that backward builds dY in
    one buffer; autograd's slice backward would allocate and fill a full dY per slice. With
    `fused` on a GPU both directions are one Triton kernel each (`stack_sum_triton`)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, bias: torch.Tensor, terms: list[tuple[int, int, int, int]],
                n: int, fused: bool = False) -> torch.Tensor:
        # y: (n + halo, J*c1, H, W), bias: (k*c1,) -> h: (n, k*c1, H, W)
        ctx.terms, ctx.y_shape = terms, y.shape
        ctx.kernels = None
        if fused and y.is_cuda:
            from alignprog.models import stack_sum_triton
            if stack_sum_triton.available(y):
                ctx.kernels = stack_sum_triton
                h = stack_sum_triton.stack_sum_forward(y, bias, terms, n)
                ctx.save_for_backward(h)
                return h
        kc = bias.numel()
        b = bias.view(1, kc, 1, 1)                                        # (1, k*c1, 1, 1)
        row, y_lo, h_lo, w = terms[0]
        if w == kc:  # the first slot covers every block (all k >= 2 windows): start from it
            h = y[row:row + n, y_lo:y_lo + w] + b                         # (n, k*c1, H, W)
            rest = terms[1:]
        else:
            h = b.expand(n, kc, *y.shape[2:]).clone(memory_format=torch.channels_last)
            rest = terms
        for row, y_lo, h_lo, w in rest:
            h[:, h_lo:h_lo + w] += y[row:row + n, y_lo:y_lo + w]
        h = h.relu_()
        ctx.save_for_backward(h)
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        (h,) = ctx.saved_tensors
        n = h.shape[0]
        g = torch.ops.aten.threshold_backward(grad, h, 0)                 # (n, k*c1, H, W) relu'
        gb = g.sum(dim=(0, 2, 3)) if ctx.needs_input_grad[1] else None    # (k*c1,)
        gy = None
        if ctx.needs_input_grad[0] and ctx.kernels is not None:
            gy = ctx.kernels.stack_sum_backward(g, ctx.terms, ctx.y_shape)
        elif ctx.needs_input_grad[0]:
            gy = torch.empty(ctx.y_shape, dtype=g.dtype, device=g.device,
                             memory_format=torch.channels_last).zero_()  # (n+halo, J*c1, H, W)
            for row, y_lo, h_lo, w in ctx.terms:
                gy[row:row + n, y_lo:y_lo + w] += g[:, h_lo:h_lo + w]
        return gy, gb, None, None, None


# ---------------------------------------------------------------------------------------------
# temporal_stacking (docs/algorithms.md#stacking)
# ---------------------------------------------------------------------------------------------

def stacking_schedule(in_dim: int, channels: int, out_dim: int, temporal_depth: int,
                      num_layers: int) -> list[tuple[int, int, int]]:
    """(in, out, kernel) of each stacking Conv1d; defaults: 2048->256 (k=2), 256->128, 5 x 128->128.

    Widths: channels, channels/2, ... while >= out_dim, then out_dim repeated until `num_layers`
    convs. `num_layers` is a minimum: a long halving chain is kept whole.
    """
    if in_dim < 1 or temporal_depth < 1 or num_layers < 1:
        raise ValueError(f"in_dim, temporal_depth and num_layers must be >= 1, got "
                         f"{in_dim}, {temporal_depth}, {num_layers}")
    if not 1 <= out_dim < channels:
        raise ValueError(f"temporal_stacking needs 1 <= out_dim < channels, got "
                         f"out_dim={out_dim}, channels={channels}")
    widths = [channels]
    while widths[-1] % 2 == 0 and widths[-1] // 2 >= out_dim:
        widths.append(widths[-1] // 2)
    if widths[-1] != out_dim:
        # The halving list only ends at out_dim when channels = out_dim * 2^j.
        raise ValueError(f"temporal_stacking: halving channels={channels} never reaches "
                         f"out_dim={out_dim}; channels must be out_dim times a power of two")
    widths += [out_dim] * max(0, num_layers - len(widths))
    ins = [in_dim] + widths[:-1]
    kernels = [temporal_depth] + [3] * (len(widths) - 1)
    return list(zip(ins, widths, kernels))


class StackingEncoder(BaseEncoder):
    """The "temporal_stacking" encoder: bias-free Conv1d layers over time on (B, T, in_dim).

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
            nn.Conv1d(ci, co, kernel_size=k, stride=1, padding=0, bias=False)  # no bias
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
            if i < len(self.convs) - 1:                      # no ReLU after the last conv
                h = torch.relu(h)
        h = torch.where(keep, h, 0.0)                        # (B, D, T) padded outputs are 0
        return h.transpose(1, 2)                             # (B, T, D)


# ---------------------------------------------------------------------------------------------
# naive (docs/algorithms.md#naive)
# ---------------------------------------------------------------------------------------------

class NaiveEncoder(BaseEncoder):
    """The "naive" encoder, the intended per-frame MLP built from `layers`.

    The reference builds it from the drop-branch widths and crashes
    (docs/reference-bugs.md#naive-encoder-built-from-drop-layers).

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
        # Every padded position (True; padding as zero frames, outputs zeroed) instead of the
        # real frames only: the same values, no host sync, shapes fixed by (B, T), at the cost
        # of the padding's work. Not a parameter.
        self.dense = False

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        self._check(x, mask)
        if x.shape[2] != self.in_dim:
            raise ValueError(f"naive encoder expects {self.in_dim} input features, got x of "
                             f"shape {tuple(x.shape)}")
        if self.dense:
            # zero padded inputs first: NaN there would reach the weight gradients (NaN * 0)
            x = torch.where(mask[..., None], x, 0.0)                # (B, T, F)
            return torch.where(mask[..., None], self.mlp(x), 0.0)   # (B, T, D)
        batch, frames = mask.shape
        b_idx, t_idx = mask.nonzero(as_tuple=True)     # (N,), (N,)
        emb = self.mlp(x[b_idx, t_idx])                 # (N, F) -> (N, D)
        return _scatter_frames(emb, b_idx, t_idx, batch, frames)  # (B, T, D)


# ---------------------------------------------------------------------------------------------
# Variants by name
# ---------------------------------------------------------------------------------------------

ENCODERS: dict[str, type[BaseEncoder]] = {
    "resnet50": ResNet50Encoder,
    "stacking": StackingEncoder,   # the config reads the reference's temporal_stacking as this
    "naive": NaiveEncoder,
}


def build_encoder(name: str, **kwargs) -> BaseEncoder:
    """The encoder registered under `name`, built with `kwargs` (constructor arguments)."""
    try:
        cls = ENCODERS[name]
    except KeyError:
        raise ValueError(f"unknown encoder {name!r}; valid names: "
                         f"{', '.join(sorted(ENCODERS))}") from None
    return cls(**kwargs)
