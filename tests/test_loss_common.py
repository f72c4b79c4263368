"""Shared loss helpers: padding, pairs, distances and the intra-video regulariser
(docs/algorithms.md#intra-video-regulariser)."""

from __future__ import annotations

import pytest
import torch

from alignprog.losses.common import (intra_contrast, ordered_pairs, pad_sequences,
                                     pairwise_distances, pairwise_sq_distances)

from helpers import loop_intra_contrast


@pytest.mark.parametrize("compat", ["fixed", "reference"])
def test_intra_contrast_matches_loop_with_padding(compat):
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randn(23, 3, generator=g, dtype=torch.float64) * 0.3,
            torch.randn(9, 3, generator=g, dtype=torch.float64)]
    x, mask = pad_sequences(seqs)
    x[1, 9:] = 1e3  # garbage in padding
    got = intra_contrast(x, mask, window=5, margin=2.0, compat=compat)
    for b, s in enumerate(seqs):
        assert got[b].item() == pytest.approx(loop_intra_contrast(s, 5, 2.0, compat), rel=1e-10)


def test_intra_contrast_gradients_are_finite_for_identical_frames():
    x = torch.zeros(1, 20, 4, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(1, 20, dtype=torch.bool)
    intra_contrast(x, mask, window=5).sum().backward()
    assert torch.isfinite(x.grad).all()
    # reference mode: the in-window term is a constant
    # (docs/reference-bugs.md#lav-regulariser-constant-pull), so only the push has a gradient
    y = torch.randn(1, 6, 2, dtype=torch.float64, requires_grad=True)
    intra_contrast(y, torch.ones(1, 6, dtype=torch.bool), window=15, compat="reference").sum() \
        .backward()
    assert (y.grad == 0).all()


def test_pairs_and_padding():
    i, j = ordered_pairs(3)
    assert list(zip(i.tolist(), j.tolist())) == [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)]
    i, j = ordered_pairs(2, include_self=True)
    assert list(zip(i.tolist(), j.tolist())) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    x, mask = pad_sequences([torch.ones(2, 3), torch.ones(4, 3)])
    assert x.shape == (2, 4, 3) and mask.tolist() == [[True, True, False, False], [True] * 4]
    with pytest.raises(ValueError, match="same D"):
        pad_sequences([torch.ones(2, 3), torch.ones(2, 4)])


def test_distances():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    y = torch.tensor([[3.0, 4.0]])
    assert pairwise_sq_distances(x, y).tolist() == [[25.0], [0.0]]
    d = pairwise_distances(x.requires_grad_(), y)
    assert d[0, 0].item() == pytest.approx(5.0)
    d.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("squared", [False, True])
def test_distance_gradients(squared):
    from alignprog.losses.common import _Distances
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 4, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _Distances.apply(a, b, squared), (x, y))
    # the same tensor on both sides (the intra-video regulariser) and broadcast batch dims
    z = torch.randn(1, 6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: _Distances.apply(a, a + 0.5, squared), (z,))
    w = torch.randn(6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: _Distances.apply(a, b, squared), (x, w))
    # against the plain difference form
    diff = (x.unsqueeze(-2) - y.unsqueeze(-3)).square().sum(-1)
    want = diff if squared else diff.sqrt()
    torch.testing.assert_close(_Distances.apply(x, y, squared), want)
