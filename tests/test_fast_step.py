"""The fast training step: the sync-free eager step and its pieces equal the simple
forms, skipped steps are skipped on the device, and (on a GPU) the CUDA-graph step equals the
eager one without a host sync."""

from __future__ import annotations

import gc
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from alignprog.config import load_config
from alignprog.data import load_dataset, make_loader
from alignprog.losses.progress import progress_loss
from alignprog.losses.vava import vava_loss_batch, vava_phi
from alignprog.models.encoders import StackingEncoder
from alignprog.models.mcn import MultiHeadEncoder
from alignprog.runtime import checks_values, trusted_inputs
from alignprog.sampling import gather_frames
from alignprog.training.graphs import (METRICS, StepGraphs, next_power_of_two, round_up,
                                       unsupported)
from alignprog.training.step import StepMetrics, clip_to, total_norm
from alignprog.training.trainer import Trainer, TrainingError

from helpers import TINY


def batches(trainer: Trainer, n: int):
    loader = make_loader(trainer.dataset, "train", batch_size=2, shuffle=False, drop_last=True)
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            return out
    return out


def test_dense_heads_equal_the_real_frames_path():
    torch.manual_seed(0)
    enc = MultiHeadEncoder(StackingEncoder(in_dim=6, channels=8, out_dim=4), 3, out_dim=4,
                           head_layers=(5,), attn_layers=(6,), drop_layers=(5,))
    x = torch.randn(2, 7, 6)
    mask = torch.arange(7)[None, :] < torch.tensor([[7], [4]])
    x[1, 4:] = float("nan")   # padding garbage reaches neither path
    outs, grads = [], []
    for dense in (False, True):
        enc.dense = dense
        enc.zero_grad()
        out = enc(x, mask)
        (out.embeddings.square().sum() + out.drop_logits.sum()).backward()
        outs.append(out)
        grads.append([p.grad.clone() for p in enc.parameters()])
    for name in ("embeddings", "attention", "drop_logits"):
        torch.testing.assert_close(getattr(outs[1], name), getattr(outs[0], name))
    assert torch.all(outs[1].embeddings[1, 4:] == 0)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_progress_loss_valid_mask_equals_the_loss_of_the_valid_samples():
    g = torch.Generator().manual_seed(1)
    pred, gt = torch.rand(9, generator=g), torch.rand(9, generator=g).clamp_min(0.05)
    valid = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1, 0], dtype=torch.bool)
    for weighted in (True, False):
        for kind in ("l1", "mse"):
            want = progress_loss(pred[valid], gt[valid], weighted=weighted, kind=kind)
            got = progress_loss(pred, gt, weighted=weighted, kind=kind, valid=valid)
            torch.testing.assert_close(got, want)
    # by hand: weights min(1/gt, 10) over the valid samples
    w = (1 / gt[valid]).clamp(max=10)
    hand = float((w * (pred[valid] - gt[valid]).abs()).sum() / w.sum())
    assert float(progress_loss(pred, gt, valid=valid)) == pytest.approx(hand, rel=1e-6)


def test_gather_frames_wider_than_needed_only_adds_zero_columns():
    emb = torch.randn(2, 10, 3)
    video, start, length = torch.tensor([0, 1, 1]), torch.tensor([2, 0, 7]), torch.tensor([3, 1, 3])
    exact = gather_frames(emb, video, start, length, 3)
    wide = gather_frames(emb, video, start, length, 8)
    torch.testing.assert_close(wide[:, :3], exact)
    assert torch.all(wide[:, 3:] == 0)
    torch.testing.assert_close(exact[0], emb[0, 2:5])
    torch.testing.assert_close(exact[2], emb[1, 7:10])
    assert torch.all(exact[1, 1:] == 0)


def test_vava_phi_of_a_device_step_equals_the_host_value():
    for schedule in ("sqrt", "exp"):
        for step in (0, 1, 2, 3, 8, 15, 99, 10_000):
            got = vava_phi(torch.tensor(step), schedule)
            assert float(got) == pytest.approx(vava_phi(step, schedule), rel=1e-12)
    x = torch.randn(2, 6, 3)
    mask = torch.ones(2, 6, dtype=torch.bool)
    torch.testing.assert_close(vava_loss_batch(x, mask, global_step=torch.tensor(24)),
                               vava_loss_batch(x, mask, global_step=24))


def test_clip_to_equals_clip_grad_norm():
    torch.manual_seed(2)
    params = [nn.Parameter(torch.randn(4, 3)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p) * 5
    ref = [p.grad.clone() for p in params]
    norm = total_norm(params, torch.device("cpu"))
    assert float(norm) == pytest.approx(
        math.sqrt(sum(float(g.square().sum()) for g in ref)), rel=1e-6)
    after = clip_to(params, norm, 1.5)
    ref_params = [nn.Parameter(p.detach().clone()) for p in params]
    for p, g in zip(ref_params, ref):
        p.grad = g.clone()
    nn.utils.clip_grad_norm_(ref_params, 1.5)
    for p, q in zip(params, ref_params):
        torch.testing.assert_close(p.grad, q.grad)
    assert float(after) == pytest.approx(1.5, rel=1e-5)
    assert float(total_norm([], torch.device("cpu"))) == 0.0


def test_step_metrics_read_device_scalars_once():
    m = StepMetrics(step=3, epoch=1, lam=2.0, samples=4, videos=2, frames=10,
                    alignment=torch.tensor(1.5), progress=torch.tensor(0.25),
                    total=torch.tensor(2.0), bad=torch.tensor(False),
                    grad_encoder=torch.tensor(3.0), grad_head=torch.tensor(0.5),
                    grad_encoder_clipped=torch.tensor(1.0), grad_head_clipped=torch.tensor(0.5),
                    extra={"lr": 0.1})
    out = m.read({"skipped_total": torch.tensor(7)})
    assert out == {"step": 3, "epoch": 1, "alignment": 1.5, "progress": 0.25, "lambda": 2.0,
                   "samples": 4, "videos": 2, "frames": 10, "total": 2.0,
                   "weighted_progress": 0.5, "grad_encoder": 3.0, "grad_head": 0.5,
                   "grad_encoder_clipped": 1.0, "grad_head_clipped": 0.5, "skipped": False,
                   "skipped_total": 7, "lr": 0.1}
    skipped = m.with_values(bad=torch.tensor(True)).read()
    assert skipped["skipped"] and skipped["total"] is None
    none = StepMetrics(step=1, epoch=0, lam=1.0, samples=0, videos=2, frames=5,
                       alignment=torch.tensor(1.0), no_loss=True).read()
    assert none["skipped"] and none["total"] is None and none["progress"] is None
    assert none["no_loss"] is True and none["weighted_progress"] is None
    assert "no_loss" not in out and "bad_terms" not in out
    # the product as the device makes it: float32 loss times lambda in float32
    m3 = m.with_values(progress=torch.tensor(0.1), lam=3.0).read()
    assert m3["weighted_progress"] == float(torch.tensor(0.1) * 3.0) != 0.1 * 3.0


def test_trusted_inputs_switch_off_value_checks_on_gpus_only():
    cpu = torch.zeros(2)
    with trusted_inputs():
        assert checks_values(cpu)
    assert checks_values(cpu)


def test_no_graphs_on_the_cpu_and_the_reasons():
    cfg = load_config(overrides=TINY | {"train.cuda_graphs": "on"})
    with pytest.warns(UserWarning, match="not CUDA"):
        trainer = Trainer(cfg, load_dataset(cfg.data), torch.device("cpu"))
    assert trainer.graphs is None
    assert unsupported(cfg, torch.device("cpu"), several_processes=False,
                       mode="auto") == "the device is not CUDA"
    reason = unsupported(cfg, torch.device("cuda"), several_processes=True, mode="on")
    assert reason is not None and "several processes" in reason
    assert round_up(450, 64) == 512 and round_up(448, 64) == 448
    assert [next_power_of_two(n) for n in (1, 2, 3, 5, 8, 9)] == [2, 2, 4, 8, 8, 16]


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(monkeypatch):
    cfg = load_config(overrides=TINY | {"train.max_bad_steps": 3, "train.method": "tcc"})
    trainer = Trainer(cfg, load_dataset(cfg.data), torch.device("cpu"))
    batch = batches(trainer, 1)[0]
    good = trainer.read(trainer.step_batch(batch))
    assert not good["skipped"] and good["skipped_total"] == 0
    before = [p.detach().clone() for p in trainer.model.parameters()]
    real = trainer.alignment_loss
    monkeypatch.setattr(trainer, "alignment_loss",
                        lambda *a, **k: real(*a, **k) * float("nan"))
    for i in range(2):
        rec = trainer.read(trainer.step_batch(batch))
        assert rec["skipped"] and rec["total"] is None and rec["skipped_total"] == i + 1
    for p, q in zip(trainer.model.parameters(), before):
        assert torch.equal(p, q)   # nothing moved, Adam's state neither
    with pytest.raises(TrainingError, match="3 consecutive steps"):
        trainer.read(trainer.step_batch(batch))
    monkeypatch.setattr(trainer, "alignment_loss", real)
    assert not trainer.read(trainer.step_batch(batch))["skipped"]
    assert int(trainer.bad_run) == 0 and trainer.skipped == 3


# --------------------------------------------------------------------------------------------
# GPU: the CUDA-graph step equals the eager step and never waits for the GPU

GPU = dict(TINY, **{"train.device": "cuda", "data.synthetic.dim": 64, "model.num_heads": 4,
                    "train.graph_frame_bucket": 32})
# the resnet50 encoder on tiny frame maps
RESNET50 = {"model.encoder": "resnet50", "data.layout": "frames",
            "data.synthetic.frame_channels": 8, "data.synthetic.frame_size": 3}


def run_steps(method: str, graphs: str, n: int = 5, sync_check: bool = False,
              extra: dict | None = None):
    """n steps on the first n batches; with `sync_check`, then the same batches twice more,
    the second time (every bucket's graph captured by then, auto's on a shape's second coming)
    with any host-device sync raising an error."""
    from alignprog.runtime import deterministic
    cfg = load_config(overrides=GPU | {"train.method": method, "train.cuda_graphs": graphs}
                      | (extra or {}))
    with deterministic(True):
        trainer = Trainer(cfg, load_dataset(cfg.data), torch.device("cuda"))
        data = [b.pin_memory() for b in batches(trainer, n)]
        records = [trainer.step_batch(batch) for batch in data]
        if sync_check:
            for batch in data:
                trainer.step_batch(batch)
            # Earlier tests' trainers (and their CUDA graphs) are freed now, not by a garbage
            # collection inside the checked steps: freeing a graph's memory pool syncs.
            gc.collect()
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                records = [trainer.step_batch(batch) for batch in data]
            finally:
                torch.cuda.set_sync_debug_mode("default")
        records = [trainer.read(r) for r in records]
    return trainer, records


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method,balance,head_input", [
    *[(m, b, "embeddings") for m in ("tcc", "lav", "vava") for b in ("gradient", "fixed")],
    # The head reading the base features leaves the fusion the alignment gradient alone,
    # whose float32 rounding in the attention weights moves with the padding by up to ~15%
    # for LAV and VAVA (their float64 gradients on the embeddings agree to 1e-12): TCC here.
    ("tcc", "gradient", "features")])
def test_graph_step_equals_the_eager_step(method, balance, head_input):
    # reduction "mean": O(1) losses, so float32 rounding (the graph pads the frames to a bucket
    # and its kernels sum in another order) stays small next to the values compared
    extra = {"loss.reduction": "mean", "progress.balance": balance,
             "progress.learnable.input": head_input}
    eager, rec_e = run_steps(method, "off", extra=extra)
    graph, rec_g = run_steps(method, "on", extra=extra)
    # the first step runs eagerly (it creates Adam's state), every later one is a replay
    assert graph.graphs is not None and graph.graphs.failed is None
    assert len(rec_g) >= 3 and graph.graphs.replays == len(rec_g) - 1
    for a, b in zip(rec_e, rec_g):
        for key in ("alignment", "progress", "lambda", "total", "grad_encoder", "grad_head"):
            assert b[key] == pytest.approx(a[key], rel=2e-3, abs=1e-6), (key, a, b)
    # Adam moves each weight by about lr = 3e-4 per step whatever its gradient's size, so a
    # weight whose gradient is rounding noise may differ by up to ~lr per step
    for p, q in zip(eager.model.parameters(), graph.model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1.5e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method,graphs,extra", [
    ("lav", "on", {}), ("vava", "on", {}), ("tcc", "off", {}), ("lav", "off", {}),
    ("lav", "on", {"progress.balance": "fixed"}), ("tcc", "off", {"progress.balance": "fixed"}),
    ("vava", "on", {"progress.learnable.input": "features"}),
    ("gtcc", "auto", {"progress.learnable.input": "features"}),
    ("gtcc", "auto", {}), ("lav", "auto", {"model.encoder": "naive"}),
    ("tcc", "auto", RESNET50), ("vava", "auto", RESNET50), ("lav", "off", RESNET50)])
def test_steps_do_not_wait_for_the_gpu(method, graphs, extra):
    trainer, records = run_steps(method, graphs, n=5, sync_check=True, extra=extra)
    assert all(not r["skipped"] for r in records)
    expect_graphs = graphs == "on" or (graphs == "auto" and method != "gtcc"
                                       and extra.get("model.encoder") != "resnet50")
    assert (trainer.graphs is not None and trainer.graphs.replays > 0) == expect_graphs
    if trainer.graphs is not None:
        assert trainer.graphs.failed is None
    # auto with resnet50: the eager step replays VAVA's loss alone
    expect_loss_graphs = (graphs == "auto" and method == "vava"
                          and extra.get("model.encoder") == "resnet50")
    assert (trainer.loss_graphs is not None
            and trainer.loss_graphs.replays > 0) == expect_loss_graphs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_graph_step_skips_a_non_finite_step_on_the_device():
    cfg = load_config(overrides=GPU | {"train.method": "tcc", "train.cuda_graphs": "on"})
    trainer = Trainer(cfg, load_dataset(cfg.data), torch.device("cuda"))
    batch = batches(trainer, 1)[0].pin_memory()
    trainer.step_batch(batch)
    trainer.step_batch(batch)                       # captured and replayed
    before = [p.detach().clone() for p in trainer.model.parameters()]
    bad = batch._map(lambda t: t.clone())
    bad.features[0, 0, 0] = float("nan")            # a NaN in a real frame
    rec = trainer.read(trainer.step_batch(bad))
    assert rec["skipped"] and rec["skipped_total"] == 1 and trainer.graphs.replays == 2
    for p, q in zip(trainer.model.parameters(), before):
        assert torch.equal(p, q)


def _graphs(bounded: bool, max_graphs: int = 2) -> tuple[StepGraphs, list]:
    """StepGraphs on the CPU with capture and replay stubbed: what it would capture, in order."""
    graphs = StepGraphs(nn.Linear(1, 1), None, None, None, torch.device("cpu"),
                        frame_bucket=64, max_graphs=max_graphs, targets_per_video=50,
                        bounded=bounded)
    captured: list = []

    def capture(key, host, samples, step, uploaded=None):
        captured.append(key)
        return SimpleNamespace(graph=SimpleNamespace(replay=lambda: None), inputs=None,
                               metrics=torch.zeros(len(METRICS)))

    graphs.capture, graphs.fill = capture, lambda *args: None
    return graphs, captured


def _batch(frames: int, longest: int, videos: int = 2, samples: int = 20):
    class Samples(SimpleNamespace):
        def __len__(self):
            return len(self.segment_length)

    host = SimpleNamespace(size=videos, features=torch.zeros(videos, frames, 1))
    return host, Samples(segment_length=torch.tensor([longest] * samples))


def test_graph_keys_pad_samples_to_the_most_and_widths_to_64():
    graphs, _ = _graphs(bounded=True)
    # 13 samples of 2 videos pad to 10 draws x 5 targets x 2 = 100, then to a multiple of 16;
    # the width to a power of two >= 64
    assert graphs.key(*_batch(100, 3, samples=13)) == (2, 128, 112, 64)
    assert graphs.key(*_batch(100, 70)) == (2, 128, 112, 128)
    assert graphs.key(*_batch(40, 30)) == (2, 64, 112, 64)       # never wider than the frames
    assert graphs.key(*_batch(600, 300, videos=3, samples=30)) == (3, 640, 160, 512)


def test_real_batches_share_one_sample_padding(monkeypatch):
    # On EgoProceL timelines a batch draws 48-100 progress samples: padded to the most any
    # batch can draw, they all share one sample size, so the keys differ in frames (and width)
    # only. The graphs from the config pad to draws x targets per draw.
    from alignprog.sampling import sample_segments
    from alignprog.training import graphs as graphs_module
    cfg = load_config(overrides={"data.synthetic.timelines": "egoprocel",
                                 "data.synthetic.dim": 16})
    monkeypatch.setattr(graphs_module, "unsupported", lambda *args, **kwargs: None)
    graphs = StepGraphs.create(nn.Linear(1, 1), None, None, None, cfg, torch.device("cpu"))
    lc = cfg.progress.learnable
    assert graphs.targets_per_video == lc.samples_per_video * lc.frames_per_segment == 50
    ds = load_dataset(cfg.data)
    loader = make_loader(ds, "train", batch_size=2, shuffle=True, drop_last=True)
    gen = torch.Generator().manual_seed(0)
    counts, keys = set(), set()
    for indices in loader.batch_sampler.batches()[:40]:
        host = loader.collate_fn([loader.dataset[i] for i in indices])
        samples = sample_segments(host.seg_start, host.seg_end, host.seg_foreground,
                                  host.seg_mask, generator=gen)
        key = graphs.key(host, samples)
        assert key[2] >= len(samples) and key[1] >= host.features.shape[1]
        counts.add(len(samples))
        keys.add(key)
    assert len(counts) > 3 and {k[2] for k in keys} == {112}


def test_auto_captures_a_shape_the_second_time_and_never_evicts():
    graphs, captured = _graphs(bounded=True)
    a, b, c = _batch(100, 5), _batch(200, 5), _batch(300, 5)
    got = [graphs.replay(*x, step=1) is not None for x in (a, a, b, c, b, c, c, a, b)]
    # a: eager, captured; b: eager; c: eager; b captured; c: both graphs held, so eager for good
    assert got == [False, True, False, False, True, False, False, True, True]
    assert captured == [graphs.key(*a), graphs.key(*b)] and graphs.replays == 4


def test_on_captures_every_shape_and_evicts_the_least_recently_used():
    graphs, captured = _graphs(bounded=False)
    a, b, c = _batch(100, 5), _batch(200, 5), _batch(300, 5)
    assert all(graphs.replay(*x, step=1) is not None for x in (a, b, c, a))
    assert captured == [graphs.key(*x) for x in (a, b, c, a)]   # c evicted a; a came back
    assert list(graphs.graphs) == [graphs.key(*c), graphs.key(*a)]


def test_a_failed_step_capture_warns_with_its_first_line_or_its_type():
    for message, shown in (("operation not permitted when stream is capturing\nmore",
                            "operation not permitted when stream is capturing"),
                           ("", "RuntimeError")):
        graphs, _ = _graphs(bounded=False)
        graphs.optimizer = SimpleNamespace(zero_grad=lambda set_to_none: None)

        def capture(*args, message=message):
            raise RuntimeError(message)

        graphs.capture = capture
        with pytest.warns(UserWarning, match=rf"CUDA graph capture failed \({shown}\)"):
            assert graphs.replay(*_batch(100, 5), step=1) is None
        assert graphs.failed == shown
        assert graphs.replay(*_batch(100, 5), step=1) is None   # eager from now on


def test_cuda_graphs_switch_reads_yaml_on_off():
    from alignprog.config import parse_overrides
    for raw, want in (("off", "off"), ("on", "on"), ("auto", "auto"), ("false", "off")):
        cfg = load_config(overrides=parse_overrides([f"train.cuda_graphs={raw}"]))
        assert cfg.train.cuda_graphs == want


def test_take_rows_equals_indexing_in_value_and_gradient():
    from alignprog.losses.common import take_rows
    x = torch.randn(3, 5, 4, dtype=torch.float32, requires_grad=True)
    idx = torch.tensor([0, 2, 0, 1])
    w = torch.randn(4, 5, 4)
    got = take_rows(x, idx)
    assert torch.equal(got, x[idx])                 # exact: one 1.0 per row in float64
    (g1,) = torch.autograd.grad((got * w).sum(), x)
    (g2,) = torch.autograd.grad((x[idx] * w).sum(), x)
    torch.testing.assert_close(g1, g2)
    # row 0 is taken twice: its gradient is the sum of both slabs
    torch.testing.assert_close(g1[0], w[0] + w[2])


def test_naive_dense_equals_the_real_frames_path_and_set_dense_switches_all():
    from alignprog.models import set_dense
    from alignprog.models.encoders import NaiveEncoder, ResNet50Encoder
    torch.manual_seed(3)
    enc = NaiveEncoder(in_dim=6, layers=(5, 4), out_dim=3)
    x = torch.randn(2, 5, 6)
    mask = torch.arange(5)[None, :] < torch.tensor([[5], [2]])
    x[1, 2:] = float("nan")
    outs, grads = [], []
    for dense in (False, True):
        enc.dense = dense
        enc.zero_grad()
        out = enc(x, mask)
        out.square().sum().backward()
        outs.append(out)
        grads.append([p.grad.clone() for p in enc.parameters()])
    torch.testing.assert_close(outs[1], outs[0])
    assert torch.all(outs[1][1, 2:] == 0)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    model = MultiHeadEncoder(NaiveEncoder(in_dim=6, layers=(5,), out_dim=4), 2, out_dim=4,
                             head_layers=(3,), attn_layers=(3,))
    set_dense(model)
    assert model.dense and model.base.dense
    small = ResNet50Encoder(in_channels=3, conv_channels=(4, 2), mlp_dim=4, out_dim=4)
    set_dense(small)
    assert small.dense
    set_dense(model, False)
    assert not model.dense and not model.base.dense


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_an_eager_step_between_graph_steps_starts_from_clean_gradients():
    """A batch without progress samples runs eagerly between replays; the replays leave their
    gradient buffers in .grad, which the eager step must not add to."""
    def no_foreground(batch):
        out = batch._map(lambda t: t.clone())
        out.seg_foreground[:] = False
        return out

    params, records = {}, {}
    for graphs in ("off", "on"):
        cfg = load_config(overrides=GPU | {"train.method": "tcc", "train.cuda_graphs": graphs,
                                           "loss.reduction": "mean"})
        trainer = Trainer(cfg, load_dataset(cfg.data), torch.device("cuda"))
        data = batches(trainer, 3)
        records[graphs] = [trainer.read(trainer.step_batch(batch.pin_memory()))
                           for batch in (data[0], data[1], no_foreground(data[2]), data[1])]
        if graphs == "on":
            assert trainer.graphs.replays == 2
        params[graphs] = [p.detach().clone() for p in trainer.model.parameters()]
    for a, b in zip(records["off"], records["on"]):
        # a gradient left over from the replay before would show in the eager step's norm
        for key in ("alignment", "grad_encoder", "grad_head"):
            assert b[key] == pytest.approx(a[key], rel=2e-3, abs=1e-6), (key, a, b)
    assert records["on"][2]["progress"] is None and records["on"][2]["grad_head"] == 0
    for p, q in zip(params["off"], params["on"]):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=1.5e-3)


def test_broadcast_distances_equal_cdist_in_blocks(monkeypatch):
    """The GPU path of the exact distances (blocks of broadcast differences), run on the CPU
    with a tiny block so that several blocks are joined."""
    from alignprog.losses import common
    x, y = torch.randn(2, 7, 5, dtype=torch.float64), torch.randn(2, 4, 5, dtype=torch.float64)
    want = torch.cdist(x, y, compute_mode="donot_use_mm_for_euclid_dist").square()
    monkeypatch.setattr(common, "DIFF_BLOCK", 2 * 4 * 5 * 3)      # 3 rows per block
    torch.testing.assert_close(common._direct_sq_distances(x, y), want)
    monkeypatch.setattr(common, "broadcast_distances", lambda t: True)
    xg, yg = x.clone().requires_grad_(), y.clone().requires_grad_()
    d = common.pairwise_distances(xg, yg)
    torch.testing.assert_close(d, want.sqrt())
    assert torch.autograd.gradcheck(common.pairwise_distances, (xg, yg))
