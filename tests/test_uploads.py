"""Batches copied to the GPU ahead of their step (`alignprog.training.uploads`): the training
loop starts each step's copy during the step before, a step takes the copy made for its own
batches, and the numbers are those of a step that copies its batch itself."""

from __future__ import annotations

import pytest
import torch

from alignprog.config import load_config
from alignprog.data import load_dataset, make_loader
from alignprog.training.loop import _groups, fit
from alignprog.training.trainer import Trainer
from alignprog.training.uploads import Uploads

from helpers import TINY

GPU = dict(TINY, **{"train.device": "cuda", "data.synthetic.dim": 64, "model.num_heads": 4,
                    "train.graph_frame_bucket": 32})


def train_batches(cfg, n: int, **loader_kw):
    data = load_dataset(cfg.data)
    loader = make_loader(data, "train", batch_size=2, shuffle=False, drop_last=True,
                         **loader_kw)
    return data, list(loader)[:n]


def test_groups_are_consecutive_and_drop_a_short_tail():
    assert list(_groups(iter(range(7)), 3)) == [[0, 1, 2], [3, 4, 5]]
    assert list(_groups(iter(range(4)), 1)) == [[0], [1], [2], [3]]
    assert list(_groups(iter(range(2)), 3)) == []


def test_off_cuda_nothing_is_started_and_take_copies():
    cfg = load_config(overrides=TINY)
    _, (batch,) = train_batches(cfg, 1)
    uploads = Uploads(torch.device("cpu"))
    uploads.start([batch])
    assert not uploads.pending
    assert uploads.take(batch, copy_now=False) is None
    got = uploads.take(batch)
    assert torch.equal(got.features, batch.features) and torch.equal(got.mask, batch.mask)


def test_take_finds_its_copy_drops_older_ones_and_keeps_later_ones():
    uploads = Uploads(torch.device("cpu"))
    a, b, c, d = (object() for _ in range(4))
    uploads.pending.extend((h, f"copy of {i}", f"event {i}") for i, h in enumerate((a, b, c)))
    assert uploads._pop(b) == ("copy of 1", "event 1")
    assert [h for h, *_ in uploads.pending] == [c]      # a's step has passed: dropped
    assert uploads._pop(d) is None                      # not started: later copies stay
    assert [h for h, *_ in uploads.pending] == [c]


class HostUploads(Uploads):
    """Uploads with the CUDA parts stood in for on the CPU: `start` records the batch, `take`
    finds it as on a GPU; counts the copies started and taken."""

    started = taken = 0

    def start(self, batches):
        for host in batches:
            self.pending.append((host, host, None))
            HostUploads.started += 1

    def take(self, host, *, copy_now=True):
        found = self._pop(host)
        HostUploads.taken += found is not None
        return host if found is not None or copy_now else None


@pytest.mark.parametrize("accumulate,steps", [(1, None), (2, None), (1, 5)])
def test_fit_takes_every_copy_it_starts_but_each_epochs_first(monkeypatch, accumulate, steps):
    """In the loop's order (the next step's batches started before the current step runs),
    every step but an epoch's first takes its batches' copies, and a run stopped by
    train.steps starts none for a step it does not run."""
    monkeypatch.setattr("alignprog.training.trainer.Uploads", HostUploads)
    HostUploads.started = HostUploads.taken = 0
    overrides = {"train.epochs": 2, "train.accumulate": accumulate}
    if steps:
        overrides["train.steps"] = steps
    cfg = load_config(overrides=TINY | overrides)
    data = load_dataset(cfg.data)
    per_epoch = len(make_loader(data, "train", batch_size=cfg.data.batch_size, shuffle=True,
                                drop_last=True).batch_sampler.batches()) // accumulate
    result = fit(cfg, dataset=data)
    assert result.step == (steps or 2 * per_epoch)
    epochs = -(-result.step // per_epoch)              # the epochs the steps reached
    assert HostUploads.taken == HostUploads.started == (result.step - epochs) * accumulate


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("graphs", ["off", "on"])
def test_a_prefetched_step_equals_a_step_that_copies_its_batch(graphs):
    """Bit for bit, eagerly and as CUDA-graph replays (whose buffers then copy from the
    batch's device copy instead of the host)."""
    from alignprog.runtime import deterministic
    cfg = load_config(overrides=GPU | {"train.cuda_graphs": graphs})
    models = []
    with deterministic(True):
        for ahead in (False, True):
            data, host = train_batches(cfg, 5, pin_memory=True)
            trainer = Trainer(cfg, data, torch.device("cuda"))
            for i, batch in enumerate(host):
                if ahead and i + 1 < len(host):
                    trainer.prefetch([host[i + 1]])
                trainer.step_batch(batch)
            assert not trainer.uploads.pending
            assert trainer.uploads.hits == (len(host) - 1 if ahead else 0)
            if graphs == "on":
                assert trainer.graphs.replays == len(host) - 1
            models.append(trainer.model)
    for p, q in zip(*(m.parameters() for m in models)):
        assert torch.equal(p, q)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_take_returns_the_copy_started_for_the_batch_and_drops_older_ones():
    cfg = load_config(overrides=GPU)
    _, (b1, b2, b3) = train_batches(cfg, 3, pin_memory=True)
    uploads = Uploads(torch.device("cuda"))
    uploads.start([b1, b2])
    got = uploads.take(b2)
    assert got.features.is_cuda and torch.equal(got.features.cpu(), b2.features)
    assert torch.equal(got.seg_start.cpu(), b2.seg_start)
    assert not uploads.pending                     # b1's copy, started before, is dropped
    assert uploads.take(b1, copy_now=False) is None
    assert torch.equal(uploads.take(b3).features.cpu(), b3.features)   # not started: copied


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_gpu_loader_collates_into_page_locked_memory():
    cfg = load_config(overrides=GPU)
    _, (pinned,) = train_batches(cfg, 1, pin_memory=True)
    _, (plain,) = train_batches(cfg, 1)
    assert pinned.features.is_pinned() and not plain.features.is_pinned()
    assert torch.equal(pinned.features, plain.features)
