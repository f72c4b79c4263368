"""FLOP counts (benchmarks.flops): hand-derived numbers, checked against PyTorch's own
FlopCounterMode run on the real modules, forward and forward + backward."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from alignprog.config import ModelConfig
from alignprog.models import build_model
from alignprog.models.encoders import NaiveEncoder, ResNet50Encoder, StackingEncoder
from benchmarks.flops import conv3d_flops, encoder_flops, measure_matmul_tflops, model_flops


def counted(module, x, mask, *, backward: bool = False) -> int:
    """FLOPs FlopCounterMode sees in one forward (and backward) of `module` on (x, mask)."""
    with FlopCounterMode(display=False) as counter:
        out = module(x, mask)
        emb = getattr(out, "embeddings", out)
        if backward:
            loss = emb.square().sum()
            if getattr(out, "drop_logits", None) is not None:  # the drop branch's own backward
                loss = loss + out.drop_logits.sum()
            loss.backward()
    return counter.get_total_flops()


def tiny_resnet(**kw) -> ResNet50Encoder:
    torch.manual_seed(0)
    return ResNet50Encoder(in_channels=6, conv_channels=(8, 4), mlp_dim=8, out_dim=5, **kw)


def one_video(frames: int, *shape: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(1, frames, *shape)                   # (1, T, *F)
    return x, torch.ones(1, frames, dtype=torch.bool)    # (1, T)


def test_resnet50_forward_by_hand():
    """in 6, conv (8, 4), mlp 8, out 5, k = 2, 5x5 maps, 7 frames."""
    enc = tiny_resnet()
    f, hw = 7, 25
    conv1 = 2 * f * hw * (3 * 8) * 6 * 9      # every frame through the 3 temporal taps at once
    conv2 = 2 * f * hw * (2 * 4) * (2 * 8) * 9  # (k*c2, k*c1, 3, 3) per stack
    mlp = 2 * f * (4 * 8 + 8 * 8 + 8 * 5)
    assert encoder_flops(enc, f, spatial=(5, 5)) == conv1 + conv2 + mlp
    # the forward also runs conv1 on one zero frame before the video (frame -1 of the stacks)
    zero_frame = conv1 // f
    assert counted(enc, *one_video(f, 6, 5, 5)) == conv1 + conv2 + mlp + zero_frame
    # training: backward is 2x forward, but conv1 computes no input gradient
    assert encoder_flops(enc, f, spatial=(5, 5), training=True) == 3 * (conv1 + conv2 + mlp) - conv1
    assert counted(enc.train(), *one_video(f, 6, 5, 5), backward=True) == \
        encoder_flops(enc, f, spatial=(5, 5), training=True) + 2 * zero_frame


@pytest.mark.parametrize("k, reference_window", [(1, False), (3, False), (2, True)])
def test_resnet50_other_windows_match_the_counter(k, reference_window):
    enc = tiny_resnet(temporal_depth=k, reference_window=reference_window)
    taps = 1 if k == 1 else 3  # k = 1 needs only conv1's centre tap
    conv1 = 2 * 12 * taps * 8 * 6 * 9  # per frame
    assert encoder_flops(enc, 6, spatial=(4, 3)) == (6 * conv1
                                                     + 2 * 6 * 12 * (k * 4) * (k * 8) * 9
                                                     + 2 * 6 * (4 * 8 + 8 * 8 + 8 * 5))
    halo = k if reference_window else k - 1  # zero frames conv1 also runs, before the video
    assert counted(enc, *one_video(6, 6, 4, 3)) == encoder_flops(enc, 6, spatial=(4, 3)) \
        + halo * conv1


def test_conv3d_formulation_count():
    """The documented Conv3d over (C, k, H, W) stacks: FlopCounterMode on the modules themselves."""
    enc = tiny_resnet()
    f = 7
    stack = torch.randn(f, 6, 2, 5, 5)                                   # (n, C, k, H, W)
    with FlopCounterMode(display=False) as counter:
        enc.mlp(enc.conv(stack).amax(dim=(2, 3, 4)))
    assert conv3d_flops(enc, f, spatial=(5, 5)) == counter.get_total_flops()
    assert conv3d_flops(enc, f, spatial=(5, 5)) == (2 * f * 25 * 2 * 27 * (8 * 6 + 4 * 8)
                                                    + 2 * f * (4 * 8 + 8 * 8 + 8 * 5))


def test_resnet50_default_is_pinned():
    """Default sizes, per frame: conv1 2*196*3*1024*1024*9 + conv2 2*196*2048*1024*9 + MLP
    2*(512*512*2 + 512*128); the documented padded Conv3d runs 1.8x that."""
    enc = ResNet50Encoder()
    assert encoder_flops(enc, 1) == 11_098_128_384 + 7_398_752_256 + 1_179_648
    assert encoder_flops(enc, 830) == 830 * 18_498_060_288
    assert conv3d_flops(enc, 1) == 2 * 196 * 2 * 27 * (1024 * 1024 + 512 * 1024) + 1_179_648
    assert encoder_flops(enc, 1, training=True) == 3 * 18_498_060_288 - 11_098_128_384


def test_stacking_and_naive_match_the_counter():
    stack = StackingEncoder(in_dim=12, channels=8, out_dim=4)
    # 12->8 (k=2), 8->4 (k=3), then 5 x 4->4 (k=3)
    by_hand = 2 * 9 * (12 * 8 * 2 + 8 * 4 * 3 + 5 * 4 * 4 * 3)
    assert encoder_flops(stack, 9) == by_hand
    assert counted(stack, *one_video(9, 12)) == by_hand
    assert counted(stack.train(), *one_video(9, 12), backward=True) == \
        encoder_flops(stack, 9, training=True) == 3 * by_hand - 2 * 9 * 12 * 8 * 2
    naive = NaiveEncoder(in_dim=12, layers=(10, 8), out_dim=4)
    by_hand = 2 * 9 * (12 * 10 + 10 * 8 + 8 * 4)
    assert encoder_flops(naive, 9) == by_hand == counted(naive, *one_video(9, 12))
    assert counted(naive.train(), *one_video(9, 12), backward=True) == \
        encoder_flops(naive, 9, training=True)


@pytest.mark.parametrize("mcn, method", [(True, "gtcc"), (True, "tcc"), (False, "gtcc")])
def test_whole_model_matches_the_counter(mcn, method):
    cfg = ModelConfig(encoder="naive", naive_layers=[16], output_dim=8, num_heads=3, mcn=mcn,
                      head_layers=[12, 6, 10], attn_layers=[14, 9], drop_layers=[7, 5])
    torch.manual_seed(0)
    model = build_model(cfg, None, input_shape=(20,), method=method)
    x, mask = one_video(11, 20)
    assert model_flops(model, 11) == counted(model, x, mask)
    assert model_flops(model.encoder, 11) == model_flops(model, 11)
    assert model_flops(model, 11, training=True) == counted(model.train(), x, mask, backward=True)
    if mcn and method == "tcc":
        base = 2 * 11 * (20 * 16 + 16 * 8)
        heads = 2 * 11 * 3 * (8 * 12 + 12 * 6 + 6 * 10 + 10 * 8)
        attention = 2 * 11 * (24 * 14 + 14 * 9 + 9 * 3)
        assert model_flops(model, 11) == base + heads + attention


def test_the_heads_own_base_encoder_counts_too():
    # progress.learnable.input=separate (the default): a second base encoder, trained by the
    # progress loss alone, runs every frame as well
    from alignprog.config import ProgressConfig
    cfg = ModelConfig(encoder="naive", naive_layers=[16], output_dim=8, num_heads=3)
    torch.manual_seed(0)
    model = build_model(cfg, ProgressConfig(), input_shape=(20,), method="tcc")
    assert model.progress_base is not None
    x, mask = one_video(11, 20)
    own = 2 * 11 * (20 * 16 + 16 * 8)
    assert model_flops(model, 11) == model_flops(model.encoder, 11) + own
    with FlopCounterMode(display=False) as counter:
        out = model.train()(x, mask)
        (out.embeddings.square().sum() + out.progress_features.square().sum()).backward()
    assert model_flops(model, 11, training=True) == counter.get_total_flops()


def test_unknown_encoder_is_refused():
    with pytest.raises(TypeError, match="no FLOP count for Linear"):
        encoder_flops(torch.nn.Linear(2, 2), 3)


def test_matmul_rate_on_the_cpu():
    rate = measure_matmul_tflops("cpu", torch.float32, size=128, iters=2)
    assert math.isfinite(rate) and rate > 0
    assert measure_matmul_tflops("cpu", torch.float32, tf32=True, size=64, iters=1) > 0
