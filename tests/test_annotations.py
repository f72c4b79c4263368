"""Frame-unit mapping, canonical segments and length repairs on hand-made examples
(docs/data.md#frame-units-and-fps-presets, #canonical-segments, #length-repairs)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from alignprog.data import annotations as A
from alignprog.data.annotations import RawAnnotation, RepairLog, canonicalise, map_bounds
from alignprog.errors import DataError

from helpers import BG


def raw(labels, starts, ends):
    return RawAnnotation("task", "vid", tuple(labels), tuple(starts), tuple(ends))


def run(r, n, **kw):
    log = RepairLog()
    ann = canonicalise(r, n, background=BG, log=log, **kw)
    return ann, log


def test_shared_boundary_goes_to_later_segment():
    ann, log = run(raw(["0", "7", "0"], [0, 5, 12], [5, 12, 19]), 20)
    assert ann.starts == (0, 5, 12)
    assert ann.ends == (4, 11, 19)
    assert ann.lengths.tolist() == [5, 7, 8]
    assert not log


def test_map_bounds_units():
    assert map_bounds([0, 23, 24, 239], unit="frames", feature_fps=1, source_fps=24) == [0, 0, 1, 9]
    assert map_bounds([0, 29, 30, 31], unit="frames", feature_fps=4, source_fps=30) == [0, 3, 4, 4]
    assert map_bounds([0, 1.5, 4.0, 6.2], unit="seconds", feature_fps=2,
                      source_fps=None) == [0, 3, 8, 12]
    assert map_bounds([0, 7, 9], unit="frames", feature_fps=1, source_fps=None) == [0, 7, 9]
    # 0.1 s at 30 fps is exactly frame 3, despite 0.1 * 30 == 3.0000000000000004 in floats
    assert map_bounds([0.1], unit="seconds", feature_fps=30, source_fps=None) == [3]


def test_fps_mapping_drops_collapsed_segments():
    # 24 fps source -> 1 fps: starts 0,30,40,100 -> 0,1,1,4 ; the second segment becomes empty.
    r = raw(["0", "5", "0", "6"], [0, 30, 40, 100], [30, 40, 100, 239])
    ann, log = run(r, 10, feature_fps=1.0, source_fps=24.0)
    assert ann.labels == ("0", "0", "6")
    assert ann.starts == (0, 1, 4)
    assert ann.ends == (0, 3, 9)
    assert log.counts == {A.EMPTY_DROPPED: 1}


def test_seconds_unit():
    ann, log = run(raw(["0", "5", "0"], [0, 1.5, 4.0], [1.5, 4.0, 6.2]), 13, unit="seconds",
                   feature_fps=2.0)
    assert ann.starts == (0, 3, 8)
    assert ann.ends == (2, 7, 12)
    assert not log


def test_final_segment_extended_and_mismatch_warned():
    ann, log = run(raw(["0", "7", "0"], [0, 5, 12], [5, 12, 19]), 25, tolerance_frames=2)
    assert ann.ends == (4, 11, 24)
    assert log.counts == {A.FINAL_EXTENDED: 1, A.LENGTH_MISMATCH: 1}
    assert "off by 5" in log.examples[A.LENGTH_MISMATCH]


def test_small_mismatch_within_tolerance_is_repaired_without_warning():
    ann, log = run(raw(["0", "7", "0"], [0, 5, 12], [5, 12, 19]), 21, tolerance_frames=2)
    assert ann.ends == (4, 11, 20)
    assert log.counts == {A.FINAL_EXTENDED: 1}


def test_final_segment_shortened():
    ann, log = run(raw(["0", "7", "0"], [0, 5, 12], [5, 12, 19]), 15)
    assert ann.ends == (4, 11, 14)
    assert log.counts == {A.FINAL_SHORTENED: 1, A.LENGTH_MISMATCH: 1}


def test_segments_beyond_features_dropped():
    ann, log = run(raw(["0", "7", "0"], [0, 5, 12], [5, 12, 19]), 10)
    assert ann.labels == ("0", "7")
    assert ann.starts == (0, 5)
    assert ann.ends == (4, 9)
    assert log.counts[A.BEYOND_DROPPED] == 1
    assert log.counts[A.FINAL_SHORTENED] == 1


def test_leading_gap_becomes_background_and_gaps_filled():
    ann, log = run(raw(["7", "8"], [3, 10], [5, 15]), 16, gap_label="0")
    assert ann.labels == ("0", "7", "8")
    assert ann.starts == (0, 3, 10)
    assert ann.ends == (2, 9, 15)
    assert log.counts == {A.LEADING_GAP: 1, A.GAP_FILLED: 1}


def test_empty_video_is_an_error():
    with pytest.raises(DataError, match="empty video"):
        canonicalise(raw(["0"], [0], [5]), 0, background=BG)


def test_raw_annotation_is_not_mutated():
    r = raw(["0", "7", "0"], [0, 5, 12], [5, 12, 19])
    run(r, 10)
    assert r.ends == (5, 12, 19)


def test_frame_views():
    ann, _ = run(raw(["0", "7", "SIL", "8"], [0, 2, 5, 6], [2, 5, 6, 8]), 9)
    assert ann.frame_segment().tolist() == [0, 0, 1, 1, 1, 2, 3, 3, 3]
    assert ann.foreground_mask().tolist() == [False, False, True, True, True, False, True,
                                              True, True]
    assert ann.frame_labels()[4:6] == ["7", "SIL"]
    assert ann.background_fraction == pytest.approx(3 / 9)


@st.composite
def raw_annotations(draw):
    k = draw(st.integers(1, 8))
    starts = sorted(draw(st.lists(st.integers(0, 60), min_size=k, max_size=k)))
    ends = [max(s, draw(st.integers(0, 70))) for s in starts]
    labels = draw(st.lists(st.sampled_from(["0", "1", "2", "3"]), min_size=k, max_size=k))
    n = draw(st.integers(1, 80))
    source = draw(st.sampled_from([None, 2.0, 3.0]))
    return raw(labels, starts, ends), n, source


@settings(max_examples=200, deadline=None)
@given(raw_annotations())
def test_canonical_segments_always_tile_the_video(case):
    r, n, source = case
    ann, _ = run(r, n, feature_fps=1.0, source_fps=source)
    starts, ends = np.array(ann.starts), np.array(ann.ends)
    assert starts[0] == 0 and ends[-1] == n - 1
    assert (ends >= starts).all()
    assert (starts[1:] == ends[:-1] + 1).all()
    assert len(ann.frame_segment()) == n
    # labels keep their order (a subsequence of the original, possibly after a leading bg)
    it = iter(("0",) + r.labels)
    assert all(lab in it for lab in ann.labels)
