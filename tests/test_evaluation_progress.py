"""Action-level progress evaluation: closed forms, the online protocol, aggregation, the report."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from alignprog.data import Dataset, Splits, Video, VideoAnnotation
from alignprog.data.dataset import GeneratedArray
from alignprog.evaluation import (CONVENTION, action_frames, constant_progress, duration_prior,
                                  duration_prior_progress, embed_videos, evaluate_progress,
                                  online_progress, parse_baseline, progress_metrics)
from alignprog.evaluation.cumulative import PathLengthPrior
from alignprog.evaluation.online import online_cost
from alignprog.evaluation.video_level import cumulative_path, video_progress_gt
from alignprog.models.progress_heads import build_progress_head

from helpers import BG, annotation, tiny_model, tiny_synthetic


def hand_dataset(videos: list[tuple[str, str, str, list[tuple[str, int]]]], dim: int = 4
                 ) -> Dataset:
    """videos: (task, handle, split, segments); random features of width ``dim``."""
    items, assignment = [], {}
    for i, (task, handle, split, segments) in enumerate(videos):
        ann = annotation(segments, task, handle)
        feats = np.random.default_rng(i).normal(size=(ann.num_frames, dim)).astype(np.float32)
        items.append(Video(i, task, handle, ann, {"features": GeneratedArray(
            lambda f=feats: f, feats.shape)}, split))
        parts = assignment.setdefault(task, {"train": (), "val": (), "test": ()})
        parts[split] += (handle,)
    return Dataset("hand", None, "hand", "features", items, BG, None,
                   Splits(assignment, "hand-made"))


def pooled_mae(pred_per_video, annotations) -> float:
    frames = action_frames(annotations)
    return progress_metrics(frames.gather(pred_per_video), frames)["mae"]["pooled"]


# ----------------------------------------------------------------------------------------------
# Baselines: closed forms (docs/evaluation.md#baseline-closed-forms) and the frame-count prior


@pytest.mark.parametrize("length", range(1, 14))
def test_constant_baselines_match_closed_forms(length):
    # Background around the action must not change anything.
    ann = annotation([("0", 3), ("a", length), ("0", 2)])
    m = length // 2
    half = 0.25 if length % 2 == 0 else (m**2 + (m + 1)**2) / (2 * length**2)
    expected = {0.5: half, 0.0: (length + 1) / (2 * length), 1.0: (length - 1) / (2 * length)}
    for c, value in expected.items():
        assert pooled_mae([constant_progress(ann, c)], [ann]) == pytest.approx(value, abs=1e-12)


def test_constant_half_anchor_values():
    # docs/evaluation.md#baseline-closed-forms: L = 1: 0.5, 3: 0.278, 5: 0.26.
    for length, value in ((1, 0.5), (3, 0.278), (5, 0.26)):
        ann = annotation([("a", length)])
        assert pooled_mae([constant_progress(ann, 0.5)], [ann]) == pytest.approx(value, abs=5e-4)


def test_frame_count_prior_hand_example():
    ds = hand_dataset([
        ("t", "tr0", "train", [("0", 2), ("a", 4), ("0", 9), ("b", 10)]),
        ("t", "tr1", "train", [("a", 6), ("0", 30)]),
        ("t", "va0", "val", [("c", 50)]),                       # val: never in the prior
        ("t", "te0", "test", [("0", 1), ("a", 7), ("c", 3), ("0", 2)]),
        ("t", "te1", "test", [("a", 100)]),                     # test: never in the prior
    ])
    prior = duration_prior(ds, "train")
    assert prior.means == {"a": 5.0, "b": 10.0}                 # background excluded
    assert prior.fallback == pytest.approx(20 / 3)              # mean over all train actions
    pred = duration_prior_progress(ds.videos[3].annotation, prior)
    expected = [0, .2, .4, .6, .8, 1, 1, 1, .15, .3, .45, 0, 0]  # clipped at 1; 'c' unseen
    np.testing.assert_allclose(pred, expected, atol=1e-12)

    report = evaluate_progress(None, ds, "test", device="cpu", baselines=("frame_count",))
    gt = [np.r_[0, np.arange(1, 8) / 7, np.arange(1, 4) / 3, 0, 0], np.arange(1, 101) / 100]
    preds = [pred, np.minimum(1, np.arange(1, 101) / 5)]
    err = np.concatenate([np.abs(p - g)[g > 0] for p, g in zip(preds, gt)])
    metrics = report["predictors"]["frame_count"]["metrics"]
    assert metrics["mae"]["pooled"] == pytest.approx(err.mean())
    assert report["priors"]["frame_count"]["unseen_labels"] == ["c"]
    assert report["priors"]["frame_count"]["videos"] == 2


def test_baseline_names():
    assert parse_baseline("constant_0.25") == ("constant", 0.25, ())
    assert parse_baseline("action_duration_prior")[0] == "frame_count"
    assert parse_baseline("random")[2] == tuple(range(10))
    assert parse_baseline("random_3") == ("random", None, (3,))
    for bad in ("constant_2", "constant_x", "oracle"):
        with pytest.raises(ValueError):
            parse_baseline(bad)


def test_random_baseline_is_seeded_and_averaged():
    ds = hand_dataset([("t", "tr", "train", [("a", 5)]), ("t", "te", "test", [("a", 400)])])
    r1 = evaluate_progress(None, ds, "test", device="cpu", baselines=("random", "random_0"))
    r2 = evaluate_progress(None, ds, "test", device="cpu", baselines=("random",))
    a, b = r1["predictors"]["random"], r2["predictors"]["random"]
    assert a["metrics"] == b["metrics"] and a["seeds"] == list(range(10))
    assert a["mae_pooled_std_over_seeds"] > 0
    # The expectation tends to 1/3 for long actions (docs/evaluation.md#baseline-closed-forms).
    assert a["metrics"]["mae"]["pooled"] == pytest.approx(1 / 3, abs=0.02)


# ----------------------------------------------------------------------------------------------
# The head, online (docs/evaluation.md#online-action-level-mae, docs/algorithms.md#online-protocol)


def loop_reference(head, u: torch.Tensor, ann: VideoAnnotation) -> torch.Tensor:
    """One head call per prefix U[s : t+1], the protocol read literally."""
    pred = torch.zeros(ann.num_frames, dtype=u.dtype)
    with torch.no_grad():
        for lab, s, e in zip(ann.labels, ann.starts, ann.ends):
            if lab in BG:
                continue
            for t in range(s, e + 1):
                pred[t] = head(u[None, s:t + 1], torch.tensor([t - s + 1]))[0]
    return pred


@pytest.mark.parametrize("arch,position", [("gru", "relative"), ("gru", "count"),
                                           ("transformer", "count"), ("dilated_conv", "count"),
                                           ("mean", "relative")])
def test_online_progress_equals_per_prefix_loop(arch, position):
    torch.manual_seed(0)
    head = build_progress_head(arch, in_dim=6, hidden_dim=8, position=position).double().eval()
    ann = annotation([("0", 2), ("a", 1), ("b", 5), ("0", 3), ("c", 13), ("a", 1)])
    u = torch.randn(ann.num_frames, 6, dtype=torch.float64)
    ref = loop_reference(head, u, ann)
    torch.testing.assert_close(online_progress(head, u, ann), ref, rtol=0, atol=1e-12)
    # Tiny chunks (one row each at most) give the same values.
    torch.testing.assert_close(online_progress(head, u, ann, chunk_elems=1), ref, rtol=0,
                               atol=1e-12)
    fg = torch.from_numpy(ann.foreground_mask())
    assert (online_progress(head, u, ann)[~fg] == 0).all()
    if head.streamable and head.has_dense:
        # Both paths agree: one dense pass per action == every prefix through the head.
        torch.testing.assert_close(online_progress(head, u, ann, dense=True),
                                   online_progress(head, u, ann, dense=False), rtol=0, atol=1e-12)
    elif not head.streamable:
        with pytest.raises(ValueError, match="prefix"):
            online_progress(head, u, ann, dense=True)


@pytest.mark.parametrize("arch,position,per_action", [
    ("gru", "count", lambda n: n), ("dilated_conv", "none", lambda n: n),
    ("gru", "relative", lambda n: n * (n + 1) // 2), ("mean", "count", lambda n: n * (n + 1) // 2),
    ("transformer", "count", lambda n: n * (n + 1) // 2),
    ("transformer", "relative", lambda n: n * (n + 1) * (n + 2) // 6)])
def test_online_cost_counts_the_frames_the_head_is_run_for(arch, position, per_action):
    head = build_progress_head(arch, in_dim=6, hidden_dim=8, position=position)
    ann = annotation([("0", 2), ("a", 1), ("b", 5), ("0", 3), ("c", 13)])
    assert online_cost(head, ann) == per_action(1) + per_action(5) + per_action(13)
    # 1e5 frames of one action: exact Python integers, no overflow
    long = annotation([("a", 100_000)])
    assert online_cost(head, long) == per_action(100_000)


@pytest.mark.parametrize("position,frames_fed", [("count", 1 + 5 + 13),
                                                 ("relative", 1 + 15 + 91)])
def test_a_streaming_head_reads_each_frame_once(position, frames_fed):
    """Online progress of a streaming head is linear in the action length: the head sees
    every real frame once (one dense pass per action); a relative head sees every prefix."""
    head = build_progress_head("gru", in_dim=6, hidden_dim=8, position=position)
    fed = []
    head.register_forward_pre_hook(lambda mod, args, kwargs: fed.append(int(args[1].sum())),
                                   with_kwargs=True)
    ann = annotation([("0", 2), ("a", 1), ("b", 5), ("0", 3), ("c", 13)])
    online_progress(head, torch.randn(ann.num_frames, 6), ann)
    assert sum(fed) == frames_fed == online_cost(head, ann)


def test_online_progress_float32_and_training_mode_restored():
    torch.manual_seed(1)
    head = build_progress_head("transformer", in_dim=6, hidden_dim=8, position="relative")
    head.train()  # dropout on: online_progress must switch to eval mode and back
    ann = annotation([("a", 9), ("0", 1), ("b", 4)])
    u = torch.randn(ann.num_frames, 6)
    pred = online_progress(head, u, ann)
    assert head.training
    head.eval()
    torch.testing.assert_close(pred, loop_reference(head, u, ann), rtol=0, atol=1e-5)


def test_embed_videos_order_and_batching():
    torch.manual_seed(0)
    ds = hand_dataset([("t", f"v{i}", "test", [("a", n)]) for i, n in enumerate((7, 3, 11, 5))],
                      dim=16)
    model = tiny_model(1)
    model.train()
    indices = [2, 0, 3, 1]
    batched = embed_videos(model, ds, indices, device="cpu", batch_size=3)
    assert model.training
    assert [e.shape for e in batched] == [(ds.videos[i].num_frames, 16) for i in indices]
    for i, emb in zip(indices, batched):
        alone = embed_videos(model, ds, [i], device="cpu", batch_size=1)[0]
        torch.testing.assert_close(emb, alone, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Metrics and aggregation


def test_perfect_predictor_scores_zero_and_background_never_counts():
    anns = [annotation([("0", 4), ("a", 6), ("b", 1), ("0", 2), ("c", 3)]),
            annotation([("a", 2), ("0", 5)])]
    frames = action_frames(anns)
    preds = []
    for ann in anns:
        p = np.full(ann.num_frames, 7.0)  # garbage on background
        for lab, s, n in zip(ann.labels, ann.starts, ann.lengths):
            if lab not in BG:
                p[s:s + n] = np.arange(1, n + 1) / n
        preds.append(p)
    m = progress_metrics(frames.gather(preds), frames)
    assert m["mae"]["pooled"] == m["mae"]["mean_over_videos"] == m["mae"]["mean_over_tasks"] == 0
    assert m["mae"]["frames"] == 12 and frames.num_actions == 4
    assert m["endpoints"] == {"first_10pct": 0, "last_10pct": 0, "first_frame": 0,
                              "last_frame": 0}
    assert m["monotonicity"] == {"share": 1.0, "pairs": 12 - 4}
    assert m["spearman"]["mean"] == pytest.approx(1.0) and m["spearman"]["actions"] == 2
    assert m["normalised_mae"] == 1.0
    assert all(b["mae"] in (0, None) for b in m["by_progress"].values())


def test_shape_metrics_hand_values():
    ann = annotation([("a", 10)])  # first/last 10%: one frame each
    frames = action_frames([ann])
    pred = np.array([0.5, 0.4, 0.6, 0.6, 0.7, 0.2, 0.8, 0.9, 1.0, 0.3])
    m = progress_metrics(pred, frames)
    assert m["monotonicity"]["share"] == pytest.approx(6 / 9)   # 3 decreases in 9 pairs
    assert m["endpoints"]["first_10pct"] == pytest.approx(0.4)
    assert m["endpoints"]["last_10pct"] == pytest.approx(0.7)
    ann = annotation([("a", 11)])  # ceil(1.1) = 2 frames at each end
    m = progress_metrics(np.zeros(11), action_frames([ann]))
    assert m["endpoints"]["first_10pct"] == pytest.approx((1 / 11 + 2 / 11) / 2)
    assert m["endpoints"]["last_10pct"] == pytest.approx((10 / 11 + 1) / 2)


def loop_spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rho read literally: average ranks (ties share the mean of their positions),
    then Pearson's correlation of the ranks, all in float64 Python loops."""
    def ranks(v: list[float]) -> list[float]:
        return [1.0 + sum(w < a for w in v) + (sum(w == a for w in v) - 1) / 2.0 for a in v]

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    vx = sum((a - mx) ** 2 for a in rx)
    vy = sum((b - my) ** 2 for b in ry)
    return cov / math.sqrt(vx * vy)


def test_spearman_matches_a_loop_with_average_ranks_on_ties():
    # Actions: 6 frames with two ties, 4 frames (one tie), 2 frames (too short: left out),
    # 3 frames of a constant prediction (undefined, counted).
    ann = annotation([("a", 6), ("0", 1), ("b", 4), ("c", 2), ("0", 2), ("d", 3)])
    frames = action_frames([ann])
    per_action = [[0.1, 0.3, 0.3, 0.2, 0.5, 0.5], [0.9, 0.1, 0.9, 0.4], [0.7, 0.2],
                  [0.4, 0.4, 0.4]]
    pred = np.concatenate(per_action)
    s = progress_metrics(pred, frames)["spearman"]
    rhos = [loop_spearman(p, list(range(len(p)))) for p in per_action[:2]]
    # By hand: ranks 1, 3.5, 3.5, 2, 5.5, 5.5 against 1..6 give 13.5 / sqrt(16.5 * 17.5).
    assert rhos[0] == pytest.approx(13.5 / math.sqrt(16.5 * 17.5), abs=1e-15)
    assert s["mean"] == pytest.approx(sum(rhos) / 2, rel=0, abs=1e-12)
    assert (s["actions"], s["undefined_constant"], s["min_frames"]) == (2, 1, 3)
    # A NaN prediction ranks above every number (NaNs tie), as before: the action keeps a rho.
    nan_frames = action_frames([annotation([("a", 3)])])
    s = progress_metrics(np.array([math.nan, 0.1, 0.2]), nan_frames)["spearman"]
    assert s["mean"] == pytest.approx(-0.5, abs=1e-12) and s["actions"] == 1
    s = progress_metrics(np.full(3, math.nan), nan_frames)["spearman"]
    assert (s["mean"], s["actions"], s["undefined_constant"]) == (None, 0, 1)


def unbalanced_dataset() -> Dataset:
    return hand_dataset([
        ("A", "a_tr", "train", [("x", 4)]),
        ("A", "a0", "test", [("0", 2), ("x", 4), ("0", 3)]),   # 4 frames, MAE 1/4
        ("A", "a1", "test", [("y", 1), ("0", 6)]),             # 1 frame, MAE 1/2
        ("B", "b0", "test", [("z", 3)]),                       # 3 frames, MAE 5/18
        ("B", "b_bg", "test", [("0", 5)]),                     # no foreground: skipped, counted
    ])


def test_aggregations_differ_on_unbalanced_example():
    ds = unbalanced_dataset()
    report = evaluate_progress(None, ds, "test", device="cpu", baselines=("constant_0.5",))
    m = report["predictors"]["constant_0.5"]["metrics"]
    v = [1 / 4, 1 / 2, 5 / 18]
    assert m["mae"]["pooled"] == pytest.approx((4 * v[0] + v[1] + 3 * v[2]) / 8)
    assert m["mae"]["mean_over_videos"] == pytest.approx(sum(v) / 3)
    assert m["mae"]["mean_over_tasks"] == pytest.approx(((v[0] + v[1]) / 2 + v[2]) / 2)
    assert len({round(m["mae"][k], 9) for k in ("pooled", "mean_over_videos",
                                                "mean_over_tasks")}) == 3
    assert m["per_task"]["A"]["videos"] == 2 and m["per_task"]["A"]["frames"] == 5
    assert m["per_task"]["A"]["mae"] == pytest.approx((v[0] + v[1]) / 2)
    assert m["per_task"]["A"]["mae_pooled"] == pytest.approx((4 * v[0] + v[1]) / 5)
    assert m["per_task"]["B"]["videos"] == 1


def test_report_counts_hash_and_convention():
    ds = unbalanced_dataset()
    report = evaluate_progress(None, ds, "test", device="cpu")
    json.dumps(report, allow_nan=False)
    assert report["split"] == "test" and report["split_sha256"] == ds.splits.sha256()
    assert report["convention"] == CONVENTION == "action-level, online (prefix), oracle-segmented"
    c = report["counts"]
    assert c["videos"] == 3 and c["videos_in_split"] == 4
    assert c["videos_skipped_no_foreground"] == 1 and c["skipped_handles"] == ["b_bg"]
    assert c["foreground_frames"] == 8 and c["actions"] == 3
    assert c["background_frames_excluded"] == 2 + 3 + 6
    assert set(report["predictors"]) == {"constant_0.5", "frame_count"}


# ----------------------------------------------------------------------------------------------
# End to end on the synthetic data


def test_evaluate_progress_synthetic_end_to_end():
    ds = tiny_synthetic()
    torch.manual_seed(0)
    model = tiny_model()
    report = evaluate_progress(model, ds, "test", device="cpu",
                               baselines=("constant_0.5", "frame_count", "constant_0"))
    text = json.dumps(report, allow_nan=False)
    assert json.loads(text)["split_sha256"] == ds.splits.sha256()
    assert report["counts"]["videos"] + report["counts"]["videos_skipped_no_foreground"] \
        == len(ds.indices("test"))
    head = report["predictors"]["head"]
    assert head["kind"] == "learnable_head" and "prefix" in head["inference"]
    for entry in report["predictors"].values():
        mae = entry["metrics"]["mae"]
        assert mae["frames"] == report["counts"]["foreground_frames"] > 0
        for key in ("pooled", "mean_over_videos", "mean_over_tasks"):
            assert 0 <= mae[key] <= 1 and math.isfinite(mae[key])
        assert 0 <= entry["metrics"]["monotonicity"]["share"] <= 1
    # Constant 0 is far worse than constant 0.5 (about (L+1)/(2L) vs about 1/4): robust.
    p = report["predictors"]
    pooled = {name: entry["metrics"]["mae"]["pooled"] for name, entry in p.items()}
    assert pooled["constant_0"] > pooled["constant_0.5"]
    # The frame-count prior starts each action low and rises: monotone with perfect rank order.
    assert p["frame_count"]["metrics"]["monotonicity"]["share"] == 1.0


# ----------------------------------------------------------------------------------------------
# Video-level OGPE and the cumulative_l2 predictor: hand examples on identity "embeddings"


class _IdentityEncoder(torch.nn.Module):
    def forward(self, x, mask):
        return SimpleNamespace(embeddings=x)


class IdentityModel(torch.nn.Module):
    """Embeddings = the features (so path lengths are hand-computable); no progress head."""

    progress_head = None

    def __init__(self) -> None:
        super().__init__()
        self.encoder = _IdentityEncoder()


def line_dataset(test_positions=(0, 0, 3, 6, 9)) -> Dataset:
    """1-d features = positions on a line, so every step's length is the position difference.

    train 'tr1' a(3) at 0,1,2            : path of a 2, G(U) 2, 3 frames
    train 'tr2' a(3) 0(2) at 0,2,4,4,14  : path of a 4 (background 10 excluded), G(U) 14, 5 frames
    -> mu_a = 3, G_hat = 8, mean train length 4.
    test 'te'  0(1) a(4) at ``test_positions``; val 'va' with huge steps (must not leak).
    """
    spec = [("tr1", "train", [("a", 3)], (0, 1, 2)),
            ("tr2", "train", [("a", 3), ("0", 2)], (0, 2, 4, 4, 14)),
            ("te", "test", [("0", 1), ("a", 4)], test_positions),
            ("va", "val", [("a", 4)], (0, 100, 200, 300))]
    items, assignment = [], {"t": {"train": (), "val": (), "test": ()}}
    for i, (handle, split, segments, pos) in enumerate(spec):
        ann = annotation(segments, "t", handle)
        feats = np.asarray(pos, dtype=np.float32)[:, None]                       # (T, 1)
        items.append(Video(i, "t", handle, ann, {"features": GeneratedArray(
            lambda f=feats: f, feats.shape)}, split))
        assignment["t"][split] += (handle,)
    return Dataset("line", None, "line", "features", items, BG, None,
                   Splits(assignment, "hand-made"))


def test_video_progress_gt_hand_example():
    ann = annotation([("0", 2), ("a", 3), ("SIL", 2), ("b", 1), ("c", 3), ("background", 1)])
    g = video_progress_gt(ann)
    third = 1 / 3
    np.testing.assert_allclose(g, [0, 0, 0, third / 2, third, third, third, third,
                                   2 * third, 2 * third + third / 2, 1, 1])
    assert (video_progress_gt(annotation([("0", 3)])) == 0).all()


def test_cumulative_path_hand_example():
    u = torch.tensor([[0.0, 0.0], [3.0, 4.0], [3.0, 4.0], [3.0, 6.0]])
    np.testing.assert_allclose(cumulative_path(u), [0, 5, 5, 7])


def test_path_length_prior_train_only_and_background_excluded():
    ds = line_dataset()
    train = [ds.videos[i] for i in ds.indices("train")]
    prior = PathLengthPrior.from_embeddings(
        [v.annotation for v in train], [torch.from_numpy(ds.load(v.index)) for v in train])
    assert prior.means == {"a": pytest.approx(3.0)} and prior.counts == {"a": 2}
    assert prior.normaliser("unseen") == prior.fallback == pytest.approx(3.0)
    assert prior.videos == 2


def test_cumulative_l2_and_video_level_hand_values():
    report = evaluate_progress(IdentityModel(), line_dataset(), "test", device="cpu",
                               baselines=(), cumulative=True, video_level=True)
    json.dumps(report, allow_nan=False)
    p = report["predictors"]
    assert set(p) == {"cumulative_l2", "cumulative_l2_raw", "cumulative_l2_offline"}
    # Action a of 'te': P_s = 0, 3, 6, 9, mu_a = 3 -> raw 0, 1, 2, 3; GT 1/4, 1/2, 3/4, 1.
    assert p["cumulative_l2_raw"]["metrics"]["mae"]["pooled"] == pytest.approx(4 / 4)
    # Clipped to [0, 1]: 0, 1, 1, 1 (docs/reference-bugs.md#unbounded-cumulative-predictions).
    assert p["cumulative_l2"]["metrics"]["mae"]["pooled"] == pytest.approx(1 / 4)
    assert p["cumulative_l2"]["clipped"] and not p["cumulative_l2_raw"]["clipped"]
    # Offline (self-normalised, non-causal): 0, 1/3, 2/3, 1.
    assert p["cumulative_l2_offline"]["metrics"]["mae"]["pooled"] == pytest.approx(0.5 / 4)
    assert not p["cumulative_l2_offline"]["causal"]
    assert report["priors"]["cumulative_l2"]["labels"]["a"] == {"mean_path_length": 3.0,
                                                                "segments": 2}

    vl = report["video_level"]
    norm = vl["normaliser"]["per_task"]["t"]
    assert (norm["mean"], norm["videos"], norm["mean_length_frames"]) == (8.0, 2, 4.0)
    assert vl["normaliser"]["split"] == "train"
    # Video GT 0, 0, 1/3, 2/3, 1; P(t) / 8 = 0, 0, .375, .75, 1.125 -> errors sum 1/4 over 5.
    geo = vl["predictors"]["cumulative_geodesic"]
    assert geo["raw"]["ogpe"]["mean_over_videos"] == pytest.approx(0.25 / 5)
    assert geo["clipped"]["ogpe"]["mean_over_videos"] == pytest.approx(0.125 / 5)
    assert geo["raw"]["per_task"]["t"]["videos"] == 1
    # Frame count t / 4 = 0, .25, .5, .75, 1 -> errors 0, 1/4, 1/6, 1/12, 0.
    fc = vl["predictors"]["frame_count"]
    assert fc["raw"]["ogpe"]["mean_over_videos"] == pytest.approx(0.5 / 5)
    # Constant 0.5: 1/2, 1/2, 1/6, 1/6, 1/2.
    assert vl["predictors"]["constant_0.5"]["raw"]["ogpe"]["pooled"] == pytest.approx(
        (1.5 + 1 / 3) / 5)
    assert vl["counts"]["videos"] == 1 and vl["counts"]["frames"] == 5


def test_normalisers_never_see_the_evaluated_split():
    """Normalisers come from the training split only: changing a test video changes its errors
    but not one normaliser."""
    a = evaluate_progress(IdentityModel(), line_dataset(), "test", device="cpu", baselines=(),
                          cumulative=True, video_level=True)
    b = evaluate_progress(IdentityModel(), line_dataset((0, 0, 30, 60, 90)), "test",
                          device="cpu", baselines=(), cumulative=True, video_level=True)
    assert a["priors"] == b["priors"]
    assert a["video_level"]["normaliser"] == b["video_level"]["normaliser"]
    assert (a["predictors"]["cumulative_l2_raw"]["metrics"]["mae"]["pooled"]
            != b["predictors"]["cumulative_l2_raw"]["metrics"]["mae"]["pooled"])
    # Evaluating the val split: same training normalisers again.
    c = evaluate_progress(IdentityModel(), line_dataset(), "val", device="cpu", baselines=(),
                          cumulative=True, video_level=True)
    assert c["priors"] == a["priors"]
    assert c["video_level"]["normaliser"]["per_task"] == a["video_level"]["normaliser"]["per_task"]


def test_video_level_skips_zero_path_videos_for_every_predictor():
    report = evaluate_progress(IdentityModel(), line_dataset((5, 5, 5, 5, 5)), "test",
                               device="cpu", baselines=(), video_level=True)
    vl = report["video_level"]
    assert vl["counts"]["videos"] == 0 and vl["counts"]["skipped_handles"] == ["te"]
    assert vl["predictors"] == {}


def test_extras_change_no_other_number_and_curves_are_kept():
    ds = tiny_synthetic()
    torch.manual_seed(0)
    model = tiny_model()
    plain = evaluate_progress(model, ds, "val", device="cpu")
    full = evaluate_progress(model, ds, "val", device="cpu", cumulative=True, video_level=True,
                             curves=2)
    for name, entry in plain["predictors"].items():
        assert full["predictors"][name] == entry
    assert {"cumulative_l2", "cumulative_l2_raw", "cumulative_l2_offline"} <= set(
        full["predictors"])
    for entry in full["predictors"].values():
        assert entry["metrics"]["mae"]["frames"] == full["counts"]["foreground_frames"]
    clipped = full["predictors"]["cumulative_l2"]["metrics"]
    assert clipped["mae"]["pooled"] <= 1
    curves = full["curves"]
    assert 1 <= len(curves) <= 2
    for c in curves:
        assert set(c["predictions"]) == {"head", "cumulative_l2", "frame_count"}
        assert all(len(v) == c["num_frames"] for v in c["predictions"].values())
        assert len(c["ground_truth"]) == c["num_frames"]
    json.dumps(full, allow_nan=False)
