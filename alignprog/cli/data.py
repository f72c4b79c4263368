"""`alignprog data synth`, `alignprog data annotate` and `alignprog data check`."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from alignprog.cli.common import (AnnotationsOpt, ConfigOpt, FpsPresetOpt, Layout, LenientOpt,
                                   SetOpt, console, default_of, dtype_choice, err_console, fail,
                                   guarded, one_path, print_table, report, resolve_config)
from alignprog.config import Config
from alignprog.errors import DataError

app = typer.Typer(help="Create and validate datasets.", no_args_is_help=True,
                  rich_markup_mode="rich")


# --dtype's spelling -> numpy's, which the writer takes.
NUMPY_DTYPE = {"fp32": "float32", "fp16": "float16"}


class Timelines(str, Enum):
    generated = "generated"
    egoprocel = "egoprocel"


@app.command(epilog="Examples:\n\n  alignprog data synth --out data/synth --tasks 3 "
             "--videos-per-task 10 --dim 256\n\n  alignprog data synth --out data/ego-like "
             "--timelines egoprocel --dim 256 --dtype fp16")
@guarded
def synth(
    out_dir: Annotated[Optional[Path], typer.Argument(
        help="The same as --out (the shorter spelling).", show_default=False)] = None,
    out: Annotated[Optional[Path], typer.Option(
        "--out", help="Folder to create: the dataset root (must be new or empty).",
        show_default=False)] = None,
    tasks: Annotated[Optional[int], typer.Option(
        help="Number of tasks.", show_default=default_of(Config, "data.synthetic.tasks"))] = None,
    videos_per_task: Annotated[Optional[int], typer.Option(
        help="Videos per task.",
        show_default=default_of(Config, "data.synthetic.videos_per_task"))] = None,
    dim: Annotated[Optional[int], typer.Option(
        help="Feature dimension of features/*.npy.",
        show_default=default_of(Config, "data.synthetic.dim"))] = None,
    layout: Annotated[Layout, typer.Option(
        help="Which arrays to write: features (T, D), frames (T, C, S, S) or both. frames is "
        "large: about 400 KB per frame at 1024x14x14 fp16.")] = Layout.features,
    frame_channels: Annotated[Optional[int], typer.Option(
        help="Channels C of the frames layout.",
        show_default=default_of(Config, "data.synthetic.frame_channels"))] = None,
    frame_size: Annotated[Optional[int], typer.Option(
        help="Spatial size S of the frames layout.",
        show_default=default_of(Config, "data.synthetic.frame_size"))] = None,
    seed: Annotated[Optional[int], typer.Option(
        help="Generator seed: the same seed writes the same dataset.",
        show_default=default_of(Config, "data.synthetic.seed"))] = None,
    dtype: Annotated[Optional[str], typer.Option(
        help="Array dtype on disk.",
        show_default="fp32 for features, fp16 for frames", **dtype_choice("fp32", "fp16"))
    ] = None,
    timelines: Annotated[Optional[Timelines], typer.Option(
        help="generated: drawn procedures (the quick demo). egoprocel: the real EgoProceL "
        "timelines (every non-CMU task at 1 fps: short actions, long background, repeats) with "
        "features in which progress is hard to see; --tasks and --videos-per-task do not apply.",
        show_default=default_of(Config, "data.synthetic.timelines"))] = None,
    cmu: Annotated[Optional[bool], typer.Option(
        "--cmu/--no-cmu", help="egoprocel timelines: also the CMU tasks (paired by position).",
        show_default=default_of(Config, "data.synthetic.cmu",
                                {True: "cmu", False: "no-cmu"}))] = None,
    overwrite: Annotated[bool, typer.Option(
        help="Replace the --out folder if it is not empty (only a dataset root that data synth "
        "wrote).")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Write the synthetic procedural dataset as a dataset root.

    The root holds dataset.json (EgoProceL format), id2action.txt, splits.json and
    features/<handle>.npy (and/or frames/<handle>.npy): exactly what --dataset ROOT reads.
    """
    from alignprog.data.write import write_synthetic_root

    out_dir = one_path("--out", out, out_dir, "OUT_DIR")
    if out_dir is None:
        fail("missing --out DIR: the folder to write the dataset root to", 2)
    cfg = resolve_config(config, set_, {
        "data.synthetic.tasks": tasks, "data.synthetic.videos_per_task": videos_per_task,
        "data.synthetic.dim": dim, "data.synthetic.frame_channels": frame_channels,
        "data.synthetic.frame_size": frame_size, "data.synthetic.seed": seed,
        "data.synthetic.timelines": timelines.value if timelines else None,
        "data.synthetic.cmu": cmu,
    })
    layouts = ["features", "frames"] if layout is Layout.both else [layout.value]
    dtype = dtype or ("fp16" if layouts == ["frames"] else "fp32")
    with Progress(TextColumn("writing"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err_console, transient=True) as bar:
        job = bar.add_task("videos", total=None)
        n = write_synthetic_root(cfg.data, out_dir, layouts=layouts,
                                 dtype=NUMPY_DTYPE[dtype], overwrite=overwrite,
                                 progress=lambda done, total: bar.update(
                                     job, completed=done, total=total))
    s = cfg.data.synthetic
    ntasks = s.tasks if s.timelines == "generated" else "EgoProceL"
    console.print(f"wrote {n} videos ({ntasks} tasks, layout {'+'.join(layouts)}, "
                  f"{dtype}, seed {s.seed}) to {escape(str(out_dir))}", highlight=False)


@app.command(epilog="Examples:\n\n  alignprog data annotate segments.csv --dataset data/my-videos"
             "\n\n"
             "  segments.csv:\n\n    task,video,start,end,label\n    coffee,v01,0,11,SIL\n"
             "    coffee,v01,12,40,grind beans\n    coffee,v01,41,70,pour water")
@guarded
def annotate(
    segments: Annotated[Path, typer.Argument(
        help="CSV with a header row: task,video,start,end,label (inclusive feature-frame "
        "indices; rows in any order).", show_default=False)],
    root: Annotated[Optional[Path], typer.Argument(
        hidden=True, help="Older spelling of --dataset.", show_default=False)] = None,
    dataset: Annotated[Optional[Path], typer.Option(
        "--dataset", help="The dataset root (required; e.g. the --out of extract-features) to "
        "write dataset.json and id2action.txt into; its features/ give each video's length.",
        show_default=False)] = None,
    overwrite: Annotated[bool, typer.Option(
        help="Replace an existing dataset.json / id2action.txt.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Write a dataset root's annotation files from a CSV of segments.

    Every distinct action label gets an id from 1 (id2action.txt), labels in
    data.background_labels ('0', 'SIL', 'background') are background ('0'), and so are gaps
    between segments and, where ROOT/features/<video>.npy exists, the frames after the last
    segment. Then `alignprog data check --dataset ROOT` and `alignprog train --dataset ROOT` read
    the root.
    """
    from alignprog.data.annotate import write_annotations

    root = one_path("--dataset", dataset, root, "ROOT")
    if root is None:
        fail("missing --dataset ROOT: the dataset root to write the annotation files into", 2)
    cfg = resolve_config(config, set_, {})
    counts = write_annotations(segments, root, background=cfg.data.background_labels,
                               overwrite=overwrite)
    console.print(f"wrote {escape(str(root / 'dataset.json'))} and id2action.txt: "
                  f"{counts['tasks']} tasks, {counts['videos']} videos, {counts['segments']} "
                  f"segments, {counts['actions']} actions", highlight=False, soft_wrap=True)


@app.command(epilog="Examples:\n\n  alignprog data check\n\n  alignprog data check --dataset "
             "data/synth\n\n  alignprog data check --dataset data/ego --annotations "
             "egoprocel.json --fps-preset egoprocel --lenient")
@guarded
def check(
    root: Annotated[Optional[Path], typer.Argument(
        help="The same as --dataset (the shorter spelling).", show_default=False)] = None,
    dataset: Annotated[Optional[Path], typer.Option(
        "--dataset", help="Dataset root to check. Unset: the embedded synthetic dataset.",
        show_default=False)] = None,
    annotations: AnnotationsOpt = None,
    id2action: Annotated[Optional[Path], typer.Option(
        help="Action vocabulary (`<id> <name>` lines). Default: <json stem>-id2action.txt beside "
        "the JSON, else ROOT/id2action.txt.", show_default=False)] = None,
    tasks: Annotated[Optional[list[str]], typer.Option(
        "--task", help="Keep only this task (name or pattern like '*.egtea'; repeatable).",
        show_default=False)] = None,
    lenient: LenientOpt = False,
    fps_preset: FpsPresetOpt = None,
    feature_fps: Annotated[Optional[float], typer.Option(
        help="Frame rate of the feature files.",
        show_default=default_of(Config, "data.fps.feature"))] = None,
    split_file: Annotated[Optional[Path], typer.Option(
        help="Explicit split file (the reference fork's data_splits.json format). Default: "
        "ROOT/splits.json if present, else the configured fractions and seed.",
        show_default=False)] = None,
    write_split: Annotated[Optional[Path], typer.Option(
        help="Write the split actually used to this file (with its SHA-256).",
        show_default=False)] = None,
    scan: Annotated[bool, typer.Option(
        help="Read every array in full to find NaN/Inf and unreadable data.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Validate a dataset and print a summary (tasks, videos, lengths, background, repairs).

    Every layout present (features/, frames/) is opened; every problem is printed on one line
    naming the file, task and handle, and the exit code is 1 if there is any.
    """
    from alignprog.data.dataset import DatasetErrors, load_dataset, scan_arrays, training_problems
    from alignprog.data.splits import write_splits

    cfg = resolve_config(config, set_, {
        "data.root": one_path("--dataset", dataset, root, "ROOT"),
        "data.annotations": annotations, "data.id2action": id2action,
        "data.tasks": tasks, "data.strict": False if lenient else None,
        "data.fps.preset": fps_preset.value if fps_preset else None,
        "data.fps.feature": feature_fps, "data.split.file": split_file,
    })
    try:
        ds = load_dataset(cfg.data, all_layouts=True, collect=True)
    except DatasetErrors as exc:
        for err in exc.errors:
            report("error", err)
        err_console.print(f"{len(exc.errors)} problem(s) found", highlight=False)
        raise typer.Exit(1)
    problems = scan_arrays(ds) if scan else []
    try:
        training_problems(ds, cfg.data)
    except DataError as exc:   # train would refuse it: an error here too
        problems.append(exc)
    summary = ds.summary()
    for warning in summary["warnings"]:
        report("warning", warning)
    if write_split is not None:
        write_splits(ds.splits, write_split)
        err_console.print(f"split written to {escape(str(write_split))}", highlight=False)
    if as_json:
        typer.echo(json.dumps(summary | {"problems": [str(p) for p in problems]}, indent=2))
    else:
        _print_summary(summary)
    for problem in problems:
        report("error", problem)
    if problems:
        err_console.print(f"{len(problems)} problem(s) found", highlight=False)
        raise typer.Exit(1)


def _print_summary(s: dict) -> None:
    shapes = ", ".join(f"{k} {tuple(v)}" for k, v in s["shapes"].items())
    console.print(f"[bold]{escape(s['name'])}[/]  annotations: {escape(s['annotations'])}  "
                  f"layouts: {shapes}", highlight=False, soft_wrap=True)
    table = Table(title="tasks", title_justify="left")
    for col, justify in [("task", "left"), ("videos", "right"), ("train/val/test", "right"),
                         ("frames min/med/max", "right"), ("background", "right"),
                         ("actions", "right"), ("fg segments", "right"),
                         ("fg seg len (med)", "right")]:
        table.add_column(col, justify=justify)
    total = dict(s["total"], task="[bold]total[/]")
    for row in s["tasks"] + [total]:
        table.add_row(row["task"] if row is total else escape(row["task"]), str(row["videos"]),
                      f"{row['train']}/{row['val']}/{row['test']}",
                      f"{row['length_min']}/{row['length_median']:g}/{row['length_max']}",
                      f"{row['background_fraction']:.0%}", str(row["actions"]),
                      str(row["foreground_segments"]), f"{row['segment_length_median']:g}")
    print_table(table)
    console.print(f"split: {escape(s['split']['description'])} "
                  f"(sha256 {s['split']['sha256'][:12]})", highlight=False, soft_wrap=True)
    if s["repairs"]:
        repairs = Table(title="repairs (annotation fitted to the feature length)",
                        title_justify="left")
        for col in ("repair", "count", "example"):
            repairs.add_column(col)
        for r in s["repairs"]:
            repairs.add_row(r["kind"], str(r["count"]), escape(r["example"]))
        print_table(repairs)
    else:
        console.print("repairs: none")
