"""Progress losses: the pipeline description's weighted L1, options, and cumulative_l2
(docs/algorithms.md#progress-losses)."""

from __future__ import annotations

import pytest
import torch

from alignprog.losses.progress import (action_progress_gt, cumulative_l2_loss,
                                       cumulative_progress, progress_loss, progress_weights,
                                       segment_path_lengths)


def test_weights_are_the_pipeline_descriptions():
    gt = torch.tensor([0.1, 0.2, 0.5, 1.0, 0.05])
    assert progress_weights(gt, 10.0).tolist() == pytest.approx([10, 5, 2, 1, 10])
    assert progress_weights(gt, 4.0).tolist() == pytest.approx([4, 4, 2, 1, 4])


def test_weighted_l1_on_hand_values():
    pred = torch.tensor([0.2, 0.5], requires_grad=True)
    gt = torch.tensor([0.1, 1.0])
    loss = progress_loss(pred, gt)                      # weights 10 and 1
    assert loss.item() == pytest.approx((10 * 0.1 + 1 * 0.5) / 11)
    loss.backward()
    assert pred.grad.tolist() == pytest.approx([10 / 11, -1 / 11])
    assert progress_loss(pred, gt, weighted=False).item() == pytest.approx(0.3)
    assert progress_loss(pred, gt, weighted=False, kind="mse").item() == pytest.approx(
        (0.01 + 0.25) / 2)
    assert progress_loss(pred, gt, kind="mse").item() == pytest.approx(
        (10 * 0.01 + 0.25) / 11)
    assert progress_loss(torch.zeros(0), torch.zeros(0)) is None
    with pytest.raises(ValueError, match="kind"):
        progress_loss(pred, gt, kind="huber")


def hand_video():
    """D = 1, u = [0, 0, 1, 3, 6, 6, 7]; bg 0-1, action 2-5 (L 4), one-frame action 6."""
    emb = torch.tensor([[0.0, 0.0, 1.0, 3.0, 6.0, 6.0, 7.0]]).unsqueeze(-1)   # (1, 7, 1)
    mask = torch.ones(1, 7, dtype=torch.bool)
    seg_start = torch.tensor([[0, 2, 6]])
    seg_end = torch.tensor([[1, 5, 6]])
    fg = torch.tensor([[False, True, True]])
    seg_mask = torch.ones(1, 3, dtype=torch.bool)
    return emb, mask, seg_start, seg_end, fg, seg_mask


def test_cumulative_progress_on_a_hand_example():
    emb, mask, s, e, fg, sm = hand_video()
    # path within the action: c = 0, |3-1| = 2, 2 + |6-3| = 5, 5 + 0 = 5 -> / 5
    pi = cumulative_progress(emb, mask, s, e, fg, sm)
    torch.testing.assert_close(pi, torch.tensor([[0, 0, 0, 0.4, 1.0, 1.0, 0.5]]))
    assert segment_path_lengths(emb, mask, s, e, sm).tolist() == [[0.0, 5.0, 0.0]]
    # a class normaliser (causal): the same divisor in training and evaluation
    norm = torch.tensor([[1.0, 10.0, 1.0]])
    pi = cumulative_progress(emb, mask, s, e, fg, sm, normaliser=norm)
    torch.testing.assert_close(pi, torch.tensor([[0, 0, 0, 0.2, 0.5, 0.5, 0.5]]))
    # zero path length: a linear ramp (t - s) / (L - 1)
    pi = cumulative_progress(torch.zeros(1, 7, 1), mask, s, e, fg, sm)
    torch.testing.assert_close(pi, torch.tensor([[0, 0, 0, 1 / 3, 2 / 3, 1.0, 0.5]]))
    gt = action_progress_gt(mask, s, e, fg, sm)
    torch.testing.assert_close(gt, torch.tensor([[0, 0, 0.25, 0.5, 0.75, 1.0, 1.0]]))


def test_cumulative_l2_loss_value_and_gradient():
    emb, mask, s, e, fg, sm = hand_video()
    emb = emb.clone().requires_grad_()
    # all 5 foreground frames: |0-.25| + |.4-.5| + |1-.75| + |1-1| + |.5-1| = 1.1 -> / 5
    loss = cumulative_l2_loss(emb, mask, s, e, fg, sm, frames_per_video=50)
    assert loss.item() == pytest.approx(1.1 / 5)
    loss.backward()
    assert torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0
    # padding does not change anything; identical frames give finite gradients
    padded = torch.cat([emb.detach(), torch.full((1, 3, 1), 1e3)], 1)
    pmask = torch.cat([mask, torch.zeros(1, 3, dtype=torch.bool)], 1)
    assert cumulative_l2_loss(padded, pmask, s, e, fg, sm).item() == pytest.approx(1.1 / 5)
    assert cumulative_l2_loss(emb, mask, s, e, torch.zeros_like(fg), sm) is None


def test_cumulative_l2_samples_frames_per_video():
    emb, mask, s, e, fg, sm = hand_video()
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    a = cumulative_l2_loss(emb, mask, s, e, fg, sm, frames_per_video=2, generator=g1)
    b = cumulative_l2_loss(emb, mask, s, e, fg, sm, frames_per_video=2, generator=g2)
    assert a.item() == b.item()
    errors = {0.25, 0.1, 0.25, 0.0, 0.5}
    # a mean of 2 of the 5 per-frame errors
    assert any(abs(a.item() - (x + y) / 2) < 1e-6 for x in errors for y in errors)
