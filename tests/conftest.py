"""Fixtures shared by the tests (the helpers they use are plain functions in helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import tiny_annotations, write_root


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on tiny tensors, threads only add contention on a 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture
def no_torch_load(monkeypatch):
    """The project rule: nothing is unpickled, so torch.load must never be called."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load called: nothing may be unpickled")
    monkeypatch.setattr(torch, "load", refuse)


@pytest.fixture
def tiny_root(tmp_path: Path) -> Path:
    ann, lengths = tiny_annotations()
    vocab = {0: "background", 1: "a", 2: "b", 3: "c", 4: "d", 5: "e"}
    return write_root(tmp_path / "tiny", ann, lengths, vocab=vocab)
