"""The resnet50 encoder's 2-D formulation equals the documented Conv3d over gathered frame stacks
(docs/algorithms.md#resnet50): values and gradients, every window, chunking, padding and hole
frames.

`conv3d_forward` below is the encoder's earlier forward, kept as the reference: it gathers the
(n, C, k, H, W) stack of every real frame and runs the module's own nn.Conv3d layers on it.
"""

from __future__ import annotations

import math

import pytest
import torch

from alignprog.models.encoders import ResNet50Encoder

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
