"""The resnet50 encoder's 2-D formulation equals the documented Conv3d over gathered frame stacks
(docs/algorithms.md#resnet50): values and gradients, every window, chunking, padding and hole
frames.

`conv3d_forward` below is the encoder's earlier forward, kept as the reference: it gathers the
(n, C, k, H, W) stack of every real frame and runs the module's own nn.Conv3d layers on it.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

from alignprog.models import encoders, stack_sum_triton
from alignprog.models.encoders import ResNet50Encoder
from alignprog.runtime import host_lengths, known_lengths

SHAPE = (4, 5, 5)  # (C, H, W) of the small model's frames


def conv3d_forward(model: ResNet50Encoder, x: torch.Tensor, mask: torch.Tensor,
                   chunk: int = 64) -> torch.Tensor:
    """The Conv3d-over-gathered-stacks formulation: (B, T, C, H, W) -> (B, T, D), 0 on padding."""
    batch, frames = mask.shape
    b_idx, t_idx = mask.nonzero(as_tuple=True)                 # (N,), (N,)
    offsets = model.window_offsets(device=x.device)            # (k,)
    embs = []
    for start in range(0, b_idx.numel(), chunk):
        b = b_idx[start:start + chunk]                         # (n,)
        t = t_idx[start:start + chunk]                         # (n,)
        src = t[:, None] + offsets[None, :]                    # (n, k)
        src_c = src.clamp(min=0)                               # (n, k)
        valid = (src >= 0) & mask[b[:, None], src_c]           # (n, k)
        stack = x[b[:, None], src_c]                           # (n, k, C, H, W)
        stack = torch.where(valid[:, :, None, None, None], stack, 0.0)
        feat = model.conv(stack.transpose(1, 2)).amax(dim=(2, 3, 4))  # (n, c2)
        embs.append(model.mlp(feat))                           # (n, D)
    emb = torch.cat(embs) if embs else model.mlp(x.new_zeros((0, model.mlp[0].in_features)))
    out = emb.new_zeros((batch, frames, emb.shape[-1]))        # (B, T, D)
    return out.index_put((b_idx, t_idx), emb)


def small(dtype=torch.float64, seed: int = 0, **kw) -> ResNet50Encoder:
    torch.manual_seed(seed)
    model = ResNet50Encoder(**{"in_channels": SHAPE[0], "conv_channels": (8, 6), "mlp_dim": 8,
                               "out_dim": 5, **kw})
    return model.to(dtype)


def batch(lengths, total: int | None = None, fill: float = math.nan, dtype=torch.float64,
          seed: int = 1, shape=SHAPE):
    """(B, T, C, H, W) with `fill` in the padding, and its (B, T) mask."""
    g = torch.Generator().manual_seed(seed)
    t = total or max(lengths)
    x = torch.full((len(lengths), t, *shape), fill, dtype=dtype)   # (B, T, C, H, W)
    mask = torch.zeros((len(lengths), t), dtype=torch.bool)          # (B, T)
    for i, n in enumerate(lengths):
        x[i, :n] = torch.randn((n, *shape), generator=g, dtype=dtype)
        mask[i, :n] = True
    return x, mask


def values_and_grads(model, forward, x, mask, weights):
    """Output, parameter gradients and input gradient of sum(weights * forward(x))."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = forward(x, mask)
    (out * weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return out.detach(), grads, x.grad


def assert_same(model, x, mask, **tol):
    g = torch.Generator().manual_seed(2)
    weights = torch.rand((*mask.shape, model.out_dim), generator=g, dtype=x.dtype).to(x.device)
    new = values_and_grads(model, model, x, mask, weights)
    old = values_and_grads(model, lambda a, m: conv3d_forward(model, a, m), x, mask, weights)
    torch.testing.assert_close(new[0], old[0], **tol)
    assert torch.all(new[0][~mask] == 0)
    for name in old[1]:
        torch.testing.assert_close(new[1][name], old[1][name], **tol, msg=name)
    torch.testing.assert_close(new[2], old[2], **tol)
    assert torch.isfinite(new[2]).all() and torch.all(new[2][~mask] == 0)


@pytest.mark.parametrize("chunk", [1, 2, 3, None])
@pytest.mark.parametrize("reference_window", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_equals_conv3d_values_and_gradients(k, reference_window, chunk):
    """Variable lengths (one empty row), NaN in the padding, chunks that split videos."""
    model = small(temporal_depth=k, reference_window=reference_window, chunk_frames=chunk).train()
    x, mask = batch([7, 1, 0, 4], total=9)
    assert_same(model, x, mask)


@pytest.mark.parametrize("reference_window", [False, True])
def test_hole_frames_read_as_zero_maps(reference_window):
    """A False inside a video (never made by the batcher) is a zero map, as before; the frames
    after it still read the frames before it."""
    model = small(temporal_depth=3, reference_window=reference_window, chunk_frames=2).train()
    x, mask = batch([8, 5], total=10)
    mask[0, 3] = False
    mask[1, 0] = False
    x[0, 3] = math.nan
    x[1, 0] = math.nan
    assert_same(model, x, mask)


@pytest.mark.parametrize("reference_window", [False, True])
def test_dense_rows_give_the_same_values_and_gradients(reference_window):
    """`dense` runs every padded position (no host sync): same outputs and gradients."""
    model = small(reference_window=reference_window, chunk_frames=4).train()
    model.dense = True
    x, mask = batch([7, 1, 0, 4], total=9)
    mask[0, 3] = False  # a hole too
    assert_same(model, x, mask)


@pytest.mark.parametrize("chunk", [3, None])
def test_host_lengths_run_each_videos_real_rows_only(monkeypatch, chunk):
    """`dense` with the batch's frame counts given on the host (`runtime.host_lengths`, the
    trainer's eager step): the same values and gradients, and conv1 runs each video's real
    frames and its zero frame only (15 rows here), not the 4 x (9 + 1) padded ones."""
    model = small(chunk_frames=chunk).train()
    model.dense = True
    x, mask = batch([7, 1, 0, 4], total=9)
    rows: list[int] = []
    conv2d = encoders.F.conv2d

    def counting(inp, weight, *args, **kw):
        if inp.shape[1] == SHAPE[0]:       # conv1: the frames' channels in
            rows.append(inp.shape[0])
        return conv2d(inp, weight, *args, **kw)

    monkeypatch.setattr(encoders.F, "conv2d", counting)
    with host_lengths(mask.sum(dim=1)):
        assert_same(model, x, mask)
    # a chunk of n stacks reads n + 1 rows (its zero or previous frame): R - 1 + chunks
    def conv1_rows(r: int) -> int:
        return r - 1 + (-(-(r - 1) // chunk) if chunk else 1)

    assert sum(rows) == conv1_rows(15)
    rows.clear()
    assert_same(model, x, mask)                   # without them: every padded position
    assert sum(rows) == conv1_rows(4 * (9 + 1))


def test_known_lengths_only_inside_host_lengths():
    lengths = torch.tensor([3, 2])
    assert known_lengths() is None
    with host_lengths(lengths):
        assert known_lengths() is lengths
        with host_lengths(None):
            assert known_lengths() is None
        assert known_lengths() is lengths
    assert known_lengths() is None


def test_bf16_autocast_casts_the_input_once_with_the_same_values():
    """Under autocast the float32 maps are cast to bf16 before the gather: the output equals
    that of the input given in bf16 already, bit for bit."""
    model = small(torch.float32, chunk_frames=2).eval()
    x, mask = batch([6, 3], dtype=torch.float32, fill=0.0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(x, mask), model(x.bfloat16(), mask))


def test_float32_and_bf16_autocast_follow_the_conv3d_path():
    model = small(torch.float32, chunk_frames=3).eval()
    x, mask = batch([6, 3], dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(model(x, mask), conv3d_forward(model, x, mask),
                                   atol=1e-5, rtol=1e-4)
        exact = conv3d_forward(model, x, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            amp = model(x, mask)
        assert amp.dtype == torch.bfloat16 and torch.all(amp[~mask] == 0)
        torch.testing.assert_close(amp.float(), exact, atol=5e-2, rtol=5e-2)


def test_same_parameters_and_checkpoint_keys():
    """The documented Conv3d modules stay the parameters: old checkpoints load unchanged."""
    model = small()
    assert list(model.state_dict()) == [
        "conv.0.weight", "conv.0.bias", "conv.2.weight", "conv.2.bias", "mlp.0.weight",
        "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight", "mlp.4.bias"]
    assert model.conv[0].weight.shape == (8, 4, 3, 3, 3)
    other = small(seed=5)
    other.load_state_dict(model.state_dict())
    x, mask = batch([4, 2], fill=0.0)
    torch.testing.assert_close(other(x, mask), model(x, mask))


def test_chunk_size_from_the_memory_budget():
    """Default sizes: input (twice, for an autocast copy), 3 conv1 taps, stacks, conv2 output."""
    model = ResNet50Encoder()
    per_frame = 14 * 14 * (2 * 1024 + 3 * 1024 + 2 * 2 * 1024 + 2 * 512)
    assert model.chunk_size(14, 14, 4) == ResNet50Encoder.CHUNK_BYTES // (4 * per_frame) == 534
    assert model.chunk_size(14, 14, 2) == 1069
    assert ResNet50Encoder(chunk_frames=64).chunk_size(14, 14, 4) == 64
    with pytest.raises(ValueError, match="chunk_frames must be >= 1"):
        ResNet50Encoder(chunk_frames=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("reference_window", [False, True])
def test_cuda_equals_conv3d(reference_window):
    dev = torch.device("cuda")
    model = small(reference_window=reference_window, chunk_frames=4).train().to(dev)
    x, mask = batch([9, 2, 6], total=11)
    assert_same(model, x.to(dev), mask.to(dev))  # float64: no TF32, summation order only
    # wider model, float32 with TF32 convs allowed and bf16 autocast: loose, padding exact 0
    torch.manual_seed(0)
    wide = ResNet50Encoder(in_channels=64, conv_channels=(128, 64), mlp_dim=64,
                           reference_window=reference_window).to(dev)
    x, mask = batch([30, 17], fill=math.nan, dtype=torch.float32, shape=(64, 14, 14))
    x, mask = x.to(dev), mask.to(dev)
    with torch.no_grad():
        ref = conv3d_forward(wide.double(), x.double(), mask).float()
        wide.float()
        torch.testing.assert_close(wide(x, mask), ref, atol=1e-2, rtol=1e-2)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            amp = wide(x, mask)
    assert torch.all(amp[~mask] == 0) and torch.isfinite(amp).all()
    torch.testing.assert_close(amp.float(), ref, atol=5e-2, rtol=5e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_host_lengths_give_the_dense_values_without_a_sync():
    dev = torch.device("cuda")
    model = small(torch.float32, chunk_frames=4).train().to(dev)
    model.dense = True
    x, mask = batch([9, 2, 6], total=11, fill=0.0, dtype=torch.float32)
    lengths = mask.sum(dim=1)
    x, mask = x.to(dev), mask.to(dev)
    dense = model(x, mask)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with host_lengths(lengths):
            packed = model(x, mask)
            packed.square().sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(packed, dense, atol=1e-5, rtol=1e-5)
    assert torch.all(packed[~mask] == 0)


INTERPRETED = """
import torch
from alignprog.models import encoders, stack_sum_triton as kernels
from alignprog.models.encoders import ResNet50Encoder
for dtype in (torch.float32, torch.float64):
    for k in (1, 2, 3):
        torch.manual_seed(k)
        model = ResNet50Encoder(in_channels=4, conv_channels=(12, 8), mlp_dim=4, out_dim=4,
                                temporal_depth=k)
        terms = model._stack_terms()
        lo, hi = model.conv1_taps()
        halo, n = -min(model.window_offsets().tolist()), 5
        y = torch.randn((n + halo, (hi - lo + 1) * 12, 3, 2), dtype=dtype)
        y = y.contiguous(memory_format=torch.channels_last).requires_grad_(True)
        b = torch.randn(k * 12, dtype=dtype, requires_grad=True)
        h = encoders._StackSum.apply(y, b, terms, n, False)
        grad = torch.randn(h.shape, dtype=dtype)
        h.backward(grad)
        g = torch.ops.aten.threshold_backward(grad, h.detach(), 0)
        assert torch.equal(kernels.stack_sum_forward(y.detach(), b.detach(), terms, n), h)
        assert torch.equal(kernels.stack_sum_backward(g, terms, y.shape), y.grad)
        # a NaN in Y stays NaN in the stacks (relu keeps it), as with the torch ops
        y_nan = y.detach().clone()
        y_nan[1, 0, 0, 0] = float("nan")
        want = encoders._StackSum.apply(y_nan, b.detach(), terms, n, False)
        got = kernels.stack_sum_forward(y_nan, b.detach(), terms, n)
        assert torch.isnan(want).any()
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
print("ok")
"""


def test_triton_stack_sums_equal_the_torch_ops_in_the_interpreter():
    """The kernels of `stack_sum_triton`, run on the CPU by Triton's interpreter: equal to the
    torch ops bit for bit in float32 and float64, for windows of 1-3 frames, NaN included."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", INTERPRETED], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_triton_stack_sums_equal_the_torch_ops(k, dtype):
    """The stack sums' kernels (`stack_sum_triton`) against the torch ops, on widths and row
    counts that fill no tile exactly: the forward, and the backward of the same gradient.
    float32: the terms add in the same order, equal; bf16: the kernels round once, the torch
    ops after every add."""
    dev = torch.device("cuda")
    torch.manual_seed(k)
    model = ResNet50Encoder(in_channels=24, conv_channels=(72, 40), mlp_dim=16, out_dim=8,
                            temporal_depth=k)
    terms = model._stack_terms()
    lo, hi = model.conv1_taps()
    halo, n = -min(model.window_offsets().tolist()), 37
    y = torch.randn((n + halo, (hi - lo + 1) * 72, 5, 7), device=dev, dtype=dtype)
    y = y.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    bias = torch.randn(k * 72, device=dev, dtype=dtype, requires_grad=True)
    h = encoders._StackSum.apply(y, bias, terms, n, False)
    grad = torch.randn(h.shape, device=dev, dtype=dtype)
    h.backward(grad)
    g = torch.ops.aten.threshold_backward(grad, h.detach(), 0)
    fused_h = stack_sum_triton.stack_sum_forward(y.detach(), bias.detach(), terms, n)
    fused_gy = stack_sum_triton.stack_sum_backward(g, terms, y.shape)
    assert fused_h.is_contiguous(memory_format=torch.channels_last)
    tol = {"atol": 0.0, "rtol": 0.0} if dtype == torch.float32 else {"atol": 0.05, "rtol": 0.02}
    torch.testing.assert_close(fused_h.float(), h.detach().float(), **tol)
    torch.testing.assert_close(fused_gy.float(), y.grad.float(), **tol)
    # and through the autograd function: the kernels' backward of the kernels' forward
    yy, bb = y.detach().clone().requires_grad_(True), bias.detach().clone().requires_grad_(True)
    out = encoders._StackSum.apply(yy, bb, terms, n, True)
    out.backward(grad)
    assert torch.equal(out, fused_h)
    torch.testing.assert_close(
        yy.grad, stack_sum_triton.stack_sum_backward(
            torch.ops.aten.threshold_backward(grad, out.detach(), 0), terms, y.shape))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fused_stacks_follow_the_conv3d_path():
    dev = torch.device("cuda")
    model = small(chunk_frames=4).train().to(dev)
    assert model.fused_stacks
    x, mask = batch([9, 2, 6], total=11)
    assert_same(model, x.to(dev), mask.to(dev))   # float64 through the kernels
