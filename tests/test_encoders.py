"""Base encoders (docs/algorithms.md#base-encoders) and the reference bugs they fix: the resnet50
window off by one, the naive encoder built from the drop widths, the fixed embedding width
(docs/reference-bugs.md).

Most tests use small widths so the file runs in seconds on 2 CPU cores; the resnet50 encoder's
internal widths are constructor arguments defaulting to the documented 1024/512/512. The full-size
resnet50 run is `slow`, the CPU-vs-CUDA comparison is `gpu`.
"""

from __future__ import annotations

import math
from typing import get_args

import pytest
import torch

from alignprog.config import ModelConfig
from alignprog.models import build_model
from alignprog.models.encoders import (
    ENCODERS,
    BaseEncoder,
    NaiveEncoder,
    ResNet50Encoder,
    StackingEncoder,
    build_encoder,
    stacking_schedule,
)

# name -> (constructor, per-frame input shape) of a small encoder of each kind.
SMALL = {
    "resnet50": (lambda **kw: ResNet50Encoder(**{"in_channels": 4, "conv_channels": (8, 6),
                                                 "mlp_dim": 8, "out_dim": 5, "chunk_frames": 3,
                                                 **kw}), (4, 5, 5)),
    "stacking": (lambda **kw: StackingEncoder(in_dim=12, channels=8, out_dim=4, **kw), (12,)),
    "naive": (lambda **kw: NaiveEncoder(in_dim=12, layers=(10, 8), out_dim=4, **kw), (12,)),
}
NAMES = list(SMALL)


def make(name: str, seed: int = 0, dtype=torch.float32, **kw) -> BaseEncoder:
    torch.manual_seed(seed)
    return SMALL[name][0](**kw).to(dtype).eval()


def videos(name: str, lengths, seed: int = 1, dtype=torch.float32) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = SMALL[name][1]
    return [torch.randn((n, *shape), generator=g, dtype=dtype) for n in lengths]


def pad(vids: list[torch.Tensor], fill: float = 0.0, total: int | None = None):
    """(B, T, *F) batch with `fill` in padded positions, and its (B, T) mask."""
    t = total or max(len(v) for v in vids)
    x = torch.full((len(vids), t, *vids[0].shape[1:]), fill, dtype=vids[0].dtype)  # (B, T, *F)
    mask = torch.zeros((len(vids), t), dtype=torch.bool)                               # (B, T)
    for i, v in enumerate(vids):
        x[i, :len(v)] = v
        mask[i, :len(v)] = True
    return x, mask


# ---------------------------------------------------------------------------------------------
# Every encoder
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_shape_padding_zero_and_sign(name):
    model = make(name)
    x, mask = pad(videos(name, [6, 2, 4]), fill=3.0)
    out = model(x, mask)
    assert out.shape == (3, 6, model.out_dim)
    assert out.dtype == x.dtype
    assert torch.all(out[~mask] == 0)
    assert out[mask].abs().sum() > 0  # not a dead network: the other tests would be vacuous
    if name == "resnet50":
        assert torch.all(out >= 0)  # final ReLU, embeddings are non-negative
    # naive ends in a plain Linear ("... 256 -> ReLU -> 128"), so its outputs may be negative


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("fill", [0.0, 1e6, -1e6, math.nan])
def test_padding_invariance(name, fill):
    """A video alone and padded behind a longer one embed the same, whatever the padding holds."""
    model = make(name)
    short, long_ = videos(name, [4, 9])
    alone = model(*pad([short]))[0]                       # (4, D)
    x, mask = pad([long_, short], fill=fill, total=11)
    batched = model(x, mask)                              # (2, 11, D)
    torch.testing.assert_close(batched[1, :4], alone, atol=1e-6, rtol=1e-5)
    assert torch.all(batched[1, 4:] == 0) and torch.all(batched[0, 9:] == 0)
    assert torch.isfinite(batched).all()


@pytest.mark.parametrize("name", NAMES)
def test_nan_padding_gives_finite_gradients(name):
    model = make(name)
    model.train()
    x, mask = pad(videos(name, [5, 3]), fill=math.nan)
    x.requires_grad_(True)
    model(x, mask).sum().backward()
    for p in model.parameters():
        assert torch.isfinite(p.grad).all()
    assert torch.isfinite(x.grad[mask]).all()


@pytest.mark.parametrize("name", NAMES)
def test_batched_equals_one_video_at_a_time(name):
    model = make(name)
    vids = videos(name, [7, 1, 4, 7])
    x, mask = pad(vids)
    batched = model(x, mask)
    for i, v in enumerate(vids):
        one = model(v[None], torch.ones((1, len(v)), dtype=torch.bool))[0]
        torch.testing.assert_close(batched[i, :len(v)], one, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_every_parameter(name):
    model = make(name)
    model.train()
    x, mask = pad(videos(name, [6, 3]))
    model(x, mask).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", NAMES)
def test_float64_in_float64_out_and_empty_mask(name):
    model = make(name, dtype=torch.float64)
    x, mask = pad(videos(name, [3, 2], dtype=torch.float64))
    assert model(x, mask).dtype == torch.float64
    none = torch.zeros_like(mask)
    out = model(x, none)
    assert out.shape == (2, 3, model.out_dim) and torch.all(out == 0)


@pytest.mark.parametrize("name", NAMES)
def test_cpu_autocast_bfloat16(name):
    model = make(name)
    x, mask = pad(videos(name, [4, 2]), fill=1e6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, mask)
    ref = model(x, mask)
    assert out.shape == ref.shape
    assert torch.all(out[~mask] == 0)
    torch.testing.assert_close(out.float(), ref, atol=0.1, rtol=0.1)


@pytest.mark.parametrize("name", NAMES)
def test_input_validation(name):
    model = make(name)
    x, mask = pad(videos(name, [3]))
    with pytest.raises(ValueError, match="mask"):
        model(x, mask[:, :2])
    with pytest.raises(ValueError, match="bool"):
        model(x, mask.float())
    with pytest.raises(ValueError):
        model(x[:, :, :-1], mask)  # wrong feature width / channel count
    with pytest.raises(ValueError, match="rank"):
        model(x[0], mask)


# ---------------------------------------------------------------------------------------------
# resnet50
# ---------------------------------------------------------------------------------------------

def resnet_reference_loop(model: ResNet50Encoder, video: torch.Tensor, reference_window: bool
                          ) -> torch.Tensor:
    """The reference's per-frame loop: build each frame's stack one slot at a time."""
    n, c, h, w = video.shape
    k = model.temporal_depth
    rows = []
    for r in range(n):
        first = r - k if reference_window else r - k + 1  # reference r-k..r-1, intended r-k+1..r
        slots = []
        for s in range(first, first + k):
            slots.append(video[s] if s >= 0 else video.new_zeros((c, h, w)))
        stack = torch.stack(slots, dim=1)                 # (C, k, H, W)
        feat = model.conv(stack[None]).amax(dim=(2, 3, 4))  # (1, 512)
        rows.append(model.mlp(feat)[0])
    return torch.stack(rows)                              # (N, D)


@pytest.mark.parametrize("reference_window", [False, True])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_resnet_window_matches_reference_loop(reference_window, k):
    model = make("resnet50", dtype=torch.float64, temporal_depth=k,
                 reference_window=reference_window)
    vids = videos("resnet50", [5, 2], dtype=torch.float64)
    x, mask = pad(vids, fill=1e6)
    out = model(x, mask)
    for i, v in enumerate(vids):
        torch.testing.assert_close(out[i, :len(v)],
                                   resnet_reference_loop(model, v, reference_window))


def test_resnet_window_offsets():
    plain = ResNet50Encoder(4, temporal_depth=2, conv_channels=(2, 2), mlp_dim=2)
    assert plain.window_offsets().tolist() == [-1, 0]
    ref = ResNet50Encoder(4, temporal_depth=2, reference_window=True, conv_channels=(2, 2),
                          mlp_dim=2)
    assert ref.window_offsets().tolist() == [-2, -1]


@pytest.mark.parametrize("reference_window", [False, True])
def test_resnet_frame_zero_depends_on_its_input_only_with_intended_window(reference_window):
    """The reference window never reads frame r, so frame 0's embedding is input-independent."""
    model = make("resnet50", dtype=torch.float64, reference_window=reference_window)
    model.train()
    (v,) = videos("resnet50", [4], dtype=torch.float64)
    x = v[None].clone().requires_grad_(True)
    out = model(x, torch.ones((1, 4), dtype=torch.bool))
    assert out[0, 0].sum() > 0
    (grad,) = torch.autograd.grad(out[0, 0].sum(), x)
    if reference_window:
        assert torch.all(grad == 0)
    else:
        assert grad[0, 0].abs().sum() > 0
        assert torch.all(grad[0, 1:] == 0)  # causal: no later frame is read


def test_resnet_chunking_does_not_change_outputs():
    vids = videos("resnet50", [5, 3, 4])
    x, mask = pad(vids)
    outs = [make("resnet50", chunk_frames=c)(x, mask) for c in (1, 2, 64)]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(outs[0], outs[2], atol=1e-6, rtol=1e-5)


def test_resnet_default_widths_and_out_dim():
    """Documented widths (in -> 1024 -> 512, MLP 512) on tiny maps; out_dim honoured (the
    reference always emits 128)."""
    torch.manual_seed(0)
    model = ResNet50Encoder(in_channels=3, out_dim=16)
    conv1, conv2 = model.conv[0], model.conv[2]
    assert (conv1.in_channels, conv1.out_channels, conv1.kernel_size) == (3, 1024, (3, 3, 3))
    assert (conv2.in_channels, conv2.out_channels, conv2.kernel_size) == (1024, 512, (3, 3, 3))
    assert conv1.bias is not None and conv2.bias is not None
    assert [m.out_features for m in model.mlp if isinstance(m, torch.nn.Linear)] == [512, 512, 16]
    assert isinstance(model.mlp[-1], torch.nn.ReLU)
    x = torch.randn(1, 2, 3, 2, 2)
    out = model(x, torch.tensor([[True, False]]))
    assert out.shape == (1, 2, 16) and torch.all(out[0, 1] == 0) and torch.all(out >= 0)


# ---------------------------------------------------------------------------------------------
# temporal_stacking
# ---------------------------------------------------------------------------------------------

def test_stacking_default_schedule():
    model = StackingEncoder()
    got = [(c.in_channels, c.out_channels, c.kernel_size[0]) for c in model.convs]
    assert got == [(2048, 256, 2), (256, 128, 3)] + [(128, 128, 3)] * 5
    assert all(c.bias is None and c.stride == (1,) for c in model.convs)
    assert (sum(p.numel() for p in model.parameters()) == sum(i * o * k for i, o, k in got)
            == 1_392_640)


def test_stacking_schedule_variants():
    assert stacking_schedule(64, 32, 4, 3, 2) == [(64, 32, 3), (32, 16, 3), (16, 8, 3), (8, 4, 3)]
    assert stacking_schedule(64, 32, 16, 2, 4) == [(64, 32, 2), (32, 16, 3), (16, 16, 3),
                                                   (16, 16, 3)]
    with pytest.raises(ValueError, match="out_dim < channels"):
        StackingEncoder(channels=128, out_dim=128)
    with pytest.raises(ValueError, match="power of two"):
        StackingEncoder(channels=256, out_dim=96)
    with pytest.raises(ValueError, match="temporal_depth"):
        StackingEncoder(temporal_depth=0)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_stacking_padding_matches_torch_same(k):
    """The explicit padding equals PyTorch's padding="same" over a whole stack (odd and even k)."""
    model = make("stacking", dtype=torch.float64, temporal_depth=k)
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    h = x.transpose(1, 2)                                 # (B, F, T)
    for i, conv in enumerate(model.convs):
        h = torch.nn.functional.conv1d(h, conv.weight, padding="same")
        h = torch.relu(h) if i < len(model.convs) - 1 else h
    out = model(x, torch.ones((2, 9), dtype=torch.bool))
    torch.testing.assert_close(out, h.transpose(1, 2))


def test_stacking_first_conv_looks_one_frame_ahead():
    """k = 2 with "same" padding pads on the right: layer-0 output t reads x_t and x_{t+1} only."""
    torch.manual_seed(0)
    model = StackingEncoder(in_dim=12, channels=8, out_dim=4, num_layers=2).double()
    model.convs = model.convs[:1]  # a one-layer stack: layer 0 alone, no ReLU after it
    x = torch.randn(1, 8, 12, dtype=torch.float64, requires_grad=True)  # (B, T, F)
    out = model(x, torch.ones((1, 8), dtype=torch.bool))               # (1, 8, 8)
    (grad,) = torch.autograd.grad(out[0, 3].sum(), x)
    assert (grad[0].abs().sum(1) > 0).nonzero().flatten().tolist() == [3, 4]
    # the last frame's look-ahead is the zero padding frame
    w = model.convs[0].weight                                            # (C, F, 2)
    torch.testing.assert_close(out[0, -1], w[:, :, 0] @ x[0, -1])


def test_stacking_receptive_field():
    """Default schedule (k=2 then six k=3 convs): output t sees x_{t-6} .. x_{t+7}."""
    model = make("stacking", dtype=torch.float64)
    t, n = 12, 24
    x = torch.randn(1, n, 12, dtype=torch.float64, requires_grad=True)
    out = model(x, torch.ones((1, n), dtype=torch.bool))
    (grad,) = torch.autograd.grad(out[0, t].sum(), x)
    seen = (grad[0].abs().sum(1) > 0).nonzero().flatten().tolist()
    assert seen == list(range(t - 6, t + 8))


def test_stacking_last_real_frame_sees_zero_lookahead():
    """The frame after a video's end reads as zero whether it is padding or beyond the tensor."""
    model = make("stacking")
    (v,) = videos("stacking", [5])
    alone = model(v[None], torch.ones((1, 5), dtype=torch.bool))
    x = torch.cat([v, torch.full((3, 12), 7.0)])[None]                     # (1, 8, F)
    padded = model(x, torch.tensor([[True] * 5 + [False] * 3]))
    torch.testing.assert_close(padded[0, :5], alone[0], atol=1e-6, rtol=1e-5)
    unmasked = model(x, torch.ones((1, 8), dtype=torch.bool))
    assert not torch.allclose(unmasked[0, 4], alone[0, 4])  # the mask is what keeps the 7s out


# ---------------------------------------------------------------------------------------------
# naive
# ---------------------------------------------------------------------------------------------

def test_naive_default_architecture():
    """Built from `layers` = [1024, 512, 512, 256] (the reference uses the drop widths), ReLU
    between, none at the end."""
    model = NaiveEncoder()
    linears = [m for m in model.mlp if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (2048, 1024), (1024, 512), (512, 512), (512, 256), (256, 128)]
    assert sum(isinstance(m, torch.nn.ReLU) for m in model.mlp) == 4
    assert isinstance(model.mlp[-1], torch.nn.Linear)
    assert sum(p.numel() for p in model.parameters()) == 3_049_856


def test_naive_is_per_frame():
    model = make("naive")
    (v,) = videos("naive", [6])
    out = model(v[None], torch.ones((1, 6), dtype=torch.bool))[0]
    torch.testing.assert_close(out, model.mlp(v))


# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

def test_build_encoder_names():
    # One name per encoder, the config's: it reads the reference's temporal_stacking as stacking.
    assert set(ENCODERS) == {"resnet50", "stacking", "naive"}
    assert set(ENCODERS) == set(get_args(ModelConfig.model_fields["encoder"].annotation))
    assert isinstance(build_encoder("stacking", in_dim=12, channels=8, out_dim=4), StackingEncoder)
    alias = build_model(ModelConfig(encoder="temporal_stacking", conv_channels=8, output_dim=4),
                        None, input_shape=(12,), num_tasks=1)
    assert isinstance(alias.encoder.base, StackingEncoder) and alias.encoder.base.out_dim == 4
    assert isinstance(build_encoder("naive", in_dim=12, layers=(4,), out_dim=3), NaiveEncoder)
    assert isinstance(build_encoder("resnet50", in_channels=2, conv_channels=(2, 2), mlp_dim=2),
                      ResNet50Encoder)
    with pytest.raises(ValueError, match="unknown encoder 'resnet'.*naive, resnet50, stacking$"):
        build_encoder("resnet")


def test_default_parameter_counts():
    """The two Conv3d layers of resnet50 hold about 42.5 M parameters."""
    model = ResNet50Encoder()
    assert sum(p.numel() for p in model.conv.parameters()) == 42_468_864
    assert sum(p.numel() for p in model.parameters()) == 43_059_840


# ---------------------------------------------------------------------------------------------
# slow / gpu
# ---------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_resnet_full_size():
    """Real sizes: (T, 1024, 14, 14) layer3 maps, default widths, batched == per-frame loop."""
    torch.manual_seed(0)
    model = ResNet50Encoder().eval()
    g = torch.Generator().manual_seed(1)
    vids = [torch.rand((n, 1024, 14, 14), generator=g) for n in (3, 2)]
    x, mask = pad(vids, fill=1e6)
    with torch.no_grad():
        out = model(x, mask)
        assert out.shape == (2, 3, 128)
        assert torch.all(out[~mask] == 0) and torch.all(out >= 0) and out[mask].sum() > 0
        for i, v in enumerate(vids):
            torch.testing.assert_close(out[i, :len(v)], resnet_reference_loop(model, v, False),
                                       atol=1e-5, rtol=1e-4)


GPU_CASES = {
    **{f"{n}-small": (lambda n=n: make(n), SMALL[n][1]) for n in NAMES},
    "resnet50-default": (lambda: ResNet50Encoder(in_channels=64), (64, 7, 7)),
    "stacking-default": (lambda: StackingEncoder(), (2048,)),
    "naive-default": (lambda: NaiveEncoder(), (2048,)),
}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", list(GPU_CASES))
def test_cpu_and_cuda_agree(case):
    build, shape = GPU_CASES[case]
    torch.manual_seed(0)
    model = build().eval()
    g = torch.Generator().manual_seed(1)
    vids = [torch.randn((n, *shape), generator=g) for n in (6, 3)]
    x, mask = pad(vids, fill=1e6)
    dev = torch.device("cuda")
    # float64: exact agreement up to summation order, no TF32.
    m64 = model.double()
    cpu = m64(x.double(), mask)
    gpu = m64.to(dev)(x.double().to(dev), mask.to(dev))
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-9, rtol=1e-7)
    # float32 (TF32 may be on for convs): loose agreement; padding still exactly zero.
    m32 = m64.float()
    gpu32 = m32(x.to(dev), mask.to(dev))
    torch.testing.assert_close(gpu32.cpu(), cpu.float(), atol=2e-2, rtol=2e-2)
    assert torch.all(gpu32[~mask.to(dev)] == 0)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        amp = m32(x.to(dev), mask.to(dev))
    assert torch.all(amp[~mask.to(dev)] == 0) and torch.isfinite(amp).all()
