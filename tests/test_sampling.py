"""Segment sampling for the progress head (docs/algorithms.md#segment-sampling)."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from alignprog.config import DataConfig, SyntheticConfig
from alignprog.data import load_dataset, make_loader
from alignprog.sampling import gather_segments, progress_bin, sample_segments


def segs(videos):
    """[(label_is_fg, length), ...] per video -> padded (B, K) segment tensors."""
    k = max(len(v) for v in videos)
    start = torch.zeros(len(videos), k, dtype=torch.long)
    end = torch.full((len(videos), k), -1, dtype=torch.long)
    fg = torch.zeros(len(videos), k, dtype=torch.bool)
    mask = torch.zeros(len(videos), k, dtype=torch.bool)
    for b, video in enumerate(videos):
        pos = 0
        for i, (is_fg, n) in enumerate(video):
            start[b, i], end[b, i], fg[b, i], mask[b, i] = pos, pos + n - 1, is_fg, True
            pos += n
    return start, end, fg, mask


def draw(tensors, seed=0, **kw):
    return sample_segments(*tensors, generator=torch.Generator().manual_seed(seed), **kw)


def test_ground_truth_formula_on_a_hand_example():
    # background 0-4, action 5-14 (L = 10), background 15-19
    s = draw(segs([[(False, 5), (True, 10), (False, 5)]]))
    assert len(s) == 10 * 5                       # 10 draws x 5 targets (8 candidates each)
    assert (s.video == 0).all() and (s.action == 1).all() and (s.start == 5).all()
    assert (s.length == 10).all()
    assert s.target.min() >= 7 and s.target.max() <= 14  # t >= s + min_segment_len - 1
    torch.testing.assert_close(s.gt, (s.target - 5 + 1).float() / 10)
    assert (s.segment_length >= 3).all()
    assert s.bin.tolist() == progress_bin(s.gt).tolist()
    # The pipeline description's example: action 50-100, t = 75 -> 26/51
    s = draw(segs([[(False, 50), (True, 51)]]), samples_per_video=50)
    hit = s.target == 75
    assert hit.any() and torch.allclose(s.gt[hit], torch.tensor(26 / 51))


def test_bins_are_the_references():
    q = torch.tensor([0.1, 0.33, 0.331, 0.67, 0.671, 1.0])
    assert progress_bin(q).tolist() == [0, 0, 1, 1, 2, 2]


def synthetic_batches(n=2):
    ds = load_dataset(DataConfig(synthetic=SyntheticConfig(tasks=2, videos_per_task=6, dim=8)))
    loader = make_loader(ds, None, batch_size=6, shuffle=False, drop_last=False)
    return [b for b, _ in zip(loader, range(n))]


@pytest.mark.parametrize("stratified", [True, False])
def test_segments_lie_inside_one_action_and_start_at_its_start(stratified):
    for batch in synthetic_batches():
        s = draw((batch.seg_start, batch.seg_end, batch.seg_foreground, batch.seg_mask),
                 stratified=stratified)
        assert len(s) > 0
        for i in range(len(s)):
            ann = batch.annotations[int(s.video[i])]
            k = int(s.action[i])
            assert ann.labels[k] not in ann.background
            assert int(s.start[i]) == ann.starts[k]
            assert ann.starts[k] <= int(s.target[i]) <= ann.ends[k]
            assert int(s.length[i]) == ann.ends[k] - ann.starts[k] + 1 >= 3


def test_stratified_covers_every_nonempty_bin_of_every_draw():
    # actions of many lengths, 400 draws each
    tensors = segs([[(False, 2), (True, n), (False, 1)] for n in range(3, 40)])
    s = draw(tensors, samples_per_video=400)
    for (v, d), idx in groupby_draw(s).items():
        length = int(s.length[idx[0]])
        count = length - 3 + 1
        cand = torch.arange(3, length + 1).float() / length
        nonempty = set(progress_bin(cand).tolist())
        got = Counter(s.bin[idx].tolist())
        assert len(idx) == min(5, count)
        if count >= 3:
            assert nonempty <= set(got), (length, got)
    # Share: with n = 5, one per non-empty bin: every bin of a long action gets >= 1/5.
    long = s.length >= 30
    shares = torch.bincount(s.bin[long], minlength=3).float() / long.sum()
    assert (shares >= 0.2).all()


def groupby_draw(s):
    groups: dict = {}
    for i, key in enumerate(zip(s.video.tolist(), s.draw.tolist())):
        groups.setdefault(key, []).append(i)
    return groups


def reference_draw(length: int, n: int, m: int, stratified: bool, rng: random.Random):
    """The documented candidate and target rule as a plain loop (one draw of one action starting
    at 0)."""
    cand = list(range(m - 1, length))
    if stratified and len(cand) >= 3:
        bins = {0: [], 1: [], 2: []}
        for t in cand:
            q = (t + 1) / length
            bins[0 if q <= 0.33 else 1 if q <= 0.67 else 2].append(t)
        k = max(1, n // 3)
        taken = []
        for b in (0, 1, 2):
            if bins[b]:
                taken += rng.sample(bins[b], min(k, len(bins[b])))
        rest = [t for t in cand if t not in taken]
        taken += rng.sample(rest, max(0, min(n, len(cand)) - len(taken)))
        return taken
    return rng.sample(cand, min(n, len(cand)))


@pytest.mark.parametrize("stratified", [True, False])
@pytest.mark.parametrize("length", [4, 12, 31])
def test_target_distribution_equals_the_loop_reference(stratified, length):
    draws = 20000
    s = draw(segs([[(True, length)]]), samples_per_video=draws, stratified=stratified)
    fast = torch.bincount(s.target, minlength=length).float() / draws
    rng = random.Random(0)
    slow = torch.zeros(length)
    for _ in range(draws):
        for t in reference_draw(length, 5, 3, stratified, rng):
            slow[t] += 1
    slow /= draws
    # P(target = t) per draw, within Monte-Carlo error (std <= 0.0035 at 20000 draws)
    torch.testing.assert_close(fast, slow, atol=0.02, rtol=0)


def test_determinism_and_seed():
    tensors = segs([[(False, 3), (True, 17), (False, 2), (True, 9)]] * 4)
    a, b, c = draw(tensors, seed=1), draw(tensors, seed=1), draw(tensors, seed=2)
    assert torch.equal(a.target, b.target) and torch.equal(a.video, b.video)
    assert not torch.equal(a.target, c.target) or not torch.equal(a.action, c.action)


def test_short_actions_and_empty_videos_are_counted():
    tensors = segs([[(False, 10)],                         # all background
                    [(False, 3), (True, 2), (False, 3)],   # action shorter than 3: unusable
                    [(False, 1), (True, 3), (False, 1)],   # L = 3: only t = e, gt = 1
                    [(True, 4)]])                          # L = 4: two candidates
    s = draw(tensors)
    assert s.stats["videos"] == 4
    assert s.stats["videos_without_usable_action"] == 2
    assert s.stats["all_background_videos"] == 1
    assert s.stats["draws"] == 20 and s.stats["short_draws"] == 20
    assert set(s.video.tolist()) == {2, 3}
    assert (s.gt[s.video == 2] == 1.0).all()
    assert sorted(set(s.gt[s.video == 3].tolist())) == [0.75, 1.0]
    none = draw(segs([[(False, 10)]]))
    assert len(none) == 0 and none.stats["videos_without_usable_action"] == 1


def test_min_segment_len_one_allows_one_frame_prefixes():
    s = draw(segs([[(True, 6)]]), samples_per_video=200, min_segment_len=1, stratified=False)
    assert s.segment_length.min() == 1 and torch.isclose(s.gt.min(), torch.tensor(1 / 6))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.tuples(st.booleans(), st.integers(1, 30)), min_size=1, max_size=6),
                min_size=1, max_size=4), st.booleans(), st.integers(1, 4), st.integers(1, 7))
def test_samples_are_always_valid(videos, stratified, m, n):
    start, end, fg, mask = segs(videos)
    s = sample_segments(start, end, fg, mask, samples_per_video=3, frames_per_segment=n,
                        min_segment_len=m, stratified=stratified,
                        generator=torch.Generator().manual_seed(0))
    for i in range(len(s)):
        v, k = int(s.video[i]), int(s.action[i])
        assert fg[v, k] and mask[v, k]
        assert start[v, k] == s.start[i] and s.start[i] + m - 1 <= s.target[i] <= end[v, k]
    for idx in groupby_draw(s).values():
        # without replacement; the reference's rule takes one per non-empty bin even when
        # frames_per_segment < 3, so a stratified draw may hold up to 3 targets
        limit = max(n, 3) if stratified else n
        assert len(set(s.target[idx].tolist())) == len(idx) <= limit


def test_gather_segments_matches_slices_and_keeps_gradients():
    tensors = segs([[(False, 2), (True, 7)], [(True, 5), (False, 4)]])
    s = draw(tensors)
    emb = torch.randn(2, 9, 3, requires_grad=True)
    seg, lengths = gather_segments(emb, s)
    for i in range(len(s)):
        v, a, t = int(s.video[i]), int(s.start[i]), int(s.target[i])
        n = t - a + 1
        assert lengths[i] == n
        torch.testing.assert_close(seg[i, :n], emb[v, a:t + 1])
        assert (seg[i, n:] == 0).all()
    seg.sum().backward()
    assert emb.grad.abs().sum() > 0
