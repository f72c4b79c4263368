"""The alignment loss as CUDA graphs beside an eager encoder (`training.loss_graphs`): when it is
used, its capture policy (on the CPU, with the capture stubbed), that padding to the bucket
leaves the losses' values and gradients alone (float64), and on a GPU that the replays equal the
eager loss (the class takes any of the graphable losses; training uses it for VAVA) and the
eager training step."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from alignprog.config import load_config
from alignprog.data import load_dataset
from alignprog.losses import ALIGNMENT_LOSSES
from alignprog.training import loss_graphs
from alignprog.training.loss_graphs import LossGraphs, wanted
from alignprog.training.trainer import Trainer, loss_keywords

from helpers import TINY

CUDA = torch.device("cuda")   # a device object only: the tests that need one are marked gpu


def _cfg(**overrides):
    base = {"train.method": "vava", "model.encoder": "resnet50", "train.cuda_graphs": "auto"}
    tree = base | overrides
    tree["data.layout"] = "frames" if tree["model.encoder"] == "resnet50" else "features"
    return load_config(overrides=tree)


def test_wanted_only_in_auto_on_cuda_one_process_vava_compute_bound_encoder():
    cfg = _cfg()
    assert wanted(cfg, CUDA, several_processes=False)
    assert not wanted(cfg, torch.device("cpu"), several_processes=False)
    assert not wanted(cfg, CUDA, several_processes=True)
    # TCC's and LAV's losses are graphable, but a graph gains them ~1 ms of ~115 (module
    # docstring): they stay eager
    for key, value in [("train.cuda_graphs", "off"), ("train.cuda_graphs", "on"),
                       ("train.method", "gtcc"), ("train.method", "tcc"), ("train.method", "lav"),
                       ("model.encoder", "stacking"), ("model.encoder", "naive")]:
        assert not wanted(_cfg(**{key: value}), CUDA, several_processes=False), (key, value)


def test_no_loss_graphs_on_the_cpu():
    cfg = load_config(overrides=TINY | {"model.encoder": "resnet50", "data.layout": "frames",
                                        "data.synthetic.frame_channels": 4,
                                        "data.synthetic.frame_size": 3})
    trainer = Trainer(cfg, load_dataset(cfg.data), torch.device("cpu"))
    assert trainer.loss_graphs is None


def _batch(lengths: list[int], dim: int = 6, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    t = max(lengths)
    x = torch.randn(len(lengths), t, dim, generator=g, dtype=dtype)
    mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    x[~mask] = float("nan")   # padding garbage: no loss may read it
    return x.requires_grad_(True), mask


def _loss(method: str):
    kw = loss_keywords(_cfg(**{"train.method": method}))
    fn = ALIGNMENT_LOSSES[method]
    if method == "vava":
        return lambda x, mask, counter: fn(x, mask, global_step=counter, **kw)
    return lambda x, mask, counter: fn(x, mask, **kw)


@pytest.mark.parametrize("method", ["tcc", "lav", "vava"])
def test_padding_to_the_bucket_keeps_value_and_gradient(method):
    loss = _loss(method)
    x, mask = _batch([13, 9, 11])
    counter = torch.tensor(40)
    want = loss(x, mask, counter)
    (g_want,) = torch.autograd.grad(want, x)
    px, pmask = LossGraphs.pad(x, mask, 24)
    assert px.shape == (3, 24, 6) and pmask.shape == (3, 24) and not pmask[:, 13:].any()
    got = loss(px, pmask, counter)
    (g_got,) = torch.autograd.grad(got, x)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_got[mask], g_want[mask], rtol=1e-9, atol=1e-12)
    assert torch.all(g_got[~mask] == 0)


class _Stub:
    """make_graphed_callables and the memory counters stubbed: the 'graph' is the function;
    each capture reserves `held_per_capture` bytes for good and `warm_up` bytes of cache that
    emptying the cache gives back."""

    def __init__(self, monkeypatch, held_per_capture: int = 100, warm_up: int = 0,
                 fail: str | None = None):
        self.captured, self.fail = [], fail
        self.reserved, self.cached = 0, 0
        self.held_per_capture, self.warm_up = held_per_capture, warm_up
        monkeypatch.setattr(torch.cuda, "make_graphed_callables", self.make)
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: self.reserved)
        monkeypatch.setattr(torch.cuda, "empty_cache", self.empty_cache)

    def empty_cache(self):
        self.reserved -= self.cached
        self.cached = 0

    def make(self, fn, sample):
        if self.fail is not None:
            raise RuntimeError(self.fail)
        x, mask, counter = sample
        assert x.requires_grad and not mask.requires_grad
        self.captured.append(tuple(x.shape))
        self.reserved += self.held_per_capture + self.warm_up
        self.cached += self.warm_up
        return fn


def test_a_shape_is_captured_the_second_time_and_then_replayed(monkeypatch):
    stub = _Stub(monkeypatch)
    loss = _loss("vava")
    graphs = LossGraphs(loss, frame_bucket=8, max_graphs=4, memory_budget=1e9)
    x, mask = _batch([13, 9])
    counter = torch.tensor(3)
    assert graphs(x, mask, counter) is None          # first time: the caller runs it eagerly
    assert stub.captured == []
    got = graphs(x, mask, counter)                   # second time: captured at (2, 16)
    assert stub.captured == [(2, 16, 6)] and graphs.replays == 1 and graphs.held == 100
    torch.testing.assert_close(got, loss(x, mask, counter), rtol=1e-10, atol=1e-12)
    (g,) = torch.autograd.grad(got, x)               # the replay is on x's autograd graph
    assert g.shape == x.shape and torch.isfinite(g[mask]).all()
    y, ymask = _batch([15, 10], seed=1)              # same bucket: a replay, no new capture
    torch.testing.assert_close(graphs(y, ymask, counter), loss(y, ymask, counter),
                               rtol=1e-10, atol=1e-12)
    assert stub.captured == [(2, 16, 6)] and graphs.replays == 2


def test_at_most_max_graphs_and_the_memory_budget(monkeypatch):
    stub = _Stub(monkeypatch, held_per_capture=60, warm_up=1000)   # the warm-up is not held
    graphs = LossGraphs(_loss("tcc"), frame_bucket=4, max_graphs=2, memory_budget=1e9)
    counter = torch.tensor(0)
    for lengths in ([3, 2], [3, 2], [6, 5], [6, 5], [10, 9], [10, 9], [10, 9]):
        graphs(*_batch(lengths), counter)
    assert stub.captured == [(2, 4, 6), (2, 8, 6)]   # the third shape stays eager
    assert len(graphs.graphed) == 2 and graphs.replays == 2   # each at its capture
    stub.captured.clear()
    graphs = LossGraphs(_loss("tcc"), frame_bucket=4, max_graphs=8, memory_budget=100)
    for lengths in ([3, 2], [3, 2], [6, 5], [6, 5], [10, 9], [10, 9]):
        graphs(*_batch(lengths), counter)
    # 60 bytes held after the first capture, 120 >= 100 after the second: no third
    assert stub.captured == [(2, 4, 6), (2, 8, 6)] and graphs.held == 120


def test_no_capture_without_a_gradient_to_capture(monkeypatch):
    stub = _Stub(monkeypatch)
    graphs = LossGraphs(_loss("lav"), frame_bucket=8, max_graphs=4, memory_budget=1e9)
    x, mask = _batch([5, 4])
    counter = torch.tensor(0)
    for _ in range(3):
        assert graphs(x.detach(), mask, counter) is None
    with torch.no_grad():
        assert graphs(x, mask, counter) is None
    assert stub.captured == [] and graphs.seen == {}


def test_a_failed_capture_warns_once_and_stops_new_captures_only(monkeypatch):
    stub = _Stub(monkeypatch)
    loss = _loss("vava")
    graphs = LossGraphs(loss, frame_bucket=8, max_graphs=4, memory_budget=1e9)
    counter = torch.tensor(0)
    x, mask = _batch([5, 4])                          # key (2, 8): captured
    for _ in range(2):
        graphs(x, mask, counter)
    assert stub.captured == [(2, 8, 6)]
    stub.fail = "CUDA out of memory. Tried to allocate 2.00 GiB\nmore lines"
    y, ymask = _batch([13, 4])                        # key (2, 16): its capture fails
    assert graphs(y, ymask, counter) is None
    with pytest.warns(UserWarning, match=r"capture of the alignment loss failed \(CUDA out of "
                                         r"memory. Tried to allocate 2.00 GiB\)"):
        assert graphs(y, ymask, counter) is None
    assert graphs.failed.startswith("CUDA out of memory") and list(graphs.graphed) == [(2, 8)]
    stub.fail = None
    assert graphs(y, ymask, counter) is None          # no second attempt, no second warning
    assert stub.captured == [(2, 8, 6)]
    # the graph captured before the failure still replays
    torch.testing.assert_close(graphs(x, mask, counter), loss(x, mask, counter))
    assert graphs.replays == 2


def test_a_failed_capture_without_a_message_is_named_by_its_type(monkeypatch):
    _Stub(monkeypatch, fail="")
    graphs = LossGraphs(_loss("tcc"), frame_bucket=8, max_graphs=4, memory_budget=1e9)
    x, mask = _batch([5, 4])
    graphs(x, mask, torch.tensor(0))
    with pytest.warns(UserWarning, match=r"failed \(RuntimeError\)"):
        assert graphs(x, mask, torch.tensor(0)) is None


def test_the_memory_budget_is_a_share_of_the_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: type("P", (), {"total_memory": 1000})())
    graphs = LossGraphs.create(_cfg(), CUDA, _loss("vava"))
    assert graphs is not None and graphs.memory_budget == pytest.approx(
        loss_graphs.MEMORY_SHARE * 1000)
    assert graphs.frame_bucket == 64 and graphs.max_graphs == 16
    assert LossGraphs.create(_cfg(**{"train.cuda_graphs": "off"}), CUDA, _loss("vava")) is None


def _vava_trainer(compat: str) -> Trainer:
    # no contrastive part (gamma 0): it would dwarf the terms phi weighs
    cfg = load_config(overrides=TINY | {"train.method": "vava", "loss.compat": compat,
                                        "loss.vava.gamma": 0.0})
    trainer = Trainer(cfg, load_dataset(cfg.data), torch.device("cpu"))
    trainer.epoch, trainer.step = 5, 17
    return trainer


def test_phi_counter_is_the_epoch_in_reference_mode_and_the_step_otherwise():
    assert _vava_trainer("reference").phi_counter() == 5
    assert _vava_trainer("fixed").phi_counter() == 17
    assert _vava_trainer("reference").phi_counter(epoch=2, step=9) == 2
    assert _vava_trainer("fixed").phi_counter(epoch=2, step=9) == 9


@pytest.mark.parametrize("compat", ["reference", "fixed"])
def test_whole_step_graphs_read_phi_from_their_counter(compat):
    """A whole-step graph's VAVA loss takes phi from the counter the replay fills (the epoch in
    reference mode), not from the epoch at capture; the replay is given `phi_counter()`."""
    from alignprog.training.graphs import GraphInputs
    from test_fast_step import batches
    trainer = _vava_trainer(compat)
    trainer.model.eval()   # no dropout: the two forwards below agree
    batch = batches(trainer, 1)[0]
    one = torch.ones(1, dtype=torch.long)
    inputs = GraphInputs(features=batch.features, mask=batch.mask, video=one * 0,
                         start=one * 0, length=one, gt=torch.ones(1), valid=one.bool(),
                         width=1, step=torch.tensor(10**6))
    graphed, _, _ = trainer.graph_losses(inputs)
    emb = trainer.forward(batch).embeddings.float()
    far = trainer.alignment_loss(emb, None, batch.mask, epoch=10**6, step=10**6).detach()
    now = trainer.alignment_loss(emb, None, batch.mask).detach()   # epoch 5, step 17
    torch.testing.assert_close(graphed.detach(), far)
    # phi = 0.999^1000 = 0.37 there, 0.998 or 0.996 now
    assert abs(float(far - now)) > 1e-3 * abs(float(now))

    class Recorder:   # stands in for StepGraphs: records what the replay is given
        failed = None

        def replay(self, host, samples, step, uploaded=None):
            self.step = step

    trainer.graphs = Recorder()
    assert trainer._graph_step(batch) is None
    assert trainer.graphs.step == (5 if compat == "reference" else 17)


# ---- GPU ----

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["tcc", "lav", "vava"])
def test_cuda_replays_equal_the_eager_loss_and_gradient(method):
    loss = _loss(method)
    graphs = LossGraphs(loss, frame_bucket=32, max_graphs=4, memory_budget=math.inf)
    counter = torch.zeros((), dtype=torch.long, device="cuda")
    for i, lengths in enumerate([[40, 30, 25], [40, 30, 25], [50, 44, 33], [37, 60, 20]]):
        x, mask = _batch(lengths, dim=16, seed=i, dtype=torch.float32)
        x = x.detach().cuda().requires_grad_(True)
        mask = mask.cuda()
        counter.fill_(100 * i)     # VAVA's phi moves with the step
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = graphs(x, mask, counter)
        assert [str(w.message) for w in caught] == []   # the capture (i = 1) is quiet
        if i == 0:
            assert got is None
            continue
        (g_got,) = torch.autograd.grad(got * 2.0, x)
        want = loss(x, mask, counter)
        (g_want,) = torch.autograd.grad(want * 2.0, x)
        torch.testing.assert_close(got, want, rtol=2e-4, atol=1e-5)
        torch.testing.assert_close(g_got[mask], g_want[mask], rtol=2e-3, atol=1e-5)
        assert torch.all(g_got[~mask] == 0)
    assert sorted(graphs.graphed) == [(3, 64)] and graphs.replays == 3
    # the pools hold at least the saved (P, T+1, T+1) float32 plans of VAVA's 20 Sinkhorn
    # iterations (P = 6 ordered pairs), 2 log-sum-exps each
    if method == "vava":
        assert graphs.held >= 40 * 6 * 65 * 65 * 4
    assert graphs.held > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_resnet50_step_with_graphed_loss_equals_the_eager_step():
    from test_fast_step import RESNET50, run_steps
    extra = RESNET50 | {"loss.reduction": "mean"}
    eager, rec_e = run_steps("vava", "off", n=8, extra=extra)
    graph, rec_g = run_steps("vava", "auto", n=8, extra=extra)
    assert eager.loss_graphs is None
    assert graph.loss_graphs is not None and graph.loss_graphs.failed is None
    assert graph.loss_graphs.replays > 0
    # as on the CPU (test_the_trainer_step_with_loss_graphs_equals_the_plain_step): the values
    # agree closely; VAVA's float32 gradient may move by ~1e-3 where its argmax constants
    # pick another of two near-equal plan entries, and Adam moves a weight whose gradient is
    # rounding noise by ~lr = 3e-4 a step
    for a, b in zip(rec_e, rec_g):
        for key in KEYS:
            rel = 2e-2 if key.startswith("grad") else 2e-3
            assert b[key] == pytest.approx(a[key], rel=rel, abs=1e-6), (key, a, b)
    for p, q in zip(eager.model.parameters(), graph.model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-3, atol=3e-3)


def _trainer_records(method: str, accumulate: int, bucket: int | None):
    """6 steps of a CPU trainer (the batches of 2 steps, three times); with `bucket`, its
    alignment loss through LossGraphs (capture stubbed). The records and, per step, the
    replays so far."""
    from test_fast_step import batches
    cfg = load_config(overrides=TINY | {"train.method": method, "train.accumulate": accumulate,
                                        "loss.reduction": "mean"})
    trainer = Trainer(cfg, load_dataset(cfg.data), torch.device("cpu"))
    if bucket is not None:
        trainer.loss_graphs = LossGraphs(trainer.graphed_loss, frame_bucket=bucket,
                                         max_graphs=4, memory_budget=1e9)
    data = batches(trainer, 2 * accumulate)
    groups = [data[i:i + accumulate] for i in range(0, len(data), accumulate)]
    records, replays = [], []
    for group in groups * 3:
        records.append(trainer.read(trainer.step_batches(group)))
        replays.append(trainer.loss_graphs.replays if bucket is not None else 0)
    return trainer, records, replays


KEYS = ("alignment", "progress", "total", "grad_encoder", "grad_head")


@pytest.mark.parametrize("method,accumulate", [("tcc", 1), ("tcc", 2), ("vava", 1), ("vava", 2)])
def test_the_trainer_step_with_loss_graphs_equals_the_plain_step(monkeypatch, method, accumulate):
    """The trainer's wiring on the CPU, the capture stubbed (the 'graph' is the loss on the
    padded batch): the counter it fills, the call, the copy of the replay's value, the gradient
    through it, one batch per step and several (train.accumulate)."""
    stub = _Stub(monkeypatch)
    _, plain, _ = _trainer_records(method, accumulate, None)
    # frames padded to a multiple of 1: no padding, the same numbers up to the order in which
    # autograd sums a parameter's gradient parts (the replay adds a node to the graph)
    graph, same, replays = _trainer_records(method, accumulate, 1)
    assert replays[-1] > 0 and stub.captured
    assert int(graph.loss_counter) == graph.step - 1   # the step of the last forward (phi)
    for a, b in zip(plain, same):
        for key in KEYS:
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), (key, a, b)
    # padded to 64: the steps up to the first replay start from the same weights. The padded
    # batch sums in another order: TCC float32 rounding only. VAVA's argmax and argmin
    # constants (priors, mutual extremes) pick between near-equal plan entries, so rounding
    # moves its float32 gradient by ~1e-3 (padded and unpadded agree to 1e-12 in float64:
    # test above); its values agree closely. (Later steps drift apart: Adam moves a weight
    # whose gradient is rounding noise by ~lr whatever the noise.)
    stub.captured.clear()
    _, padded, replays = _trainer_records(method, accumulate, 64)
    assert all(shape[1] % 64 == 0 for shape in stub.captured) and stub.captured
    first = next(i for i, n in enumerate(replays) if n > 0)
    grad_rel = 1e-4 if method == "tcc" else 2e-2
    for a, b in zip(plain[:first + 1], padded[:first + 1]):
        for key in KEYS:
            rel = grad_rel if key.startswith("grad") else 1e-5
            assert b[key] == pytest.approx(a[key], rel=rel, abs=1e-7), (key, a, b)
