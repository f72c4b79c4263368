"""`alignprog sample-inspect`: what the progress sampler feeds training in one epoch."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich import box
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from alignprog.cli.common import (AnnotationsOpt, ConfigOpt, FpsPresetOpt, LenientOpt, SetOpt,
                                   console, guarded, one_path, print_table, report,
                                   resolve_config, split_choice, write_figure)

BIN_STYLE = {"early": "green", "mid": "magenta", "late": "dark_orange"}
MODE_STYLE = {True: "bold blue", False: "bold"}
HIST_WIDTH = 24      # characters of the longest histogram bar
TIMELINE_WIDTH = 60  # characters of the timeline ruler
ACTION_STYLES = ("cyan", "yellow", "blue", "red", "green", "magenta", "bright_cyan",
                 "bright_yellow", "bright_blue", "bright_red")

EPILOG = ("Examples:\n\n  alignprog sample-inspect\n\n"
          "  alignprog sample-inspect --dataset data/synth --split val --seed 3 "
          "--video synth_t1_v04\n\n"
          "  alignprog sample-inspect --set progress.learnable.min_segment_len=5 --json\n\n"
          "  alignprog sample-inspect --plot sampling.png")


@guarded
def sample_inspect(
    root: Annotated[Optional[Path], typer.Argument(
        help="The same as --dataset (the shorter spelling).", show_default=False)] = None,
    dataset: Annotated[Optional[Path], typer.Option(
        "--dataset", help="Dataset root to inspect. Unset: the embedded synthetic dataset.",
        show_default=False)] = None,
    split: Annotated[str, typer.Option(
        help="Split to draw from: train, val or test.", **split_choice())] = "train",
    seed: Annotated[int, typer.Option(
        help="Seed of the loader's shuffle and of the sampler's generator (as training's epoch "
        "seed).")] = 0,
    video: Annotated[Optional[str], typer.Option(
        help="Handle of the video whose timeline is shown. Default: the first video of the "
        "split that got samples.", show_default=False)] = None,
    annotations: AnnotationsOpt = None,
    lenient: LenientOpt = False,
    fps_preset: FpsPresetOpt = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the report as JSON (nothing else on stdout).")] = False,
    plot: Annotated[Optional[Path], typer.Option(
        help="Also write one PNG figure (histograms and the timeline) to this file (--plot "
        "FILE; commands that write several figures take --plots DIR). Needs matplotlib: pip "
        "install 'alignprog\\[plot]'.", show_default=False)] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Show the progress head's training samples of one epoch, stratified vs uniform.

    Samples are drawn exactly as training draws them (shuffled drop-last loader, seeded sampler).
    Only the annotations are read, never the feature files. Shown for one epoch:

    - samples and loss weight per progress bin (early, mid, late), and a progress histogram;
    - samples per video and per action;
    - what the sampler rejected and why;
    - one video's timeline: its segments and the sampled segments under them.
    """
    from alignprog.evaluation.sampling_report import sampling_report
    from alignprog.plots import png_bytes, require_matplotlib, sampling_figure

    cfg = resolve_config(config, set_, {
        "data.root": one_path("--dataset", dataset, root, "ROOT"),
        "data.annotations": annotations,
        "data.strict": False if lenient else None,
        "data.fps.preset": fps_preset.value if fps_preset else None,
    })
    if plot is not None:
        require_matplotlib()  # fail before the work, not after
    rep = sampling_report(cfg, split=split, seed=seed, video=video)
    for warning in rep["warnings"]:
        report("warning", warning)
    if rep["stratified"]["samples"] == 0:
        report("warning", f"no samples drawn from the {split} split (see the rejections)")
    if plot is not None:
        write_figure(plot, png_bytes(sampling_figure(rep)))
    if as_json:
        typer.echo(json.dumps(rep, indent=2))
        return
    _print_report(rep)


# ----------------------------------------------------------------------------------------------
# Rendering


def _pct(x: float) -> str:
    return f"{x:.1%}"


def _print_report(rep: dict[str, Any]) -> None:
    s, ld = rep["settings"], rep["loader"]
    console.print(
        f"[bold]{escape(rep['dataset'])}[/], {s['split']} split, seed {s['seed']}: one epoch, "
        f"{ld['batches']} batches of <= {s['batch_size']} videos, {ld['videos_visited']} of "
        f"{ld['videos_in_split']} videos", highlight=False)
    weights = (f"min(1/gt, {s['weight_cap']:g})" if s["weighted_loss"]
               else "1 (progress.learnable.weighted_loss is off)")
    console.print(
        f"{s['samples_per_video']} draws x {s['frames_per_segment']} targets per video, "
        f"min_segment_len {s['min_segment_len']}, loss weight {weights}; training uses "
        f"{'stratified' if s['stratified_sampling'] else 'uniform'}", highlight=False)
    _bins_table(rep)
    _histogram(rep)
    _per_video(rep)
    _per_action(rep)
    _rejections(rep)
    _timeline(rep["timeline"])


def _bins_table(rep: dict[str, Any]) -> None:
    st, un = rep["stratified"], rep["uniform"]
    table = Table(title="progress bins: [bold blue]stratified[/] | [bold]uniform[/]",
                  title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("bin")
    for run in (st, un):
        for col in ("count", "share", "mean w", "w share"):
            table.add_column(Text(col, style=MODE_STYLE[run["stratified"]]), justify="right")
    for a, b in zip(st["bins"], un["bins"]):
        cells = [f"[{BIN_STYLE[a['bin']]}]{a['bin']}[/]"]
        for x in (a, b):
            cells += [str(x["count"]), _pct(x["share"]),
                      "-" if x["mean_weight"] is None else f"{x['mean_weight']:.2f}",
                      _pct(x["weight_share"])]
        table.add_row(*cells)
    table.add_section()
    cells = ["total"]
    for x in (st, un):
        mean = x["total_weight"] / x["samples"] if x["samples"] else None
        cells += [str(x["samples"]), _pct(1.0 if x["samples"] else 0.0),
                  "-" if mean is None else f"{mean:.2f}", _pct(1.0 if x["samples"] else 0.0)]
    table.add_row(*cells)
    print_table(table)
    lo, hi = st["bins"][0]["high"], st["bins"][1]["high"]
    console.print(f"bins of ground-truth progress gt: early <= {lo:g} < mid <= {hi:g} < late; "
                  "mean w: the bins' mean loss weight; w share: their share of the weighted "
                  "loss", style="dim", highlight=False)


def _bar(n: int, top: int, style: str) -> Text:
    full = n * HIST_WIDTH / top if top else 0
    return Text("█" * int(full) + ("▌" if full - int(full) >= 0.5 else ""), style=style)


def _histogram(rep: dict[str, Any]) -> None:
    st, un = rep["stratified"]["histogram"], rep["uniform"]["histogram"]
    top = max(st["counts"] + un["counts"], default=0)
    table = Table(title="ground-truth progress histogram", title_justify="left",
                  box=box.SIMPLE_HEAD)
    table.add_column("progress")
    table.add_column(Text("stratified", style=MODE_STYLE[True]), no_wrap=True)
    table.add_column("", justify="right")
    table.add_column(Text("uniform", style=MODE_STYLE[False]), no_wrap=True)
    table.add_column("", justify="right")
    edges = st["edges"]
    for i, (a, b) in enumerate(zip(st["counts"], un["counts"])):
        table.add_row(f"{edges[i]:.1f}-{edges[i + 1]:.1f}", _bar(a, top, "blue"), str(a),
                      _bar(b, top, "white"), str(b))
    print_table(table)


def _per_video(rep: dict[str, Any]) -> None:
    table = Table(title="samples per video", title_justify="left", box=box.SIMPLE_HEAD)
    for col in ("mode", "videos", "mean", "min", "max"):
        table.add_column(col, justify="left" if col == "mode" else "right")
    for run in (rep["stratified"], rep["uniform"]):
        pv = run["per_video"]
        table.add_row(Text("stratified" if run["stratified"] else "uniform",
                           style=MODE_STYLE[run["stratified"]]),
                      str(pv["videos"]), f"{pv['mean']:.1f}", str(pv["min"]), str(pv["max"]))
    print_table(table)


def _per_action(rep: dict[str, Any], top: int = 10) -> None:
    st, un = rep["stratified"]["per_action"], rep["uniform"]["per_action"]
    uniform = {a["label"]: a["count"] for a in un}
    table = Table(title=f"samples per action (top {min(top, len(st))} of {len(st)})",
                  title_justify="left", box=box.SIMPLE_HEAD)
    for col in ("label", "name", "stratified", "uniform"):
        table.add_column(col, justify="right" if col in ("stratified", "uniform") else "left")
    for a in st[:top]:
        table.add_row(escape(a["label"]), escape(a["name"]), str(a["count"]),
                      str(uniform.get(a["label"], 0)))
    print_table(table)


def _rejections(rep: dict[str, Any]) -> None:
    s, ld, act = rep["settings"], rep["loader"], rep["actions"]
    runs = rep["stratified"], rep["uniform"]
    st, un = (r["stats"] | {k: r[k] for k in ("missing_targets", "extra_targets")} for r in runs)
    m, n = s["min_segment_len"], s["frames_per_segment"]
    table = Table(title="rejected or lost, and why", title_justify="left", box=box.SIMPLE_HEAD,
                  pad_edge=False)
    table.add_column("what", no_wrap=True)
    table.add_column(Text("stratified", style=MODE_STYLE[True]), justify="right")
    table.add_column(Text("uniform", style=MODE_STYLE[False]), justify="right")
    table.add_column("why")
    skipped = ", ".join(ld["skipped_tasks"])
    rows = [
        ("videos skipped by the loader", ld["videos_skipped"], ld["videos_skipped"],
         "single-video task in the split: no pair" + (f" ({skipped})" if skipped else "")),
        ("videos left out this epoch", ld["videos_dropped_incomplete_batch"],
         ld["videos_dropped_incomplete_batch"], "in an incomplete last batch (drop_last)"),
        (f"actions shorter than {m}", act["shorter_than_min_segment_len"],
         act["shorter_than_min_segment_len"],
         f"< min_segment_len: never drawn (of {act['foreground']} actions)"),
        ("videos without usable action", st["videos_without_usable_action"],
         un["videos_without_usable_action"], "only background or short actions"),
        ("  of which all background", st["all_background_videos"], un["all_background_videos"],
         "no foreground segment"),
        (f"draws with < {n} targets", st["short_draws"], un["short_draws"],
         f"fewer than {n} candidates (length - {m - 1})"),
        ("targets lost to short actions", st["missing_targets"], un["missing_targets"],
         f"those draws' shortfall from {n}"),
    ]
    if st["extra_targets"] or un["extra_targets"]:
        rows.append((f"targets beyond {n} per draw", st["extra_targets"], un["extra_targets"],
                     "stratified: one per non-empty bin even when that is more"))
    for what, a, b, why in rows:
        table.add_row(what, str(a), str(b), why)
    table.add_section()
    table.add_row("draws", str(st["draws"]), str(un["draws"]),
                  f"{s['samples_per_video']} per usable video visited")
    table.add_row("targets (samples)", str(st["targets"]), str(un["targets"]), "")
    print_table(table)


def _col(frame: int, num_frames: int, width: int) -> int:
    return min(width - 1, frame * width // max(num_frames, 1))


def _timeline(tl: dict[str, Any] | None) -> None:
    if tl is None:
        console.print("timeline: no video got samples", highlight=False)
        return
    n = tl["num_frames"]
    draws: dict[int, list[dict[str, Any]]] = {}
    for smp in tl["samples"]:
        draws.setdefault(smp["draw"], []).append(smp)
    info = {}  # per draw: the action and its targets' gt, written right of the ruler
    for d, smps in draws.items():
        seg = tl["segments"][smps[0]["action"]]
        gts = sorted(smps, key=lambda x: x["target"])
        info[d] = (f"  {seg['name']} {seg['start']}-{seg['end']}:",
                   [(f" {x['gt']:.2f}".replace(" 0.", " ."), BIN_STYLE[x["bin"]]) for x in gts])
    longest = max((len(a) + sum(len(t) for t, _ in b) for a, b in info.values()), default=0)
    label_w = 10
    # The ruler takes what the terminal leaves beside the per-draw text.
    width = max(20, min(TIMELINE_WIDTH, console.width - label_w - 1 - longest))
    console.print(f"[bold]timeline[/] of {escape(tl['handle'])} ({escape(tl['task'])}, {n} "
                  f"frames, stratified run): one row per draw, the action's prefix up to its "
                  f"targets [{BIN_STYLE['early']}]e[/] early, [{BIN_STYLE['mid']}]m[/] mid, "
                  f"[{BIN_STYLE['late']}]l[/] late, then the targets' gt", highlight=False)
    if not tl["visited"]:
        console.print("  not visited this epoch (left out by the loader): no samples",
                      highlight=False)
    ruler = [" "] * width
    ticks = Text(" " * (label_w + 1))
    marks = sorted({0, n // 4, n // 2, 3 * n // 4, n - 1})
    for f in marks:
        ruler[_col(f, n, width)] = "┬"
    numbers = [" "] * (width + 6)
    for f in marks:
        label = str(f)
        c = min(_col(f, n, width), width + 6 - len(label))
        numbers[c:c + len(label)] = label
    console.print(Text(" " * (label_w + 1)) + Text("".join(numbers).rstrip(), style="dim"))
    console.print(ticks + Text("".join(ruler), style="dim"))

    styles: dict[str, str] = {}
    seg_line = Text("segments".ljust(label_w) + " ")
    cells = [Text("·", style="dim")] * width
    shade = 0
    for seg in tl["segments"]:
        if not seg["foreground"]:
            continue
        style = styles.setdefault(seg["name"], ACTION_STYLES[len(styles) % len(ACTION_STYLES)])
        char = "█▓"[shade % 2]  # neighbouring actions stay apart without colour
        shade += 1
        for c in range(_col(seg["start"], n, width), _col(seg["end"], n, width) + 1):
            cells[c] = Text(char, style=style)
    for cell in cells:
        seg_line.append_text(cell)
    console.print(seg_line, no_wrap=True, overflow="crop")

    for d, smps in sorted(draws.items()):
        seg = tl["segments"][smps[0]["action"]]
        row = [Text(" ")] * width
        last = max(x["target"] for x in smps)
        for c in range(_col(seg["start"], n, width), _col(seg["end"], n, width) + 1):
            row[c] = Text("─", style="dim")
        for c in range(_col(seg["start"], n, width), _col(last, n, width) + 1):
            row[c] = Text("━", style=styles.get(seg["name"], ""))
        for x in smps:
            style = f"bold {BIN_STYLE[x['bin']]}"
            row[_col(x["target"], n, width)] = Text(x["bin"][0], style=style)
        line = Text(f"draw {d}".ljust(label_w) + " ")
        for cell in row:
            line.append_text(cell)
        line.append(info[d][0])
        for text, style in info[d][1]:
            line.append(text, style=style)
        console.print(line)
    legend = ", ".join(f"[{st}]{escape(name)}[/]" for name, st in styles.items())
    console.print(f"actions: {legend}" if legend else "actions: none (all background)",
                  highlight=False)
