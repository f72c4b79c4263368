"""The `resnet50` encoder's stack sums as two Triton kernels (CUDA only).

The stacks of a chunk are relu(b1 + a few row-shifted channel slices of conv1's per-frame taps
Y) (`encoders._StackSum`, docs/algorithms.md#resnet50). Written with torch ops, each slice is
one pass over memory that reads a strided channel slice of a channels-last tensor (a generic,
unvectorised elementwise kernel), and the backward zeroes dY and adds each slice into it: at
the default sizes (3 x 1024 tap channels, 14 x 14 maps, ~830 frames) four passes of about 1 ms
each per encoder and step on an H200. Here the forward reads every slice and writes the stacks
once, and the backward writes dY once from the stacks' gradient, each tile of it summing the
slices that land there.

Both kernels work on the channels-last memory as a matrix of pixel rows: row i * H*W + p holds
pixel p of frame row i, its channels contiguous. A term (row, y_channel, h_channel, width) adds
Y's pixel row (i + row) * H*W + p, channels y_channel .. y_channel + width - 1, into the stacks'
pixel row i * H*W + p, channels h_channel .. h_channel + width - 1. Sums run in float32 (float64
for float64 tensors) and are rounded once to the tensors' dtype (the torch ops round after every add: under bf16 the two
differ by about one bf16 step; in float32 they are equal, as the terms add in the same order).
"""

from __future__ import annotations

import torch

try:  # Triton comes with CUDA builds of torch; without it the torch ops serve.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only torch builds
    triton = None

BLOCK_ROWS, BLOCK_CHANNELS = 32, 128


def available(tensor: torch.Tensor) -> bool:
    """Whether the kernels can run on `tensor`: a CUDA tensor, Triton importable."""
    return triton is not None and tensor.is_cuda


_TABLES: dict[tuple, torch.Tensor] = {}


def _term_table(terms: list[tuple[int, int, int, int]], device: torch.device) -> torch.Tensor:
    """The terms as a flat int32 tensor on `device` (row, y_channel, h_channel, width per
    term), made once per terms and device: the copy of a new one waits for the GPU."""
    key = (tuple(terms), device)
    if key not in _TABLES:
        _TABLES[key] = torch.tensor([v for term in terms for v in term], dtype=torch.int32,
                                    device=device)
    return _TABLES[key]


def stack_sum_forward(y: torch.Tensor, bias: torch.Tensor,
                      terms: list[tuple[int, int, int, int]], n: int) -> torch.Tensor:
    """relu(bias + the terms' slices of y): y (n + halo, Cy, H, W) -> (n, Ch, H, W), both
    channels-last, Ch = bias.numel()."""
    y = y.contiguous(memory_format=torch.channels_last)
    _, cy, height, width = y.shape
    ch = bias.numel()
    h = torch.empty((n, ch, height, width), dtype=y.dtype, device=y.device,
                    memory_format=torch.channels_last)
    rows = n * height * width
    if rows == 0:
        return h
    grid = (triton.cdiv(rows, BLOCK_ROWS), triton.cdiv(ch, BLOCK_CHANNELS))
    _forward_kernel[grid](y, bias, h, _term_table(terms, y.device), rows, height * width, cy, ch,
                          NT=len(terms), BM=BLOCK_ROWS, BC=BLOCK_CHANNELS,
                          F64=y.dtype == torch.float64)
    return h


def stack_sum_backward(g: torch.Tensor, terms: list[tuple[int, int, int, int]],
                       y_shape: torch.Size) -> torch.Tensor:
    """dY of the terms from g, the gradient at the stacks' input to relu ((n, Ch, H, W)):
    (n + halo, Cy, H, W) channels-last, zero where no term reads Y."""
    g = g.contiguous(memory_format=torch.channels_last)
    n, ch, height, width = g.shape
    gy = torch.empty(y_shape, dtype=g.dtype, device=g.device, memory_format=torch.channels_last)
    rows_y, cy = y_shape[0] * height * width, y_shape[1]
    if rows_y == 0:
        return gy
    grid = (triton.cdiv(rows_y, BLOCK_ROWS), triton.cdiv(cy, BLOCK_CHANNELS))
    _backward_kernel[grid](g, gy, _term_table(terms, g.device), rows_y, n * height * width,
                           height * width, cy, ch, NT=len(terms), BM=BLOCK_ROWS,
                           BC=BLOCK_CHANNELS, F64=g.dtype == torch.float64)
    return gy


if triton is not None:

    @triton.jit
    def _term(terms_ptr, t):
        # term t of the table: (row shift, Y's first channel, the stacks' first channel, width)
        row = tl.load(terms_ptr + 4 * t).to(tl.int64)
        return (row, tl.load(terms_ptr + 4 * t + 1), tl.load(terms_ptr + 4 * t + 2),
                tl.load(terms_ptr + 4 * t + 3))

    @triton.jit
    def _forward_kernel(y_ptr, b_ptr, h_ptr, terms_ptr, rows, hw, cy, ch,
                        NT: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr,
                        F64: tl.constexpr):
        # one (BM pixel rows) x (BC channels) tile of the stacks
        m = tl.program_id(0) * BM + tl.arange(0, BM)                     # (BM,) stack pixel rows
        c = tl.program_id(1) * BC + tl.arange(0, BC)                     # (BC,) stack channels
        m_ok, c_ok = m < rows, c < ch
        m64 = m.to(tl.int64)
        acc_t = tl.float64 if F64 else tl.float32
        bias = tl.load(b_ptr + c, mask=c_ok, other=0.0).to(acc_t)
        acc = tl.zeros((BM, BC), dtype=acc_t) + bias[None, :]
        for t in tl.static_range(NT):
            row, y_lo, h_lo, w = _term(terms_ptr, t)
            k = c - h_lo                                                 # (BC,) slice channel
            ok = m_ok[:, None] & (c_ok & (k >= 0) & (k < w))[None, :]
            src = (m64 + row * hw)[:, None] * cy + (y_lo + k)[None, :]
            acc += tl.load(y_ptr + src, mask=ok, other=0.0).to(acc_t)
        acc = tl.where(acc < 0.0, 0.0, acc)     # relu that keeps NaN, as torch's does
        dst = m64[:, None] * ch + c[None, :]
        tl.store(h_ptr + dst, acc.to(h_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & c_ok[None, :])

    @triton.jit
    def _backward_kernel(g_ptr, gy_ptr, terms_ptr, rows_y, rows_h, hw, cy, ch,
                         NT: tl.constexpr, BM: tl.constexpr, BC: tl.constexpr,
                         F64: tl.constexpr):
        # one (BM pixel rows) x (BC channels) tile of dY: the sum of the slices of g on it
        r = tl.program_id(0) * BM + tl.arange(0, BM)                     # (BM,) Y pixel rows
        c = tl.program_id(1) * BC + tl.arange(0, BC)                     # (BC,) Y channels
        r_ok, c_ok = r < rows_y, c < cy
        r64 = r.to(tl.int64)
        acc_t = tl.float64 if F64 else tl.float32
        acc = tl.zeros((BM, BC), dtype=acc_t)
        for t in tl.static_range(NT):
            row, y_lo, h_lo, w = _term(terms_ptr, t)
            m = r64 - row * hw                                           # (BM,) stack pixel rows
            k = c - y_lo                                                 # (BC,) slice channel
            ok = (r_ok & (m >= 0) & (m < rows_h))[:, None] & (c_ok & (k >= 0) & (k < w))[None, :]
            src = m[:, None] * ch + (h_lo + k)[None, :]
            acc += tl.load(g_ptr + src, mask=ok, other=0.0).to(acc_t)
        dst = r64[:, None] * cy + c[None, :]
        tl.store(gy_ptr + dst, acc.to(gy_ptr.dtype.element_ty),
                 mask=r_ok[:, None] & c_ok[None, :])
