"""Alignment metrics (docs/evaluation.md#alignment-metrics): hand-made inputs with hand-computed
answers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from alignprog.config import DataConfig, SyntheticConfig
from alignprog.data import load_dataset
from alignprog.evaluation.alignment import (alignment_partners, enclosed_area_error,
                                            enclosed_area_error_pair, evaluate_alignment,
                                            kendall_tau, kendall_tau_pair, kendall_tau_wild,
                                            kendall_tau_wild_pair, phase_classification,
                                            phase_progression)
from alignprog.evaluation.video_level import video_progress_gt

from helpers import annotation, tiny_model, tiny_synthetic


def line(values) -> np.ndarray:
    """1-D embeddings (T, 1): nearest neighbours are easy to read off by hand."""
    return np.asarray(values, dtype=np.float64)[:, None]


def sequence(n: int, seed: int = 0) -> np.ndarray:
    """A generic embedding sequence (T, 8) with distinct frames."""
    return np.random.default_rng(seed).normal(size=(n, 8))


# ----------------------------------------------------------------------------------------------
# Ground-truth alignment (docs/evaluation.md#ground-truth-alignment): background has no partner,
# pairs without a shared action are skipped


def test_partners_hand_case_and_background_never_aligns():
    a1 = annotation([("0", 1), ("a", 2), ("b", 2)])
    a2 = annotation([("a", 3), ("0", 2), ("b", 3)])
    y = alignment_partners(a1, a2)
    # a: rows 1, 2 -> cols 0 + round(r * 2 / 1) = 0, 2; b: rows 3, 4 -> cols 5, 7.
    expected = {1: [0], 2: [2], 3: [5], 4: [7]}
    assert [list(np.flatnonzero(row)) for row in y] == [[]] + [expected[i] for i in (1, 2, 3, 4)]
    assert not y[:, 3:5].any()  # background columns of video 2 are nobody's partner
    # Identity: a video is its own ground truth.
    np.testing.assert_array_equal(alignment_partners(a1, a1)[1:, 1:], np.eye(4, dtype=bool))


def test_repeated_action_gives_several_partner_runs():
    a1 = annotation([("a", 1), ("b", 1)])
    a2 = annotation([("a", 2), ("b", 1), ("a", 1)])
    y = alignment_partners(a1, a2)
    assert list(np.flatnonzero(y[0])) == [0, 3] and list(np.flatnonzero(y[1])) == [2]


# ----------------------------------------------------------------------------------------------
# Kendall's tau (docs/evaluation.md#kendall-tau): every ordered pair, undefined taus counted


def test_kendall_tau_identity_is_one_and_reversed_is_minus_one():
    u = sequence(9)
    assert kendall_tau_pair(u, u.copy()) == pytest.approx(1.0)
    assert kendall_tau_pair(u, u[::-1].copy()) == pytest.approx(-1.0)
    anns = [annotation([("a", 9)], handle=h) for h in ("v0", "v1")]
    out = kendall_tau([u, torch.from_numpy(u[::-1].copy())], anns)  # numpy and torch mixed
    assert out["per_task"]["t"]["pairs"] == 2 and out["pairs_scored"] == 2
    assert out["mean_over_pairs"] == pytest.approx(-1.0)


def test_kendall_tau_constant_neighbours_skipped_and_counted():
    # Video 2 has one frame: every neighbour is 0, tau undefined (NaN in the reference).
    u = sequence(5)
    anns = [annotation([("a", 5)], handle="v0"), annotation([("a", 5)], handle="v1"),
            annotation([("a", 1)], handle="v2")]
    out = kendall_tau([u, u.copy(), u[:1].copy()], anns)
    task = out["per_task"]["t"]
    assert task["pairs"] == 6
    # v0->v1 and v1->v0 give 1; v0->v2, v1->v2 undefined; v2->* has one frame, undefined too.
    assert task["pairs_scored"] == 2
    assert task["pairs_skipped"] == {"undefined_constant_neighbours": 4}
    assert task["value"] == pytest.approx(1.0)


def test_pairs_never_mix_tasks_and_aggregations_differ():
    u = sequence(6)
    anns = [annotation([("a", 6)], task="x", handle="x0"), annotation([("a", 6)], task="x",
                                                                       handle="x1"),
            annotation([("a", 6)], task="x", handle="x2"),
            annotation([("a", 6)], task="y", handle="y0"), annotation([("a", 6)], task="y",
                                                                       handle="y1")]
    # Task x: all identical (tau 1, 6 pairs); task y: reversed (tau -1, 2 pairs).
    out = kendall_tau([u, u, u, u, u[::-1].copy()], anns)
    assert out["per_task"]["x"]["pairs"] == 6 and out["per_task"]["y"]["pairs"] == 2
    assert out["mean_over_tasks"] == pytest.approx(0.0)
    assert out["mean_over_pairs"] == pytest.approx((6 - 2) / 8)


# ----------------------------------------------------------------------------------------------
# Kendall's tau in the wild, alignprog's corrected definition
# (docs/evaluation.md#kendall-tau-in-the-wild, docs/reference-bugs.md#kendall-tau-wild-definition)


def test_kendall_tau_wild_identity_is_one():
    ann = annotation([("a", 4), ("0", 3), ("b", 5)])
    u = sequence(12)
    c, d = kendall_tau_wild_pair(u, u, alignment_partners(ann, ann))
    assert (c, d) == (36, 0)  # 9 alignable frames, 9 * 8 / 2 pairs, background never counted
    out = kendall_tau_wild([u, u.copy()], [ann, ann])
    assert out["mean_over_pairs"] == pytest.approx(1.0)


def test_kendall_tau_wild_hand_case():
    # Identity partners A(t) = {t}; nn = (0, 1, 1, 0).
    ann = annotation([("a", 2), ("b", 2)])
    y = alignment_partners(ann, ann)
    u1, u2 = line([0.0, 1.0, 1.1, 0.1]), line([0.0, 1.0, 2.0, 3.0])
    # (0,1) n'>n, q>p: C. (0,2): C. (0,3) n'=n, no shared partner: D. (1,2) n'=n: D.
    # (1,3) n'<n needs min A(3)=3 < max A(1)=1: D. (2,3): D.  -> C = 2, D = 4.
    assert kendall_tau_wild_pair(u1, u2, y) == (2, 4)


def test_kendall_tau_wild_shared_partner_counts_as_concordant():
    # Video 2's one-frame actions are the partners of both frames of video 1's actions.
    a1, a2 = annotation([("a", 2), ("b", 2)]), annotation([("a", 1), ("b", 1)])
    y = alignment_partners(a1, a2)
    assert [list(np.flatnonzero(r)) for r in y] == [[0], [0], [1], [1]]
    assert kendall_tau_wild_pair(line([0, 0.1, 1, 1.1]), line([0, 1]), y) == (6, 0)
    # Standard KT of the same neighbours (0, 0, 1, 1) is tau-b, below 1: KTW is the one that
    # accepts every valid alignment.
    assert kendall_tau_pair(line([0, 0.1, 1, 1.1]), line([0, 1])) < 1


def test_kendall_tau_wild_ignores_background_frames():
    ann = annotation([("0", 3), ("a", 4)])
    u2 = line(np.arange(7.0))
    # Foreground frames matched exactly; background frames matched backwards and into the action.
    u1 = line([6.4, 5.4, 4.4, 3.0, 4.0, 5.0, 6.0])
    assert kendall_tau_wild([u1, u2], [ann, ann])["per_task"]["t"]["value"] == pytest.approx(1.0)
    assert enclosed_area_error([u1, u2], [ann, ann])["mean_over_pairs"] == pytest.approx(0.0)


@pytest.mark.parametrize("metric", [kendall_tau_wild, enclosed_area_error])
def test_pair_without_shared_action_is_skipped_and_counted(metric):
    # Background is shared but is no action: the pair has no ground truth, so it is skipped.
    anns = [annotation([("0", 2), ("a", 3)], handle="v0"),
            annotation([("0", 2), ("b", 3)], handle="v1"),
            annotation([("0", 1), ("a", 4)], handle="v2")]
    out = metric([sequence(5, 0), sequence(5, 1), sequence(5, 2)], anns)
    task = out["per_task"]["t"]
    assert task["pairs"] == 6
    assert task["pairs_skipped"] == {"no_shared_action": 4}  # v1 pairs with nobody
    assert task["pairs_scored"] == 2 and task["value"] is not None


# ----------------------------------------------------------------------------------------------
# Enclosed area error (docs/evaluation.md#enclosed-area-error): wild mode an explicit flag


def test_eae_perfect_alignment_is_zero():
    ann = annotation([("a", 4), ("0", 2), ("b", 3), ("a", 2)])
    u = sequence(11)
    for wild in (True, False):
        out = enclosed_area_error([u, u.copy()], [ann, ann], wild=wild)
        assert out["mean_over_pairs"] == 0.0 and out["wild"] is wild


def test_eae_hand_case():
    a1, a2 = annotation([("a", 2), ("b", 2)]), annotation([("a", 3), ("b", 3)])
    y = alignment_partners(a1, a2)
    # A = ({0}, {2}, {3}, {5}); Yset = {0, 2, 3, 5}.
    assert [list(np.flatnonzero(r)) for r in y] == [[0], [2], [3], [5]]
    u1, u2 = line([1.0, 2.0, 2.1, 4.0]), line(np.arange(6.0))  # nn = (1, 2, 2, 4)
    # Non-wild: |1-0| + |2-2| + |2-3| + |4-5| = 3, over |X_a| * T2 = 4 * 6.
    assert enclosed_area_error_pair(u1, u2, y, wild=False) == pytest.approx(3 / 24)
    # Wild: partner frames passed over: [0,1) -> 1, none, [2,3) -> 1, [4,5) -> 0; Z = 1 (2-3).
    assert enclosed_area_error_pair(u1, u2, y, wild=True) == pytest.approx(2 / 4)
    # The default wild flag follows the data: no background here, so non-wild.
    out = enclosed_area_error([u1, u2], [a1, a2])
    assert out["wild"] is False


# ----------------------------------------------------------------------------------------------
# Phase classification, corrected protocol: fitted on train, scored on test
# (docs/evaluation.md#phase-classification)


def clusters(labels: list[tuple[str, int]], centre: dict[str, float], seed: int) -> np.ndarray:
    """Frames near a per-label centre on the first axis (noise 0.1), 2-D (second axis 0)."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([np.full(n, centre[lab]) for lab, n in labels])
    return np.stack([x + 0.1 * rng.normal(size=len(x)), np.zeros(len(x))], 1)


def test_phase_classification_separable_is_one_on_test():
    segs = [("0", 20), ("a", 30), ("0", 10), ("b", 40)]
    centre = {"0": 0.0, "a": 5.0, "b": 10.0}
    train = [clusters(segs, centre, s) for s in range(3)]
    test = [clusters(segs, centre, 10 + s) for s in range(2)]
    anns = [annotation(segs, handle=f"v{i}") for i in range(3)]
    out = phase_classification(train, anns, test, anns[:2])
    for variant in ("background_included", "background_excluded"):
        for key in ("0.1", "0.5", "1"):
            assert out[variant][key]["mean_over_tasks"] == 1.0
            assert out[variant][key]["mean_over_videos"] == 1.0
    task = out["per_task"]["t"]
    assert task["background_included"]["test_frames"] == 200
    assert task["background_excluded"]["test_frames"] == 140
    # Fractions stratified by video: round(p * n) frames of each of the 3 training videos
    # (n = 100 frames, 70 without background).
    assert task["background_included"]["train_frames"] == {"0.1": 30, "0.5": 150, "1": 300}
    assert task["background_excluded"]["train_frames"] == {"0.1": 21, "0.5": 105, "1": 210}


def test_phase_classification_reports_test_not_training_accuracy():
    # The test videos swap the two actions' embeddings: the probe is perfect on its training
    # frames and wrong on every test frame. The reference protocol would report 1.0 at p = 1.
    segs = [("a", 5), ("b", 5)]
    train = [clusters(segs, {"a": 0.0, "b": 10.0}, s) for s in range(2)]
    test = [clusters(segs, {"a": 10.0, "b": 0.0}, 7)]
    anns = [annotation(segs, handle=f"v{i}") for i in range(2)]
    out = phase_classification(train, anns, test, anns[:1], fractions=(1.0,))
    assert out["background_excluded"]["1"]["mean_over_tasks"] == 0.0
    assert out["per_task"]["t"]["background_included"]["accuracy"]["1"] == 0.0


def test_phase_classification_single_class_subset_is_none():
    segs = [("a", 4)]
    out = phase_classification([sequence(4)], [annotation(segs)], [sequence(4, 1)],
                               [annotation(segs)], fractions=(0.5,))
    assert out["background_excluded"]["0.5"]["mean_over_tasks"] is None


# ----------------------------------------------------------------------------------------------
# Phase progression on video-level GT, corrected protocol: fitted on train, scored on test
# (docs/evaluation.md#phase-progression)


def test_video_progress_gt_hand_case_flat_over_background():
    g = video_progress_gt(annotation([("0", 2), ("a", 3), ("0", 2), ("b", 1), ("c", 2)]))
    third = 1 / 3
    expected = [0, 0, 0, third / 2, third, third, third, third, 2 * third, 1.0]
    np.testing.assert_allclose(g, expected, atol=1e-12)


def test_phase_progression_linear_embeddings_give_r2_one():
    def video(segs, seed):
        ann = annotation(segs, handle=f"v{seed}")
        g = video_progress_gt(ann)
        noise = np.random.default_rng(seed).normal(size=len(g))
        # g = (x0 - 1 - 0.5 x1) / 2: progress is exactly linear in the embedding.
        return np.stack([2 * g + 1 + 0.5 * noise, noise], 1), ann

    train = [video([("0", 3), ("a", 5), ("b", 4)], 0), video([("a", 7), ("0", 2), ("b", 6)], 1)]
    test = [video([("a", 3), ("b", 9), ("0", 4)], 2), video([("0", 1), ("a", 4), ("b", 2)], 3)]
    out = phase_progression([u for u, _ in train], [a for _, a in train],
                            [u for u, _ in test], [a for _, a in test])
    assert out["r2_pooled"]["mean_over_tasks"] == pytest.approx(1.0, abs=1e-9)
    assert out["r2_per_video"]["mean_over_videos"] == pytest.approx(1.0, abs=1e-9)
    assert out["per_task"]["t"]["videos_scored"] == 2


def test_phase_progression_is_scored_on_test_frames_only():
    # Train: progress encoded on axis 0. Test: the embedding axes carry no progress at all, so
    # the fit (perfect on train) must score below 0 on test; the reference's pooled 80/20 on the
    # same frames would not see this.
    ann = annotation([("a", 6), ("b", 6)])
    g = video_progress_gt(ann)
    train = [np.stack([g, np.zeros_like(g)], 1)]
    test = [np.stack([g[::-1], np.ones_like(g)], 1)]
    out = phase_progression(train, [ann], test, [ann])
    assert out["per_task"]["t"]["r2_pooled"] < 0


# ----------------------------------------------------------------------------------------------
# End to end on the synthetic data


def finite_numbers(obj) -> list[float]:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in finite_numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in finite_numbers(v)]
    if isinstance(obj, float):
        assert math.isfinite(obj)
        return [obj]
    return []


def test_evaluate_alignment_synthetic_end_to_end():
    ds = tiny_synthetic()
    torch.manual_seed(0)
    model = tiny_model()
    report = evaluate_alignment(model, ds, device="cpu")
    parsed = json.loads(json.dumps(report, allow_nan=False))
    assert set(parsed) == {"dataset", "split", "train_split", "split_sha256", "counts",
                           "metrics", "protocol", "timing_s"}
    assert parsed["counts"]["test_videos"] == len(ds.indices("test"))
    m = report["metrics"]
    pc = m["phase_classification"]["background_included"]
    assert all(0 <= pc[k]["mean_over_tasks"] <= 1 for k in ("0.1", "0.5", "1"))
    assert m["phase_progression"]["r2_pooled"]["mean_over_tasks"] is not None
    assert set(report["protocol"]) >= set(m)
    finite_numbers(report)

    # This small split has one test video per task: no pair. Score the 4-video train split
    # instead (probes fitted on val) to get every pairwise number.
    report = evaluate_alignment(model, ds, device="cpu", train_split="val", test_split="train")
    json.dumps(report, allow_nan=False)
    m = report["metrics"]
    assert m["enclosed_area_error"]["wild"] is True  # the synthetic data has background
    for name in ("kendall_tau", "kendall_tau_wild", "enclosed_area_error"):
        assert m[name]["pairs"] == 4 * 3 + 4 * 3
        assert m[name]["mean_over_tasks"] is not None and m[name]["mean_over_pairs"] is not None
    assert -1 <= m["kendall_tau_wild"]["mean_over_pairs"] <= 1
    assert m["enclosed_area_error"]["mean_over_pairs"] >= 0
    finite_numbers(report)


def test_evaluate_alignment_refuses_same_split():
    ds = load_dataset(DataConfig(synthetic=SyntheticConfig(tasks=1, videos_per_task=4, dim=16)))
    with pytest.raises(ValueError, match="must differ"):
        evaluate_alignment(torch.nn.Module(), ds, device="cpu", train_split="test",
                           test_split="test")
