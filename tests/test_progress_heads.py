"""Progress heads (docs/algorithms.md#progress-heads): batching, masking, per-prefix protocol,
streaming, shapes."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from alignprog.models.progress_heads import (
    HEADS,
    POSITIONS,
    DilatedConvProgressHead,
    GRUProgressHead,
    TransformerProgressHead,
    build_progress_head,
)

D = 12  # small input width keeps the file fast; the defaults are checked in the count tests
ARCHS = tuple(HEADS)
ALL = list(itertools.product(ARCHS, POSITIONS))
DENSE = [(a, p) for a, p in ALL if a != "mean"]


def make(arch: str, position: str, *, seed: int = 0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    head = build_progress_head(arch, in_dim=D, hidden_dim=16, position=position, **kw)
    return head.to(dtype).eval()


def padded(lengths: list[int], *, seed: int = 1, fill: float = 0.0, dtype=torch.float32):
    """Left-aligned segments of the given lengths, padding set to `fill`: (N, L, D), (N,)."""
    g = torch.Generator().manual_seed(seed)
    n, t_max = len(lengths), max(lengths)
    x = torch.full((n, t_max, D), fill, dtype=dtype)
    for i, t in enumerate(lengths):
        x[i, :t] = torch.randn(t, D, generator=g, dtype=dtype)
    return x, torch.tensor(lengths)


LENGTHS = [1, 9, 4, 13, 2, 13, 7]


@pytest.mark.parametrize("arch,position", ALL)
def test_shapes_range_and_dense(arch, position):
    head = make(arch, position)
    x, lengths = padded(LENGTHS)
    y = head(x, lengths)
    assert y.shape == (len(LENGTHS),) and y.dtype == x.dtype
    assert ((y >= 0) & (y <= 1)).all()
    if arch == "mean":
        with pytest.raises(ValueError, match="no dense output"):
            head(x, lengths, dense=True)
        return
    d = head(x, lengths, dense=True)
    assert d.shape == x.shape[:2] and ((d >= 0) & (d <= 1)).all()
    beyond = torch.arange(x.shape[1])[None] >= lengths[:, None]
    assert (d[beyond] == 0).all() and (d[~beyond] > 0).all()
    torch.testing.assert_close(d[torch.arange(len(LENGTHS)), lengths - 1], y, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch,position", ALL)
def test_batched_equals_loop_and_padding_is_ignored(arch, position):
    head = make(arch, position)
    x, lengths = padded(LENGTHS)
    dense = arch != "mean"
    y = head(x, lengths)
    d = head(x, lengths, dense=True) if dense else None
    for i, t in enumerate(LENGTHS):
        alone = x[i:i + 1, :t]                                      # (1, t, D), no padding at all
        torch.testing.assert_close(head(alone, lengths[i:i + 1]), y[i:i + 1], atol=1e-5, rtol=0)
        if dense:
            torch.testing.assert_close(head(alone, lengths[i:i + 1], dense=True)[0], d[i, :t],
                                       atol=1e-5, rtol=0)
    for fill in (1e6, float("nan")):
        xf, _ = padded(LENGTHS, fill=fill)
        torch.testing.assert_close(head(xf, lengths), y, atol=0, rtol=0)
        if dense:
            torch.testing.assert_close(head(xf, lengths, dense=True), d, atol=0, rtol=0)


@pytest.mark.parametrize("position", POSITIONS)
def test_gru_packed_path_equals_padded_path(position):
    """packed=True (pack_padded_sequence) and the default padded call agree, values and
    gradients."""
    padded_head, packed_head = make("gru", position), make("gru", position, packed=True)
    x, lengths = padded(LENGTHS, fill=float("nan"))
    for dense in (False, True):
        xs = [x.clone().requires_grad_(True) for _ in range(2)]
        ys = [h(xi, lengths, dense=dense) for h, xi in zip((padded_head, packed_head), xs)]
        torch.testing.assert_close(ys[1], ys[0], atol=1e-6, rtol=0)
        for y in ys:
            (y * torch.linspace(0.5, 1.5, y.numel()).view_as(y)).sum().backward()
        torch.testing.assert_close(xs[1].grad, xs[0].grad, atol=1e-6, rtol=0)
        for (name, a), b in zip(padded_head.named_parameters(), packed_head.parameters()):
            torch.testing.assert_close(b.grad, a.grad, atol=1e-5, rtol=1e-5, msg=name)
            a.grad = b.grad = None


def prefixes(seg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """All prefixes of one (T, D) segment, batched: x (T, T, D) with row t = seg[:t+1],
    lengths 1..T."""
    t = seg.shape[0]
    keep = torch.arange(t)[None, :] <= torch.arange(t)[:, None]     # (T, T)
    return seg[None].expand(t, t, -1) * keep[..., None], torch.arange(1, t + 1)


@pytest.mark.parametrize("arch,position", DENSE)
def test_prefix_protocol_dense_equivalence_only_for_causal_features(arch, position):
    """One dense pass equals the per-prefix outputs iff the feature is causal
    (docs/algorithms.md#online-protocol,
    docs/reference-bugs.md#dense-output-differs-from-prefix-output)."""
    head = make(arch, position)
    seg = padded([20], seed=3)[0][0]                                # (T, D)
    per_prefix = head(*prefixes(seg))                               # (T,) output of head(seg[:t+1])
    dense = head(seg[None], torch.tensor([20]), dense=True)[0]      # (T,)
    if position == "relative":
        # tau/T differs between prefix and whole segment everywhere except the last frame.
        assert (per_prefix[:-1] - dense[:-1]).abs().max() > 1e-3
        torch.testing.assert_close(per_prefix[-1], dense[-1], atol=1e-5, rtol=0)
    else:
        # Includes the 1-frame prefix, which the fork gets wrong for transformer/dilated
        # (docs/reference-bugs.md#short-prefix-skips-blocks).
        torch.testing.assert_close(per_prefix, dense, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch,position", ALL)
def test_step_reproduces_per_prefix_forward(arch, position):
    head = make(arch, position)
    expect_streamable = arch == "mean" or position != "relative"
    assert head.streamable == expect_streamable
    # 140 frames > the 2 * 32 span of the widest dilated ring buffer, so the buffers wrap around.
    t = 140 if arch == "dilated_conv" and expect_streamable else 24
    segs = torch.randn(3, t, D, generator=torch.Generator().manual_seed(5))
    state = head.init_state(3)
    with torch.no_grad():
        streamed = []
        for tau in range(t):
            p, state = head.step(segs[:, tau], state)
            assert p.shape == (3,)
            streamed.append(p)
        streamed = torch.stack(streamed, 1)                        # (3, T)
        for i in range(3):
            torch.testing.assert_close(streamed[i], head(*prefixes(segs[i])), atol=1e-5, rtol=0)


def test_gru_relative_matches_float64_reference_of_the_pipeline_equations():
    """docs/algorithms.md#gru-head: x_tau = [s_tau; tau/T], learnable h0, GRU, MLP 64->32->1,
    sigmoid."""
    head = make("gru", "relative", dtype=torch.float64)
    with torch.no_grad():
        head.h0.normal_()  # a non-zero learned h0 must be used as the initial state
    x, lengths = padded([1, 5, 11], dtype=torch.float64)
    got = head(x, lengths)
    g = head.gru
    w_ih, w_hh, b_ih, b_hh = g.weight_ih_l0, g.weight_hh_l0, g.bias_ih_l0, g.bias_hh_l0
    for i, t in enumerate(lengths.tolist()):
        h = head.h0[0, 0]
        for tau in range(t):
            xt = torch.cat([x[i, tau], torch.tensor([tau / t], dtype=torch.float64)])  # (D+1,)
            gi, gh = w_ih @ xt + b_ih, w_hh @ h + b_hh   # rows ordered (r, z, n) as in nn.GRU
            r = torch.sigmoid(gi[:16] + gh[:16])
            z = torch.sigmoid(gi[16:32] + gh[16:32])
            n = torch.tanh(gi[32:] + r * gh[32:])
            h = (1 - z) * n + z * h
        l1, l2 = head.mlp[0], head.mlp[2]
        ref = torch.sigmoid(l2.weight @ torch.relu(l1.weight @ h + l1.bias) + l2.bias)[0]
        torch.testing.assert_close(got[i], ref, atol=1e-12, rtol=0)


def test_parameter_counts_of_default_heads():
    def count(m):
        return sum(p.numel() for p in m.parameters())
    # GRU(129 -> 64): 3*64*129 + 3*64*64 + 2*3*64 = 37440; MLP 64*32+32 + 32+1 = 2113; h0 64.
    assert count(build_progress_head("gru")) == 37440 + 2113 + 64 == 39617  # "~39.6K"
    assert count(build_progress_head("gru", learnable_h0=False)) == 39617 - 64
    assert count(build_progress_head("gru", position="none")) == 39617 - 3 * 64
    # Mean: 129*64+64 + 64*32+32 + 33 (docs/algorithms.md#mean-head).
    assert count(build_progress_head("mean")) == 8320 + 2080 + 33 == 10433
    # Transformer: in 129*64+64 + LN 128; block LN 128 + 4*(64*64+64) + LN 128 + 64*128+128
    # + 128*64+64.
    assert count(build_progress_head("transformer")) == 8320 + 128 + 2 * 33472 + 2113 == 77505
    # Dilated: in 8320; block conv 64*64*3+64 + LN 128 + 1x1 64*64+64 = 16640, six of them.
    assert count(build_progress_head("dilated_conv")) == 8320 + 6 * 16640 + 2113 == 110273


@pytest.mark.parametrize("arch,position", ALL)
def test_gradients_reach_every_parameter_and_the_input(arch, position):
    head = make(arch, position).train()
    x, lengths = padded(LENGTHS)
    x.requires_grad_(True)
    head(x, lengths).sum().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    pad = torch.arange(x.shape[1])[None] >= lengths[:, None]
    assert (x.grad[~pad].abs().sum(-1) > 0).all()   # progress gradients flow into the encoder
    assert (x.grad[pad] == 0).all()


def test_learnable_h0_is_a_zero_initialised_parameter():
    head = build_progress_head("gru")
    assert isinstance(head.h0, torch.nn.Parameter) and head.h0.shape == (1, 1, 64)
    assert (head.h0 == 0).all()
    assert build_progress_head("gru", learnable_h0=False).h0 is None


def test_transformer_alibi_slopes():
    head = build_progress_head("transformer")
    assert isinstance(head, TransformerProgressHead)
    torch.testing.assert_close(head.alibi_slopes, torch.tensor([1.0, 0.5, 0.25, 0.125]))
    torch.testing.assert_close(head.mlp[-1].bias, torch.tensor([-2.0]))  # readout bias init -2


@pytest.mark.parametrize("arch,position", DENSE)
def test_causality_by_gradient(arch, position):
    head = make(arch, position)
    x, lengths = padded([15])
    x.requires_grad_(True)
    i = 6
    head(x, lengths, dense=True)[0, i].backward()
    per_frame = x.grad[0].abs().sum(-1)                             # (L,)
    assert (per_frame[i + 1:] == 0).all() and (per_frame[:i + 1] > 0).all()


def test_dilated_receptive_field_is_127_frames():
    head = make("dilated_conv", "none")
    assert isinstance(head, DilatedConvProgressHead) and head.receptive_field == 127
    x, lengths = padded([160])
    x.requires_grad_(True)
    i = 150
    head(x, lengths, dense=True)[0, i].backward()
    reach = x.grad[0].abs().sum(-1) > 0                             # (L,)
    assert reach.nonzero().flatten().tolist() == list(range(i - 126, i + 1))


def test_build_names_and_errors():
    assert set(HEADS) == {"gru", "mean", "transformer", "dilated_conv"}
    for arch, cls in HEADS.items():
        assert type(build_progress_head(arch, in_dim=D)) is cls
    assert isinstance(build_progress_head("gru"), GRUProgressHead)
    with pytest.raises(ValueError,
                       match="unknown progress head arch 'lstm'; choose one of gru, mean"):
        build_progress_head("lstm")
    with pytest.raises(ValueError,
                       match="unknown progress position feature 'abs'; choose one of relative"):
        build_progress_head("gru", position="abs")
    with pytest.raises(ValueError, match="BatchNorm is not causal"):
        build_progress_head("dilated_conv", norm="batch")
    with pytest.raises(ValueError, match="divisible"):
        build_progress_head("transformer", hidden_dim=30)


def test_count_feature_matches_frame_count_at_the_last_frame():
    # log(1+T)/log(1+300) (docs/algorithms.md#position-features): T = 1 -> 0.121, 5 -> 0.314,
    # 10 -> 0.420, 300 -> 1.
    from alignprog.models.progress_heads import _count_feature
    tau = torch.tensor([0.0, 4.0, 9.0, 299.0])
    torch.testing.assert_close(_count_feature(tau, 300), torch.tensor([0.121, 0.314, 0.420, 1.0]),
                               atol=5e-4, rtol=0)
    assert math.isclose(float(_count_feature(torch.tensor(0.0), 300)), math.log(2) / math.log(301),
                        rel_tol=1e-6)


@pytest.mark.parametrize("arch", ARCHS)
def test_input_validation(arch):
    head = make(arch, "count")
    x, _ = padded([3, 5])
    for bad, msg in [(torch.tensor([0, 5]), r"\[1, L=5\]"), (torch.tensor([3, 6]), r"\[1, L=5\]"),
                     (torch.tensor([3.0, 5.0]), "integer"), (torch.tensor([3]), "shape")]:
        with pytest.raises(ValueError, match=msg):
            head(x, bad)
    with pytest.raises(ValueError, match="feature dim"):
        head(x[..., :-1], torch.tensor([3, 5]))
    with pytest.raises(ValueError, match=r"\(N, L, D\)"):
        head(x[0], torch.tensor([3]))
    assert head(x[:0], torch.tensor([], dtype=torch.long)).shape == (0,)


@pytest.mark.parametrize("arch", ARCHS)
def test_float64_and_cpu_autocast(arch):
    x, lengths = padded(LENGTHS)
    y64 = make(arch, "count", dtype=torch.float64)(x.double(), lengths)
    assert y64.dtype == torch.float64
    head = make(arch, "count")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = head(x, lengths)
    assert torch.isfinite(y).all() and ((y >= 0) & (y <= 1)).all()
    assert (y.float() - y64.float()).abs().max() < 0.05


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch,position", ALL)
def test_cpu_and_cuda_agree(arch, position):
    cpu, gpu = make(arch, position), make(arch, position).to("cuda")
    x, lengths = padded(LENGTHS)
    xg, lg = x.cuda(), lengths.cuda()
    torch.testing.assert_close(gpu(xg, lg).cpu(), cpu(x, lengths), atol=1e-4, rtol=0)
    if arch != "mean":
        torch.testing.assert_close(gpu(xg, lg, dense=True).cpu(), cpu(x, lengths, dense=True),
                                   atol=1e-4, rtol=0)
    state_c, state_g = cpu.init_state(2), gpu.init_state(2)
    for tau in range(3):
        pc, state_c = cpu.step(x[:2, tau], state_c)
        pg, state_g = gpu.step(xg[:2, tau], state_g)
        assert pg.device.type == "cuda"
        torch.testing.assert_close(pg.cpu(), pc, atol=1e-4, rtol=0)
