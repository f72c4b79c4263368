"""The progress figures of eval-progress and predict, drawn from small hand-made inputs: both
shade and label the actions the same way, and the curves figure says how many videos it drew."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")

from matplotlib.colors import to_rgba  # noqa: E402

from alignprog.plots import (ACTION_COLOUR, predict_figure,  # noqa: E402
                             progress_curves_figure)

# 30 frames: background, action "pour", background, action "stir".
SEGMENTS = [{"label": "bg", "start": 0, "end": 4, "foreground": False},
            {"label": "pour", "start": 5, "end": 14, "foreground": True},
            {"label": "bg", "start": 15, "end": 19, "foreground": False},
            {"label": "stir", "start": 20, "end": 29, "foreground": True}]
FRAMES = 30
ACTIONS = [(5, 14), (20, 29)]


def _curve(handle: str) -> dict:
    gt = [0.0] * FRAMES
    for s, e in ACTIONS:
        for t in range(s, e + 1):
            gt[t] = (t - s + 1) / (e - s + 1)
    return {"handle": handle, "task": "tea", "num_frames": FRAMES, "segments": SEGMENTS,
            "ground_truth": gt, "predictions": {"head": [0.5] * FRAMES}}


def _predict_result() -> dict:
    return {"whole_video_as_one_segment": False,
            "videos": [{"file": "v.npy", "handle": "v", "frames": FRAMES,
                        "segments": SEGMENTS, "progress": _curve("v")["ground_truth"]}]}


def _spans(ax) -> list[tuple[float, float, tuple]]:
    """(x start, x end, face colour) of every axvspan rectangle of a panel."""
    out = []
    for patch in ax.patches:
        box = patch.get_path().transformed(patch.get_patch_transform()).get_extents()
        out.append((float(box.x0), float(box.x1), tuple(patch.get_facecolor())))
    return sorted(out)


def _texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


@pytest.mark.parametrize("which", ["eval-progress", "predict"])
def test_actions_are_shaded_and_labelled_background_plain(which: str):
    fig = (progress_curves_figure([_curve("a")], "test") if which == "eval-progress"
           else predict_figure(_predict_result()))
    ax = fig.axes[0]
    spans = _spans(ax)
    assert [(s, e) for s, e, _ in spans] == [(s - 0.5, e + 0.5) for s, e in ACTIONS]
    assert {c for _, _, c in spans} == {to_rgba(ACTION_COLOUR)}
    assert sorted(_texts(ax)) == ["pour", "stir"]
    assert "shaded: actions" in ax.get_xlabel()


def test_both_figures_use_the_same_shading():
    a = _spans(progress_curves_figure([_curve("a")], "test").axes[0])
    b = _spans(predict_figure(_predict_result()).axes[0])
    assert a == b


def test_a_label_too_narrow_for_its_span_is_left_out():
    segs = [{"label": "blink", "start": 0, "end": 0, "foreground": True},
            {"label": "long action", "start": 1, "end": 99, "foreground": True}]
    curve = {"handle": "a", "task": "t", "num_frames": 100, "segments": segs,
             "ground_truth": [0.0] * 100, "predictions": {}}
    ax = progress_curves_figure([curve], "val").axes[0]
    assert _texts(ax) == ["long action"]
    assert len(ax.patches) == 2  # still shaded


@pytest.mark.parametrize("n", [1, 3])
def test_curves_title_says_how_many_videos_were_drawn(n: int):
    fig = progress_curves_figure([_curve(f"v{i}") for i in range(n)], "val")
    title = fig._suptitle.get_text()
    assert f"{n} video{'s' if n != 1 else ''} of the val split" in title
    assert len(fig.axes) == n
