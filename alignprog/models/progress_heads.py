"""Learnable progress heads: aligned segment embeddings -> progress in [0, 1].

See docs/algorithms.md#progress-heads. The four heads share one module (longer than most)
because they share the input contract, the position features and the online protocol below.

Every head takes MANY segments at once as one left-aligned, zero-padded tensor
``x (N, L, D)`` with ``lengths (N,)`` (segment i is ``x[i, :lengths[i]]``) and returns the
progress at each segment's last real frame ``(N,)``, or with ``dense=True`` the output at every
position ``(N, L)`` (0 beyond the length). Padding content never reaches an output: it is zeroed
before use and every mixing op is causal or masked.

Position feature (``position``), appended to every frame as [s_tau; feature]
(docs/algorithms.md#position-features):
  * ``"relative"``: the pipeline description's default p_tau = tau / T, T the segment length.
    It depends on the whole prefix, so online use must re-run the prefix and the dense output
    differs from the per-prefix outputs
    (docs/reference-bugs.md#dense-output-differs-from-prefix-output).
  * ``"count"``: a causal frame count log(2 + tau) / log(1 + frame_count_max). At the last frame
    of a prefix of length T = tau + 1 it equals the fork's frame-count feature
    log(1+T)/log(1+max) (its "use_frame_count"), but it depends only on tau, so one dense pass
    gives every prefix's output and the heads stream frame by frame.
  * ``"none"``: no extra feature.

Online use: ``state = head.init_state(n)``, then ``p, state = head.step(x_t, state)`` per frame.
``head.streamable`` is True when step() is incremental (O(1) per frame in the prefix length, or an
attention over the KV cache for the transformer); otherwise step() re-runs forward() on the stored
prefix (O(T) per frame). In eval mode both give forward()'s per-prefix values
(docs/algorithms.md#online-protocol).

The GRU runs all N segments through one nn.GRU call over the padded batch (causal, so padding
after a segment never reaches it); see GRUProgressHead for why that beats packing here.
`hidden_dim` is every head's width (GRU hidden, mean first layer, transformer d_model, conv
channels). No config import here (the models do not depend on the config layer):
`build_progress_head` takes plain keyword arguments.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from alignprog.runtime import checks_values

POSITIONS = ("relative", "count", "none")


# --------------------------------------------------------------------------------------------
# Shared helpers


def _check_inputs(x: torch.Tensor, lengths: torch.Tensor, in_dim: int) -> None:
    """Clear errors for the (N, L, D) + lengths contract instead of a deep RNN/shape error."""
    if x.dim() != 3:
        raise ValueError(f"progress head input must be (N, L, D), got shape {tuple(x.shape)}")
    if x.shape[-1] != in_dim:
        raise ValueError(f"progress head expects feature dim {in_dim}, got {x.shape[-1]}")
    if not isinstance(lengths, torch.Tensor) or lengths.shape != (x.shape[0],):
        got = tuple(lengths.shape) if isinstance(lengths, torch.Tensor) else type(lengths).__name__
        raise ValueError(f"lengths must be a tensor of shape ({x.shape[0]},), got {got}")
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must be an integer tensor, got {lengths.dtype}")
    if lengths.numel() and checks_values(lengths):
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 1 or hi > x.shape[1]:
            raise ValueError(f"lengths must lie in [1, L={x.shape[1]}], got min {lo}, max {hi}")


def _feature_dtype(dtype: torch.dtype) -> torch.dtype:
    # Position features are computed in at least float32 (tau/T and the log count lose digits in
    # half precision past a few thousand frames) and cast to the input dtype afterwards.
    return torch.promote_types(dtype, torch.float32)


def _count_feature(tau: torch.Tensor, frame_count_max: int) -> torch.Tensor:
    """log(2 + tau) / log(1 + max): the fork's frame count log(1+T)/log(1+max), T = tau + 1."""
    return torch.log(tau + 2.0) / math.log(1.0 + frame_count_max)


def _readout(width: int, bias_init: float | None) -> nn.Sequential:
    """Readout MLP width -> 32 -> ReLU -> 1 of every head; sigmoid applied by the caller."""
    mlp = nn.Sequential(nn.Linear(width, 32), nn.ReLU(), nn.Linear(32, 1))
    if bias_init is not None:
        # The fork starts the last bias at -2 so the initial output is sigmoid(-2) ~ 0.12
        # (docs/reference-bugs.md#weighted-l1-favours-low-predictions).
        nn.init.constant_(mlp[-1].bias, bias_init)
    return mlp


def _first_param(module: nn.Module) -> torch.Tensor:
    return next(module.parameters())


@dataclass
class PrefixState:
    """Fallback state of a non-streamable head: the frames seen so far, (n, t, D) (None at t=0)."""

    frames: torch.Tensor | None


class ProgressHead(nn.Module):
    """Base class: input validation, masking, the position feature and the prefix fallback."""

    has_dense = True  # False for heads without a per-position output (the mean head)

    def __init__(self, in_dim: int, position: str, frame_count_max: int) -> None:
        super().__init__()
        if position not in POSITIONS:
            raise ValueError(f"unknown progress position feature '{position}'; "
                             f"choose one of {', '.join(POSITIONS)}")
        if in_dim < 1:
            raise ValueError(f"progress head in_dim must be >= 1, got {in_dim}")
        if frame_count_max < 1:
            raise ValueError(f"frame_count_max must be >= 1, got {frame_count_max}")
        self.in_dim = in_dim
        self.position = position
        self.frame_count_max = frame_count_max
        self.num_extra = 0 if position == "none" else 1  # D' = D + num_extra

    # -- subclasses override these --------------------------------------------------------------

    @property
    def streamable(self) -> bool:
        # tau/T changes every earlier row when T grows, so only causal features stream (3.5).
        return self.position != "relative"

    def _forward(self, x: torch.Tensor, lengths: torch.Tensor, mask: torch.Tensor,
                 dense: bool) -> torch.Tensor:
        raise NotImplementedError

    # -- public API -----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, *, dense: bool = False
                ) -> torch.Tensor:
        """x (N, L, D) left-aligned zero-padded segments, lengths (N,) int in [1, L].

        Returns (N,) progress at each last real frame, or (N, L) with dense=True (0 beyond length).
        """
        if dense and not self.has_dense:
            raise ValueError(f"the {type(self).__name__} has no dense output; "
                             "use arch 'gru', 'transformer' or 'dilated_conv'")
        _check_inputs(x, lengths, self.in_dim)
        lengths = lengths.to(device=x.device, dtype=torch.long)
        n, t_max, _ = x.shape
        if n == 0:
            return x.new_zeros((0, t_max) if dense else (0,))
        mask = torch.arange(t_max, device=x.device)[None, :] < lengths[:, None]  # (N, L)
        return self._forward(x, lengths, mask, dense)

    def init_state(self, n: int, *, device=None, dtype=None):
        """State for n segments that start now (all advance together, one frame per step)."""
        return PrefixState(frames=None)

    def step(self, x_t: torch.Tensor, state) -> tuple[torch.Tensor, object]:
        """x_t (n, D), the next frame of n running segments -> (progress (n,), new state).

        This fallback re-runs forward() on the whole stored prefix (O(T) per frame): the only exact
        option when the position feature depends on T (docs/algorithms.md#online-protocol).
        Streamable heads override it.
        """
        frames = (x_t[:, None] if state.frames is None
                  else torch.cat([state.frames, x_t[:, None]], 1))
        n, t, _ = frames.shape                                                    # (n, t, D)
        lengths = torch.full((n,), t, dtype=torch.long, device=x_t.device)
        return self.forward(frames, lengths), PrefixState(frames=frames)

    # -- helpers --------------------------------------------------------------------------------

    def _state_like(self, device, dtype) -> tuple[torch.device, torch.dtype]:
        p = _first_param(self)
        return (p.device if device is None else torch.device(device),
                p.dtype if dtype is None else dtype)

    def _inputs(self, x: torch.Tensor, lengths: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[s_tau; feature] per frame, exactly 0 on padding: (N, L, D')."""
        keep = mask[..., None]                                                    # (N, L, 1)
        # masked_fill, not multiplication: padding holding inf/NaN must not leak (0 * inf = NaN).
        x = x.masked_fill(~keep, 0)
        if self.position == "none":
            return x
        n, t_max, _ = x.shape
        fdt = _feature_dtype(x.dtype)
        tau = torch.arange(t_max, device=x.device, dtype=fdt)                     # (L,)
        if self.position == "relative":
            feat = tau[None, :] / lengths[:, None].to(fdt)                        # (N, L)
        else:
            feat = _count_feature(tau, self.frame_count_max)[None, :].expand(n, t_max)  # (N, L)
        feat = feat.to(x.dtype)[..., None].masked_fill(~keep, 0)                  # (N, L, 1)
        return torch.cat([x, feat], dim=-1)                                       # (N, L, D+1)

    def _step_inputs(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """[x_t; feature at tau = t] for a causal feature: (n, D')."""
        if self.position == "none":
            return x_t
        if self.position == "relative":
            raise RuntimeError("position='relative' has no per-frame feature (it depends on T)")
        tau = torch.full((x_t.shape[0],), float(t), device=x_t.device,
                         dtype=_feature_dtype(x_t.dtype))
        feat = _count_feature(tau, self.frame_count_max).to(x_t.dtype)           # (n,)
        return torch.cat([x_t, feat[:, None]], dim=-1)                            # (n, D+1)


def _last(h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Row lengths[i]-1 of each segment: (N, L, C) -> (N, C)."""
    idx = (lengths - 1)[:, None, None].expand(-1, 1, h.shape[-1])                 # (N, 1, C)
    return h.gather(1, idx)[:, 0]                                                 # (N, C)


# --------------------------------------------------------------------------------------------
# GRU head, the default (docs/algorithms.md#gru-head)


@dataclass
class GRUState:
    h: torch.Tensor  # (1, n, H) hidden state after the frames seen so far
    t: int           # frames seen so far


class GRUProgressHead(ProgressHead):
    """GRU(D' -> hidden) with learnable h0 (1, 1, hidden) = 0, MLP hidden->32->1, sigmoid.

    All N segments go through ONE GRU call, never a Python loop over segments. By default that call
    runs over the zero-padded (N, L) batch and reads each segment's state at frame len-1: the GRU is
    causal, so the padding after a segment cannot reach it. ``packed=True`` instead packs the batch
    (pack_padded_sequence, enforce_sorted=False) so padded frames are not computed at all; it gives
    the same values and saves memory on very uneven lengths, but PyTorch's CPU backward of a packed
    GRU is quadratic in L (one full-size zero tensor per time step: ~10x slower at L = 200).
    """

    def __init__(self, in_dim: int = 128, hidden_dim: int = 64, *, position: str = "relative",
                 learnable_h0: bool = True, frame_count_max: int = 300,
                 out_bias_init: float | None = None, packed: bool = False) -> None:
        super().__init__(in_dim, position, frame_count_max)
        self.hidden_dim = hidden_dim
        self.packed = packed
        # One layer, unidirectional, PyTorch default init.
        self.gru = nn.GRU(in_dim + self.num_extra, hidden_dim, num_layers=1, batch_first=True)
        # As in the pipeline description, h0 is a learnable (1, 1, 64) parameter, zero-initialised.
        self.h0 = nn.Parameter(torch.zeros(1, 1, hidden_dim)) if learnable_h0 else None
        # The pipeline description and the fork's early snapshot keep PyTorch's default output
        # bias (docs/algorithms.md#gru-head).
        self.mlp = _readout(hidden_dim, out_bias_init)

    def _h0(self, n: int, like: torch.Tensor) -> torch.Tensor | None:
        if self.h0 is None:
            return None  # the GRU starts from zeros
        # contiguous(): cuDNN rejects an expanded (stride-0) hx.
        return self.h0.to(like.dtype).expand(1, n, self.hidden_dim).contiguous()  # (1, n, H)

    def _forward(self, x, lengths, mask, dense):
        n, t_max, _ = x.shape
        feats = self._inputs(x, lengths, mask)                                    # (N, L, D')
        h0 = self._h0(n, feats)
        if self.packed:
            # The packing lengths must live on the CPU (a host sync on CUDA, once per call).
            packed = pack_padded_sequence(feats, lengths.cpu(), batch_first=True,
                                          enforce_sorted=False)
            out, h_n = self.gru(packed, h0)                                       # h_n (1, N, H)
            if not dense:
                # h_n is the state after each segment's last real frame, in input order.
                return torch.sigmoid(self.mlp(h_n[0])).squeeze(-1)               # (N,)
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=t_max)  # (N, L, H)
        else:
            out, _ = self.gru(feats, h0)                                          # (N, L, H)
            if not dense:
                return torch.sigmoid(self.mlp(_last(out, lengths))).squeeze(-1)  # (N,)
        y = torch.sigmoid(self.mlp(out)).squeeze(-1)                              # (N, L)
        return y.masked_fill(~mask, 0)

    def init_state(self, n, *, device=None, dtype=None):
        if not self.streamable:
            return super().init_state(n, device=device, dtype=dtype)
        device, dtype = self._state_like(device, dtype)
        if self.h0 is None:
            h = torch.zeros(1, n, self.hidden_dim, device=device, dtype=dtype)    # (1, n, H)
        else:
            h = self.h0.to(device=device, dtype=dtype).expand(1, n, self.hidden_dim).contiguous()
        return GRUState(h=h, t=0)

    def step(self, x_t, state):
        if not self.streamable:
            return super().step(x_t, state)
        inp = self._step_inputs(x_t, state.t)[:, None]                            # (n, 1, D')
        _, h = self.gru(inp, state.h.to(inp.dtype))                               # (1, n, H)
        y = torch.sigmoid(self.mlp(h[0])).squeeze(-1)                             # (n,)
        return y, GRUState(h=h, t=state.t + 1)


# --------------------------------------------------------------------------------------------
# Mean-pool head, use_gru=False (docs/algorithms.md#mean-head)


@dataclass
class MeanState:
    sum_x: torch.Tensor             # (n, D) running sum of the frames
    sum_feat: torch.Tensor | None   # (n, 1) running sum of the count feature
    t: int


class MeanPoolProgressHead(ProgressHead):
    """Mean over real frames of [s; feature], MLP D'->hidden->ReLU->32->ReLU->1, sigmoid.

    No dense output. It streams for every position option: the mean of tau/T over a
    prefix of length T is (T-1)/(2T) in closed form, so running sums suffice.
    """

    def __init__(self, in_dim: int = 128, hidden_dim: int = 64, *, position: str = "relative",
                 frame_count_max: int = 300, out_bias_init: float | None = None) -> None:
        super().__init__(in_dim, position, frame_count_max)
        self.mlp = nn.Sequential(nn.Linear(in_dim + self.num_extra, hidden_dim), nn.ReLU(),
                                 _readout(hidden_dim, out_bias_init))

    @property
    def streamable(self) -> bool:
        return True

    has_dense = False

    def _forward(self, x, lengths, mask, dense):
        feats = self._inputs(x, lengths, mask)                       # (N, L, D'), 0 on pad
        pooled = feats.sum(1) / lengths[:, None].to(feats.dtype)                  # (N, D')
        return torch.sigmoid(self.mlp(pooled)).squeeze(-1)                        # (N,)

    def init_state(self, n, *, device=None, dtype=None):
        device, dtype = self._state_like(device, dtype)
        sum_feat = (None if self.position != "count"
                    else torch.zeros(n, 1, device=device, dtype=dtype))
        return MeanState(sum_x=torch.zeros(n, self.in_dim, device=device, dtype=dtype),
                         sum_feat=sum_feat, t=0)

    def step(self, x_t, state):
        t = state.t + 1                                                           # prefix length T
        sum_x = state.sum_x.to(x_t.dtype) + x_t                                   # (n, D)
        parts = [sum_x / t]
        sum_feat = state.sum_feat
        if self.position == "count":
            sum_feat = sum_feat.to(x_t.dtype) + self._step_inputs(x_t, state.t)[:, -1:]  # (n, 1)
            parts.append(sum_feat / t)
        elif self.position == "relative":
            # mean_{tau<T} tau/T = (T-1)/(2T), the pooled position of the fork's early snapshot.
            parts.append(x_t.new_full((x_t.shape[0], 1), (t - 1) / (2 * t)))
        pooled = torch.cat(parts, dim=-1)                                         # (n, D')
        y = torch.sigmoid(self.mlp(pooled)).squeeze(-1)                           # (n,)
        return y, MeanState(sum_x=sum_x, sum_feat=sum_feat, t=t)


# --------------------------------------------------------------------------------------------
# Transformer head with ALiBi (docs/algorithms.md#transformer-head)


@dataclass
class KVCacheState:
    cache: list[tuple[torch.Tensor, torch.Tensor] | None]  # per block (K, V): (n, heads, t, dh)
    t: int


class _AlibiBlock(nn.Module):
    """One pre-norm block of the transformer head (attention with an additive ALiBi/causal bias)."""

    def __init__(self, d_model: int, num_heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.ln1 = nn.LayerNorm(d_model)
        # Q, K, V and W_o are separate Linear(64, 64) with bias.
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.o = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, ffn_dim), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(ffn_dim, d_model))
        self.attn_dropout = dropout
        self.drop = nn.Dropout(dropout)

    def _heads(self, z: torch.Tensor) -> torch.Tensor:
        n, t, c = z.shape
        return z.view(n, t, self.num_heads, c // self.num_heads).transpose(1, 2)  # (n, h, t, dh)

    def forward(self, x: torch.Tensor, bias: torch.Tensor,
                past: tuple[torch.Tensor, torch.Tensor] | None = None):
        """x (n, t, C); bias (h, t, t_past + t) added to the scores; past K/V (n, h, t_past, dh)."""
        n, t, c = x.shape
        a = self.ln1(x)
        q, k, v = self._heads(self.q(a)), self._heads(self.k(a)), self._heads(self.v(a))
        if past is not None:
            k = torch.cat([past[0].to(k.dtype), k], dim=2)           # (n, h, t_past+t, dh)
            v = torch.cat([past[1].to(v.dtype), v], dim=2)
        # SDPA scales by 1/sqrt(dh) = 1/4 for dh = 16, the documented q.k/4; the bias carries
        # the ALiBi term and the causal -inf. Cast: SDPA needs the mask in q's dtype.
        att = F.scaled_dot_product_attention(
            q, k, v, attn_mask=bias.to(q.dtype),
            dropout_p=self.attn_dropout if self.training else 0.0)                # (n, h, t, dh)
        att = att.transpose(1, 2).reshape(n, t, c)                                # (n, t, C)
        x = x + self.drop(self.o(att))
        x = x + self.drop(self.ffn(self.ln2(x)))
        return x, (k, v)


class _HiddenReadoutHead(ProgressHead):
    """Heads computing per-position hidden states (`_hidden`) read out by one MLP + sigmoid."""

    def _forward(self, x, lengths, mask, dense):
        h = self._hidden(x, lengths, mask)                                        # (N, L, C)
        if not dense:
            return torch.sigmoid(self.mlp(_last(h, lengths))).squeeze(-1)         # (N,)
        y = torch.sigmoid(self.mlp(h)).squeeze(-1)                                # (N, L)
        return y.masked_fill(~mask, 0)


class TransformerProgressHead(_HiddenReadoutHead):
    """Linear(D'->64)+LN, 2 pre-norm causal ALiBi blocks (4 heads, FFN 128 GELU,
    dropout 0.1), no final LN, readout MLP 64->32->1 with bias init -2, sigmoid.

    The fork skips the blocks when T = 1 (docs/reference-bugs.md#short-prefix-skips-blocks), so
    its 1-frame output is a different function from the dense output at position 0 and from what
    every longer prefix's first row goes through. Here the blocks always run: with the causal
    mask a 1-frame segment attends only to itself (softmax weight exactly 1), which is well
    defined, so per-prefix == dense holds for T = 1 too.
    Streaming keeps a per-block KV cache: each new frame costs one attention over the cache.
    """

    def __init__(self, in_dim: int = 128, d_model: int = 64, *, position: str = "relative",
                 frame_count_max: int = 300, num_heads: int = 4, num_layers: int = 2,
                 ffn_dim: int = 128, dropout: float = 0.1,
                 out_bias_init: float | None = -2.0) -> None:
        super().__init__(in_dim, position, frame_count_max)
        if d_model % num_heads:
            raise ValueError(f"transformer d_model ({d_model}) must be divisible by num_heads "
                             f"({num_heads})")
        self.in_proj = nn.Linear(in_dim + self.num_extra, d_model)
        self.in_norm = nn.LayerNorm(d_model)
        self.blocks = nn.ModuleList(_AlibiBlock(d_model, num_heads, ffn_dim, dropout)
                                    for _ in range(num_layers))
        self.mlp = _readout(d_model, out_bias_init)
        # Slopes m_h = 2^-h, h = 0..heads-1 -> (1, .5, .25, .125); not the standard
        # ALiBi 2^(-8(h+1)/heads). Not persistent: a constant of the architecture, not a weight.
        slopes = torch.tensor([2.0 ** -h for h in range(num_heads)])
        self.register_buffer("alibi_slopes", slopes, persistent=False)

    def _bias(self, t_q: int, t_k: int, like: torch.Tensor) -> torch.Tensor:
        """score bias -m_h (i - j), -inf for j > i; queries are the last t_q of t_k frames."""
        i = torch.arange(t_k - t_q, t_k, device=like.device)[:, None]            # (t_q, 1)
        j = torch.arange(t_k, device=like.device)[None, :]                        # (1, t_k)
        dist = (i - j).to(_feature_dtype(like.dtype))                             # (t_q, t_k)
        bias = -self.alibi_slopes.to(dist.dtype)[:, None, None] * dist            # (h, t_q, t_k)
        return bias.masked_fill(dist < 0, float("-inf"))

    def _hidden(self, x, lengths, mask) -> torch.Tensor:
        h = self.in_norm(self.in_proj(self._inputs(x, lengths, mask)))           # (N, L, C)
        t_max = h.shape[1]
        # The causal mask alone keeps padding out: real queries i < len only see keys j <= i.
        bias = self._bias(t_max, t_max, h)                                        # (h, L, L)
        for block in self.blocks:
            h, _ = block(h, bias)
        return h

    def init_state(self, n, *, device=None, dtype=None):
        if not self.streamable:
            return super().init_state(n, device=device, dtype=dtype)
        return KVCacheState(cache=[None] * len(self.blocks), t=0)

    def step(self, x_t, state):
        if not self.streamable:
            return super().step(x_t, state)
        h = self.in_norm(self.in_proj(self._step_inputs(x_t, state.t)))[:, None]  # (n, 1, C)
        bias = self._bias(1, state.t + 1, h)                                      # (h, 1, t+1)
        cache = []
        for block, past in zip(self.blocks, state.cache):
            h, kv = block(h, bias, past)
            cache.append(kv)
        y = torch.sigmoid(self.mlp(h[:, 0])).squeeze(-1)                          # (n,)
        return y, KVCacheState(cache=cache, t=state.t + 1)


# --------------------------------------------------------------------------------------------
# Dilated causal conv head (docs/algorithms.md#dilated-conv-head)


@dataclass
class ConvState:
    buffers: list[torch.Tensor]  # per block: (n, C, (k-1) d) ring buffer of past block inputs
    t: int


class _DilatedBlock(nn.Module):
    """y = x + Dropout(Conv1x1(ReLU(Norm(CausalConv_d(x))))), on (N, L, C)."""

    def __init__(self, channels: int, dilation: int, kernel_size: int, dropout: float,
                 norm: str) -> None:
        super().__init__()
        self.dilation = dilation
        self.kernel_size = kernel_size
        self.span = (kernel_size - 1) * dilation  # left zero padding / ring-buffer length
        self.conv = nn.Conv1d(channels, channels, kernel_size, dilation=dilation)
        # Per-frame LayerNorm over channels instead of the fork's BatchNorm1d: BN's train-mode
        # statistics pool over the whole sequence (future frames leak into dense training) and
        # differ between train and eval. A per-frame norm is causal and identical in both modes
        # (docs/reference-bugs.md#dilated-head-batchnorm-not-causal).
        self.norm = nn.LayerNorm(channels) if norm == "layer" else nn.Identity()
        self.proj = nn.Linear(channels, channels)  # the 1x1 conv, as a per-frame Linear
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.pad(x.transpose(1, 2), (self.span, 0))                              # (N, C, span+L)
        c = self.conv(z).transpose(1, 2)                                          # (N, L, C)
        return x + self.drop(self.proj(torch.relu(self.norm(c))))

    def step(self, x_t: torch.Tensor, buf: torch.Tensor, t: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t (n, C) the block input at frame t; buf holds inputs t-span .. t-1 at slot
        tau % span."""
        d, k, span = self.dilation, self.kernel_size, self.span
        # Tap i of the padded conv reads frame t - (k-1-i) d; slots not yet written are the zeros
        # that the left padding would supply.
        slots = torch.tensor([(t - (k - 1 - i) * d) % span for i in range(k - 1)],
                             device=buf.device)
        taps = torch.cat([buf.index_select(2, slots), x_t[:, :, None]], dim=2)   # (n, C, k)
        c = F.conv1d(taps, self.conv.weight, self.conv.bias)[:, :, 0]             # (n, C)
        y = x_t + self.drop(self.proj(torch.relu(self.norm(c))))
        # Functional write (index_copy, not in place) so old states stay valid for autograd.
        buf = buf.index_copy(2, slots.new_tensor([t % span]), x_t[:, :, None])   # (n, C, span)
        return y, buf


class DilatedConvProgressHead(_HiddenReadoutHead):
    """Linear(D'->64)+ReLU, six causal residual blocks (kernel 3, dilations 1..32,
    receptive field 127 frames), readout MLP 64->32->1 with bias init -2, sigmoid.

    Deviations from the fork's head: LayerNorm per frame over channels replaces BatchNorm1d
    (``norm="none"`` drops it); the blocks also run for T = 1 instead of being skipped. Streaming
    keeps a ring buffer of the last (k-1) d block inputs per block, so each frame costs O(1).
    """

    def __init__(self, in_dim: int = 128, channels: int = 64, *, position: str = "relative",
                 frame_count_max: int = 300, dilations: tuple[int, ...] = (1, 2, 4, 8, 16, 32),
                 kernel_size: int = 3, dropout: float = 0.1, norm: str = "layer",
                 out_bias_init: float | None = -2.0) -> None:
        super().__init__(in_dim, position, frame_count_max)
        if norm not in ("layer", "none"):
            raise ValueError(f"dilated_conv norm must be 'layer' or 'none', got '{norm}' "
                             "(BatchNorm is not causal)")
        if kernel_size < 2 or not dilations or min(dilations) < 1:
            raise ValueError("dilated_conv needs kernel_size >= 2 and dilations >= 1")
        self.channels = channels
        self.in_proj = nn.Linear(in_dim + self.num_extra, channels)
        self.blocks = nn.ModuleList(_DilatedBlock(channels, d, kernel_size, dropout, norm)
                                    for d in dilations)
        self.mlp = _readout(channels, out_bias_init)

    @property
    def receptive_field(self) -> int:
        """Frames that reach one output: 1 + (k-1) sum(d) = 127 for the defaults."""
        return 1 + sum(b.span for b in self.blocks)

    def _hidden(self, x, lengths, mask) -> torch.Tensor:
        h = torch.relu(self.in_proj(self._inputs(x, lengths, mask)))             # (N, L, C)
        # Right padding cannot reach real frames: every conv is causal (left-padded).
        for block in self.blocks:
            h = block(h)
        return h

    def init_state(self, n, *, device=None, dtype=None):
        if not self.streamable:
            return super().init_state(n, device=device, dtype=dtype)
        device, dtype = self._state_like(device, dtype)
        return ConvState(buffers=[torch.zeros(n, self.channels, b.span, device=device, dtype=dtype)
                                  for b in self.blocks], t=0)

    def step(self, x_t, state):
        if not self.streamable:
            return super().step(x_t, state)
        h = torch.relu(self.in_proj(self._step_inputs(x_t, state.t)))            # (n, C)
        buffers = []
        for block, buf in zip(self.blocks, state.buffers):
            h, buf = block.step(h, buf.to(h.dtype), state.t)
            buffers.append(buf)
        y = torch.sigmoid(self.mlp(h)).squeeze(-1)                                # (n,)
        return y, ConvState(buffers=buffers, t=state.t + 1)


# --------------------------------------------------------------------------------------------
# Registry


HEADS: dict[str, type[ProgressHead]] = {
    "gru": GRUProgressHead,
    "mean": MeanPoolProgressHead,
    "transformer": TransformerProgressHead,
    "dilated_conv": DilatedConvProgressHead,
}


def build_progress_head(arch: str, *, in_dim: int = 128, hidden_dim: int = 64,
                        position: str = "relative", learnable_h0: bool = True,
                        frame_count_max: int = 300, **kw) -> ProgressHead:
    """The head named `arch` ("mean" is the pipeline description's use_gru=False).

    `hidden_dim` is the width of every head: the GRU hidden size, the mean head's first layer
    (docs/algorithms.md#mean-head), the transformer's d_model and the conv channels (all 64 by
    default).
    `learnable_h0` applies to the GRU only. Extra keywords go to the head's constructor
    (dropout, num_heads, num_layers, ffn_dim, dilations, kernel_size, norm, out_bias_init).
    """
    if arch not in HEADS:
        raise ValueError(f"unknown progress head arch '{arch}'; choose one of {', '.join(HEADS)}")
    if position not in POSITIONS:
        raise ValueError(f"unknown progress position feature '{position}'; "
                         f"choose one of {', '.join(POSITIONS)}")
    common = dict(position=position, frame_count_max=frame_count_max, **kw)
    if arch == "gru":
        return GRUProgressHead(in_dim, hidden_dim, learnable_h0=learnable_h0, **common)
    return HEADS[arch](in_dim, hidden_dim, **common)
