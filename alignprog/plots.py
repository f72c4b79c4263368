"""Every figure the command line draws, in one style.

Each function turns the plain data a command also prints (its JSON report) into a matplotlib
`Figure` (the object API: no pyplot, no global backend or figure state); `png_bytes` renders one.
Nothing here writes a file: the command writes the bytes atomically, so an interrupted run
leaves no half-written PNG. matplotlib is optional (``pip install 'alignprog[plot]'``) and is
imported inside the functions only; `require_matplotlib` lets a command fail in one line before
it does its work.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from alignprog.errors import AlignprogError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

DPI = 110
BIN_COLOURS = {"early": "#1b9e77", "mid": "#7570b3", "late": "#d95f02"}
MAIN_COLOUR = "#1f77b4"     # the stratified sampler; predicted progress
OTHER_COLOUR = "#aaaaaa"    # the uniform sampler, for comparison
# Progress plots (eval-progress and predict): actions shaded, background plain.
ACTION_COLOUR = "0.9"
ACTION_EDGE_COLOUR = "0.7"
PROGRESS_YLIM = (-0.05, 1.15)   # room above 1 for the action labels


def require_matplotlib() -> None:
    """Raise a one-line `AlignprogError` naming the install command if matplotlib is missing."""
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError:
        raise AlignprogError("plotting needs matplotlib, which is not installed: "
                             "pip install 'alignprog[plot]'") from None


def _figure(width: float, height: float) -> "Figure":
    require_matplotlib()
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def png_bytes(fig: "Figure") -> bytes:
    """The figure as PNG bytes, for the caller to write atomically."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


# ----------------------------------------------------------------------------------------------
# sample-inspect


def sampling_figure(report: dict[str, Any]) -> "Figure":
    """The progress sampler's epoch (`sampling_report`'s result): progress histograms stratified
    vs uniform, sample and loss-weight share per bin, and the timeline of its video."""
    st, un, tl = report["stratified"], report["uniform"], report["timeline"]
    bin_names = [b["bin"] for b in st["bins"]]
    bin_edges = [b["high"] for b in st["bins"][:-1]]   # inner edges
    fig = _figure(12, 8.5)
    grid = fig.add_gridspec(2, 2, height_ratios=(1, 1.2), width_ratios=(1.6, 1))
    ax = fig.add_subplot(grid[0, 0])
    edges = np.asarray(st["histogram"]["edges"])                      # (HIST_BINS + 1,)
    width = (edges[1] - edges[0]) * 0.4
    centres = (edges[:-1] + edges[1:]) / 2                            # (HIST_BINS,)
    ax.bar(centres - width / 2, st["histogram"]["counts"], width,
           label=f"stratified ({st['samples']} samples)", color=MAIN_COLOUR)
    ax.bar(centres + width / 2, un["histogram"]["counts"], width,
           label=f"uniform ({un['samples']} samples)", color=OTHER_COLOUR)
    for x in bin_edges:
        ax.axvline(x, color="k", ls=":", lw=1)
    ax.set(xlim=(0, 1), xlabel="ground-truth progress", ylabel="samples",
           title=f"ground-truth progress of one epoch: {report['dataset']}, "
                 f"{report['settings']['split']} split, seed {report['settings']['seed']}")
    ax.legend()

    ax = fig.add_subplot(grid[0, 1])
    x = np.arange(len(bin_names))
    bars = [(st, "share", "stratified: samples"), (st, "weight_share", "stratified: loss weight"),
            (un, "share", "uniform: samples"), (un, "weight_share", "uniform: loss weight")]
    for j, (run, key, label) in enumerate(bars):
        colour = MAIN_COLOUR if run["stratified"] else OTHER_COLOUR
        hatch = "//" if key == "weight_share" else None
        ax.bar(x + (j - 1.5) * 0.2, [b[key] for b in run["bins"]], 0.2, label=label,
               color="white" if hatch else colour, edgecolor=colour, hatch=hatch, lw=1.2)
    ax.set_xticks(x, [f"{n}\n({b['low']:g}-{b['high']:g}]" for n, b in
                      zip(bin_names, st["bins"])])
    top = max(b[key] for run, key, _ in bars for b in run["bins"])
    ax.set(ylabel="share of the epoch", ylim=(0, top * 1.4),
           title="progress bins: share of samples and of loss weight")
    ax.legend(fontsize=8, ncol=2, loc="upper center")

    ax = fig.add_subplot(grid[1, :])
    if tl is None:
        ax.text(0.5, 0.5, "no video got samples", ha="center", va="center")
        ax.set_axis_off()
    else:
        _sampling_timeline(ax, tl)
    return fig


def _sampling_timeline(ax: "Axes", tl: dict[str, Any]) -> None:
    from matplotlib import colormaps

    segs = tl["segments"]
    names = sorted({s["name"] for s in segs if s["foreground"]})
    colour = {n: colormaps["tab20"](i % 20) for i, n in enumerate(names)}
    draws = sorted({s["draw"] for s in tl["samples"]})
    top = len(draws) + 1  # the segment row; draws below it, first draw on top
    for seg in segs:
        ax.broken_barh([(seg["start"] - 0.5, seg["end"] - seg["start"] + 1)], (top - 0.4, 0.8),
                       facecolors=colour[seg["name"]] if seg["foreground"] else "#e8e8e8",
                       edgecolor="white", lw=0.5)
        if seg["foreground"] and seg["end"] - seg["start"] + 1 >= tl["num_frames"] / 30:
            ax.text((seg["start"] + seg["end"]) / 2, top, seg["name"], ha="center",
                    va="center", fontsize=7, clip_on=True, parse_math=False)
    for row, d in enumerate(draws):
        y = top - 1 - row
        mine = [s for s in tl["samples"] if s["draw"] == d]
        first, last = mine[0], max(s["target"] for s in mine)
        # The whole action in grey, the longest sampled prefix in dark grey.
        ax.plot([first["start"] - 0.5, first["end"] + 0.5], [y, y], color="#d0d0d0", lw=6,
                solid_capstyle="butt")
        ax.plot([first["start"] - 0.5, last + 0.5], [y, y], lw=2, solid_capstyle="butt",
                color="#444444")
        for s in mine:
            ax.plot(s["target"], y, "|", ms=13, mew=2.2, color=BIN_COLOURS[s["bin"]])
    for name, c in BIN_COLOURS.items():
        ax.plot([], [], "|", ms=10, mew=2, color=c, label=f"target in the {name} bin")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.set_yticks([top] + [top - 1 - r for r in range(len(draws))],
                  ["segments"] + [f"draw {d}" for d in draws])
    ax.set(xlim=(-0.5, tl["num_frames"] - 0.5), ylim=(0.4, top + 0.6), xlabel="frame",
           title=f"{tl['handle']} ({tl['task']}, {tl['num_frames']} frames), stratified run: each "
                 "draw is one action (grey), sampled prefixes end at the ticks")


# ----------------------------------------------------------------------------------------------
# eval-progress


def shade_actions(ax: "Axes", segments: Sequence[dict[str, Any]], num_frames: int) -> None:
    """Shade each action (foreground segment) of a progress panel in `ACTION_COLOUR`, mark
    where it starts, and write its label at the top of its span; background stays plain.
    A label is left out when its span is too narrow to hold it (under 1/40 of the video)."""
    from matplotlib.transforms import blended_transform_factory

    top = blended_transform_factory(ax.transData, ax.transAxes)
    for seg in segments:
        if not seg["foreground"]:
            continue
        ax.axvspan(seg["start"] - 0.5, seg["end"] + 0.5, color=ACTION_COLOUR, lw=0)
        ax.axvline(seg["start"] - 0.5, color=ACTION_EDGE_COLOUR, lw=0.5)
        if seg["end"] - seg["start"] + 1 >= num_frames / 40:
            # labels are user text: a '$' must not start matplotlib's mathtext
            ax.text((seg["start"] + seg["end"]) / 2, 0.98, str(seg["label"]), transform=top,
                    ha="center", va="top", fontsize=7, clip_on=True, parse_math=False)


def progress_curves_figure(curves: list[dict[str, Any]], split: str) -> "Figure":
    """Ground truth and every predictor's progress over the frames of a few videos, one panel
    each, actions shaded and labelled (background is predicted 0); the title says how many
    videos were drawn (a small split may have fewer than asked for)."""
    fig = _figure(10, 2.6 * len(curves) + 0.4)
    axes = fig.subplots(len(curves), 1, squeeze=False)[:, 0]
    for ax, c in zip(axes, curves):
        shade_actions(ax, c["segments"], c["num_frames"])
        ax.plot(c["ground_truth"], color="black", lw=1.5, label="ground truth")
        for name, pred in c["predictions"].items():
            ax.plot(pred, lw=1, label=name)
        ax.set_ylim(*PROGRESS_YLIM)
        ax.set_xlim(-0.5, c["num_frames"] - 0.5)
        ax.set_title(f"{c['task']} / {c['handle']} ({split})", fontsize=9)
        ax.set_ylabel("progress")
    n = len(curves)
    fig.suptitle(f"progress curves of {n} video{'s' if n != 1 else ''} of the {split} split",
                 fontsize=10)
    axes[-1].set_xlabel("frame (shaded: actions; background predicted 0)")
    axes[0].legend(loc="upper left", fontsize=7, ncol=4)
    return fig


def error_by_bin_figure(report: dict[str, Any], names: Sequence[str]) -> "Figure":
    """Action-level MAE per ground-truth progress bin of the predictors `names` of an
    eval-progress report, one bar group per bin."""
    bins = ("early", "mid", "late")
    fig = _figure(max(6, 0.9 * len(names) + 3), 3.5)
    ax = fig.subplots()
    width = 0.8 / max(len(names), 1)
    for j, name in enumerate(names):
        by = report["predictors"][name]["metrics"]["by_progress"]
        vals = [by[b]["mae"] if by[b]["mae"] is not None else math.nan for b in bins]
        ax.bar([i + (j - (len(names) - 1) / 2) * width for i in range(len(bins))], vals, width,
               label=name)
    edges = report["predictors"][names[0]]["metrics"]["by_progress"] if names else {}
    ax.set_xticks(range(len(bins)), [f"{b}\n({edges[b]['low']:g}-{edges[b]['high']:g})"
                                     if edges else b for b in bins])
    ax.set_ylabel("MAE")
    ax.set_title(f"action-level progress error per GT progress bin ({report['split']} split; "
                 "unclipped cumulative_l2 and other constants: see the report)", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    return fig


# ----------------------------------------------------------------------------------------------
# predict


def predict_figure(result: dict[str, Any]) -> "Figure":
    """`alignprog predict`'s result: one panel per video, the online progress curve over its
    frames, actions shaded and labelled as in eval-progress's progress curves."""
    videos = result["videos"]
    fig = _figure(10, 2.2 * len(videos) + 0.6)
    axes = fig.subplots(len(videos), 1, squeeze=False)[:, 0]
    for ax, video in zip(axes, videos):
        pred = np.asarray(video["progress"])                              # (T,)
        shade_actions(ax, video["segments"], len(pred))
        for seg in video["segments"]:
            if not seg["foreground"]:
                continue
            frames = np.arange(seg["start"], seg["end"] + 1)
            # One line per action: progress restarts at each action, so no line joins them.
            ax.plot(frames, pred[frames], color=MAIN_COLOUR, lw=1.5,
                    marker="." if len(frames) == 1 else None)
        title = Path(video["file"]).name
        if result["whole_video_as_one_segment"]:
            title += " (whole video as one segment)"
        ax.set(xlim=(-0.5, len(pred) - 0.5), ylim=PROGRESS_YLIM, ylabel="progress", title=title)
    axes[-1].set_xlabel("frame (shaded: actions; background predicted 0)")
    return fig
