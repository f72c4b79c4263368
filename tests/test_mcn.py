"""The multi-head attention-fusion encoder (docs/algorithms.md#mcn-attention-fusion) and
build_model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from alignprog.config import ModelConfig, ProgressConfig
from alignprog.models import AlignmentModel, MultiHeadEncoder, SingleHeadEncoder, build_model
from alignprog.models.mcn import GroupedMLP

SMALL = dict(conv_channels=32, output_dim=16, head_layers=[24, 8, 12], attn_layers=[20, 12],
             drop_layers=[12, 10])


def small_model(method: str | None = None, **kw) -> AlignmentModel:
    torch.manual_seed(0)
    cfg = ModelConfig(**(SMALL | kw))
    return build_model(cfg, ProgressConfig(), input_shape=(24,), num_tasks=3, method=method)


def padded_pair(d_in=24, n1=9, n2=5):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, n1, d_in, generator=g)
    mask = torch.zeros(2, n1, dtype=torch.bool)
    mask[0] = True
    mask[1, :n2] = True
    x[1, n2:] = 1e3  # garbage in padding must not matter
    return x, mask


def test_grouped_mlp_equals_separate_mlps():
    torch.manual_seed(0)
    g = GroupedMLP(3, [5, 7, 4])
    x = torch.randn(6, 5)
    out = g(x)                                               # (N, H, out)
    for h in range(3):
        seq = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 4))
        with torch.no_grad():
            seq[0].weight.copy_(g.weights[0][h].T)
            seq[0].bias.copy_(g.biases[0][h])
            seq[2].weight.copy_(g.weights[1][h].T)
            seq[2].bias.copy_(g.biases[1][h])
        torch.testing.assert_close(out[:, h], seq(x))


def test_mcn_matches_a_per_frame_float64_loop():
    model = small_model().double().eval()
    enc: MultiHeadEncoder = model.encoder
    x, mask = padded_pair()
    x = x.double()
    out = enc(x, mask)
    z = enc.base(x, mask)
    for b in range(2):
        for t in range(int(mask[b].sum())):
            heads = []
            for h in range(enc.num_heads):
                v = z[b, t]
                for i, (w, bias) in enumerate(zip(enc.heads.weights, enc.heads.biases)):
                    v = v @ w[h] + bias[h]
                    if i < len(enc.heads.weights) - 1:
                        v = torch.relu(v)
                heads.append(v)
            c = torch.cat(heads)                             # frame t's own H embeddings
            a = torch.softmax(enc.attention(c), dim=-1)
            u = sum(a[h] * heads[h] for h in range(enc.num_heads))
            torch.testing.assert_close(out.attention[b, t], a)
            torch.testing.assert_close(out.embeddings[b, t], u)


def test_attention_sums_to_one_and_padding_is_zero():
    model = small_model()
    x, mask = padded_pair()
    out = model(x, mask)
    sums = out.attention.sum(-1)
    torch.testing.assert_close(sums[mask], torch.ones(int(mask.sum())))
    assert (out.attention[~mask] == 0).all() and (out.embeddings[~mask] == 0).all()
    assert out.embeddings.shape == (2, 9, 16) and out.attention.shape == (2, 9, 3)


def test_padding_invariance_of_the_whole_encoder():
    model = small_model(method="gtcc").eval()
    assert model.encoder.drop is not None
    x, mask = padded_pair()
    batched = model(x, mask)
    alone = model(x[1:, :5], mask[1:, :5])
    torch.testing.assert_close(batched.embeddings[1, :5], alone.embeddings[0], atol=1e-6,
                               rtol=1e-5)
    torch.testing.assert_close(batched.drop_logits[1], alone.drop_logits[0], atol=1e-6,
                               rtol=1e-5)


def test_drop_branch_is_the_mean_over_real_frames():
    model = small_model(dropping=True)
    x, mask = padded_pair()
    out = model(x, mask)
    assert out.drop_logits.shape == (2, 17)
    per_frame = model.encoder.drop(out.embeddings[1, :5])
    torch.testing.assert_close(out.drop_logits[1], per_frame.mean(0))


def test_gradients_reach_every_parameter():
    model = small_model(dropping=True)
    x, mask = padded_pair()
    out = model(x, mask)
    head = model.progress_head
    lengths = torch.tensor([4, 2])
    seg = out.embeddings[:, :4]
    loss = out.embeddings.sum() + out.drop_logits.sum() + head(seg, lengths).sum()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_build_model_variants():
    model = build_model(ModelConfig(), ProgressConfig(), input_shape=(2048,), num_tasks=16)
    assert isinstance(model.encoder, MultiHeadEncoder) and model.encoder.num_heads == 16
    assert model.encoder.drop is None
    assert type(model.progress_head).__name__ == "GRUProgressHead"
    assert build_model(ModelConfig(), None, input_shape=(2048,), num_tasks=16,
                       method="gtcc").encoder.drop is not None
    single = build_model(ModelConfig(mcn=False), ProgressConfig(enabled=False),
                         input_shape=(2048,))
    assert isinstance(single.encoder, SingleHeadEncoder) and single.progress_head is None
    assert build_model(ModelConfig(num_heads=4), None, input_shape=(2048,),
                       num_tasks=16).encoder.num_heads == 4
    with pytest.raises(ValueError, match="reads the frames layout"):
        build_model(ModelConfig(encoder="resnet50"), None, input_shape=(2048,))
    mean = build_model(ModelConfig(), ProgressConfig.model_validate(
        {"learnable": {"use_gru": False}}), input_shape=(2048,))
    assert type(mean.progress_head).__name__ == "MeanPoolProgressHead"


@pytest.mark.gpu
def test_cpu_and_cuda_agree():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = small_model(dropping=True).eval()
    x, mask = padded_pair()
    cpu = model(x, mask)
    gpu = model.cuda()(x.cuda(), mask.cuda())
    torch.testing.assert_close(gpu.embeddings.cpu(), cpu.embeddings, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gpu.attention.cpu(), cpu.attention, atol=1e-4, rtol=1e-4)


def test_bf16_autocast_on_cpu():
    model = small_model(dropping=True)
    x, mask = padded_pair()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, mask)
    assert torch.isfinite(out.embeddings.float()).all()
    torch.testing.assert_close(out.attention.float().sum(-1)[mask],
                               torch.ones(int(mask.sum())), atol=1e-2, rtol=0)
