"""`alignprog eval-progress`: a trained run's progress error against ground truth and baselines.

Loads the run's model from a checkpoint, the dataset from the checkpoint's config (and the
run's split.json), runs `evaluation.report.evaluate_progress` with the cumulative_l2 predictor
and the video-level OGPE on, optionally the alignment metrics, then prints tables (or JSON),
saves ``evaluation_<split>.json`` in the run and, with ``--plots``, writes PNG figures.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from alignprog.cli.common import (console, err_console, fail, guarded, print_table, report,
                                   split_choice)
from alignprog.errors import AlignprogError

EPILOG = ("Examples:\n\n  alignprog eval-progress runs/lav-20240101-120000\n\n"
          "  alignprog eval-progress runs/my-run --split val --checkpoint last --json\n\n"
          "  alignprog eval-progress runs/my-run --alignment --plots figures/my-run\n\n"
          "  alignprog eval-progress runs/my-run --baselines constant_0.5,frame_count,random")

DEFAULT_BASELINES = ("constant_0.5", "frame_count", "random", "constant_0", "constant_0.25",
                     "constant_0.75", "constant_1")
# Videos whose progress curves --plots draws at most (spread over the split).
PLOT_VIDEOS = 4
PROTOCOL = ("action-level rows: mean |prediction - (t - s + 1)/L| over foreground frames, "
            "online (each frame sees its action's prefix), oracle-segmented (GT action bounds), "
            "never comparable with the paper's video-level OPE; video-level rows: OGPE, "
            "all frames, normaliser from the training split only")


def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (int, float)):
        return format(value, spec) if isinstance(value, float) else str(value)
    return str(value)


# ----------------------------------------------------------------------------------------------
# Tables


def _action_table(rep: dict) -> Table:
    t = Table(title=f"action-level progress error on the {rep['split']} split (MAE; lower is "
              "better)", title_justify="left")
    t.add_column("predictor", no_wrap=True)
    for col in ("videos", "all frames", "tasks", "early", "mid", "late", "monotonic",
                "first 10%", "last 10%", "spearman"):
        t.add_column(col, justify="right")
    for name, entry in rep["predictors"].items():
        m = entry["metrics"]
        bins = m["by_progress"]
        t.add_row(name, _fmt(m["mae"]["mean_over_videos"]), _fmt(m["mae"]["pooled"]),
                  _fmt(m["mae"]["mean_over_tasks"]),
                  *(_fmt(bins[b]["mae"]) for b in ("early", "mid", "late")),
                  _fmt(m["monotonicity"]["share"], ".3f"),
                  _fmt(m["endpoints"]["first_10pct"]), _fmt(m["endpoints"]["last_10pct"]),
                  _fmt(m["spearman"]["mean"], ".3f"))
    t.caption = ("videos / tasks: mean of per-video / per-task MAE; all frames: pooled; early, "
                 "mid, late: GT progress bins; monotonic: share of non-decreasing steps within "
                 "actions")
    return t


def _headline(rep: dict, *, raw: bool = True) -> list[str]:
    """The model's predictors and the informative baselines (constant 0.5, frame count,
    random); the other constants and the offline diagnostic stay in the main table and the JSON."""
    skip = {"cumulative_l2_offline"} | (set() if raw else {"cumulative_l2_raw"})
    return [n for n, e in rep["predictors"].items()
            if (e["kind"] != "constant" or n == "constant_0.5") and n not in skip]


def _per_task_table(rep: dict) -> Table:
    names = _headline(rep)
    t = Table(title="per task (MAE, mean over the task's videos)", title_justify="left")
    t.add_column("task", no_wrap=True)
    t.add_column("videos", justify="right")
    t.add_column("frames", justify="right")
    for n in names:
        t.add_column(n, justify="right")
    tasks = rep["counts"]["videos_per_task"]
    first = rep["predictors"][names[0]]["metrics"]["per_task"] if names else {}
    for task in tasks:
        t.add_row(task, str(tasks[task]), _fmt((first.get(task) or {}).get("frames")),
                  *(_fmt((rep["predictors"][n]["metrics"]["per_task"].get(task) or {}).get("mae"))
                    for n in names))
    return t


def _video_table(rep: dict) -> Table:
    vl = rep["video_level"]
    t = Table(title=f"video-level OGPE on the {rep['split']} split (all frames, "
              "background included)", title_justify="left")
    t.add_column("predictor", no_wrap=True)
    for col in ("videos", "all frames", "tasks", "monotonic", "last frame"):
        t.add_column(col, justify="right")
    for name, entry in vl["predictors"].items():
        for variant in ("raw", "clipped"):
            if variant not in entry:
                continue
            m = entry[variant]
            label = name if "clipped" not in entry else f"{name} ({variant})"
            t.add_row(label, _fmt(m["ogpe"]["mean_over_videos"]), _fmt(m["ogpe"]["pooled"]),
                      _fmt(m["ogpe"]["mean_over_tasks"]), _fmt(m["monotonicity"]["share"], ".3f"),
                      _fmt(m["last_frame"]))
    norm = vl["normaliser"]["per_task"]
    parts = [f"{task}: {_fmt(v.get('mean'), '.4g')} over {v['videos']} videos"
             + (" (fallback: all tasks)" if v.get("fallback") else "")
             for task, v in norm.items() if "mean" in v]
    if parts:
        t.caption = (f"G_hat (mean total path, {vl['normaliser']['split']} split): "
                     + "; ".join(parts))
    return t


def _counts_line(rep: dict) -> str:
    c = rep["counts"]
    line = (f"{c['videos']} of {c['videos_in_split']} videos ({c['tasks']} tasks), "
            f"{c['actions']} actions, {c['foreground_frames']} foreground frames "
            f"({c['background_frames_excluded']} background excluded)")
    if c["videos_skipped_no_foreground"]:
        line += (f"; skipped (no action): {c['videos_skipped_no_foreground']}: "
                 + ", ".join(c["skipped_handles"][:5]))
    vl = rep.get("video_level")
    if vl and vl["counts"]["videos_skipped_zero_path"]:
        line += f"; video-level skipped (zero path): {vl['counts']['videos_skipped_zero_path']}"
    return line


def _numeric_leaves(d: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> number (or None) for every numeric leaf of a nested dict."""
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out |= _numeric_leaves(v, f"{prefix}{k}.")
    elif d is None or (isinstance(d, (int, float)) and not isinstance(d, bool)):
        out[prefix[:-1]] = d
    return out


def _task_table(title: str, per_task: dict[str, Any]) -> Table:
    """Rows = tasks and columns = numeric leaves, transposed when there are more leaves than
    tasks (a metric with many variants stays readable)."""
    rows = {str(task): _numeric_leaves(v) for task, v in per_task.items()}
    cols = list(dict.fromkeys(c for leaves in rows.values() for c in leaves))
    t = Table(title=title, title_justify="left")
    if len(cols) > max(len(rows), 6):
        t.add_column("metric", no_wrap=True)
        for task in rows:
            t.add_column(task, justify="right")
        for c in cols:
            t.add_row(c, *(_fmt(rows[task].get(c)) for task in rows))
    else:
        t.add_column("task", no_wrap=True)
        for c in cols:
            t.add_column(c, justify="right")
        for task, leaves in rows.items():
            t.add_row(task, *(_fmt(leaves.get(c)) for c in cols))
    return t


def _generic_tables(d: dict, title: str) -> list[Table | str]:
    """Render a report of unknown shape (the alignment metrics): short scalars on one line,
    long ones (protocol text) on a line each, a ``per_task`` dict as a task table with the
    remaining numbers (the aggregates) as its caption, other dicts recursively."""
    out: list[Table | str] = []
    scalars = {k: v for k, v in d.items() if not isinstance(v, dict)}
    short = [f"{k}: {_fmt(v)}" for k, v in scalars.items() if len(_fmt(v)) <= 60]
    if short:
        out.append(f"[bold]{escape(title)}[/] " + escape("; ".join(short)))
    out.extend(f"[bold]{escape(title)}.{escape(str(k))}[/] {escape(_fmt(v))}"
               for k, v in scalars.items() if len(_fmt(v)) > 60)
    rest = {k: v for k, v in d.items() if isinstance(v, dict) and v}
    if isinstance(rest.get("per_task"), dict):
        out.append(_task_table(f"{title} per task", rest.pop("per_task")))
        summary = _numeric_leaves(rest)
        if summary:
            out.append(f"[bold]{escape(title)} overall[/] "
                       + escape("; ".join(f"{k} {_fmt(v)}" for k, v in summary.items())))
        return out
    for key, value in rest.items():
        out.extend(_generic_tables(value, f"{title}.{key}"))
    return out


def print_report(rep: dict) -> None:
    ck = rep["checkpoint"]
    console.print(f"[bold]run[/] {escape(rep['run'])}  [bold]checkpoint[/] "
                  f"{escape(ck['path'])} (step {ck['step']}, epoch {ck['epoch']})",
                  highlight=False, soft_wrap=True)
    console.print(f"[bold]split[/] {rep['split']} of {escape(rep['dataset'])}, sha256 "
                  f"{rep['split_sha256'][:16]}; normalisers and priors from the "
                  f"{rep['train_split']} split; device {rep['device']}", highlight=False,
                  soft_wrap=True)
    console.print(f"[bold]protocol[/] {escape(rep['protocol'])}", highlight=False,
                  soft_wrap=True)
    console.print(f"[bold]trained predictor[/] {escape(rep['trained_predictor']['description'])}",
                  highlight=False, soft_wrap=True)
    console.print(f"[bold]counts[/] {escape(_counts_line(rep))}", highlight=False,
                  soft_wrap=True)
    print_table(_action_table(rep))
    print_table(_per_task_table(rep))
    if rep.get("video_level", {}).get("predictors"):
        print_table(_video_table(rep))
    if "alignment" in rep:
        for item in _generic_tables(rep["alignment"], "alignment"):
            if isinstance(item, Table):
                print_table(item)
            else:
                console.print(item, highlight=False, soft_wrap=True)


# ----------------------------------------------------------------------------------------------
# Plots


def write_plots(rep: dict, curves: list[dict], out_dir: Path) -> list[Path]:
    """progress_curves.png (GT and predictions of a few videos, actions shaded) and
    error_by_bin.png (MAE per GT progress bin per predictor), written atomically."""
    from alignprog.fileio import atomic_write_bytes
    from alignprog.plots import (error_by_bin_figure, png_bytes, progress_curves_figure,
                                 require_matplotlib)

    require_matplotlib()
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = []
    if curves:
        figures.append(("progress_curves.png", progress_curves_figure(curves, rep["split"])))
    figures.append(("error_by_bin.png", error_by_bin_figure(rep, _headline(rep, raw=False))))
    written = []
    for name, fig in figures:
        path = out_dir / name
        atomic_write_bytes(path, png_bytes(fig))
        written.append(path)
    return written


# ----------------------------------------------------------------------------------------------
# The command


class Phases:
    """The command's phases on stderr while it works: a spinner, what it is doing and the time
    each phase took, one line per phase. Off (renders nothing) when `out` is not a terminal, so
    piped or redirected output and ``--json`` stay clean; it never writes to stdout.

    The evaluators have no progress hook, so the command calls `phase` between their calls."""

    def __init__(self, out: Console | None = None) -> None:
        out = err_console if out is None else out
        self.progress = Progress(SpinnerColumn(finished_text="[green]done[/]"),
                                 TextColumn("{task.description}"), TimeElapsedColumn(),
                                 console=out, disable=not out.is_terminal)
        self.task: Any = None

    def __enter__(self) -> "Phases":
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done()
        self.progress.stop()

    def phase(self, description: str) -> None:
        """Mark the current phase done and start `description` (plain text)."""
        self.done()
        self.task = self.progress.add_task(escape(description), total=1)

    def done(self) -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=1)
            self.task = None


def _baselines(values: list[str] | None) -> tuple[str, ...]:
    from alignprog.evaluation.baselines import parse_baseline

    if not values:
        return DEFAULT_BASELINES
    names = [n.strip() for v in values for n in v.split(",") if n.strip()]
    for name in names:
        try:
            parse_baseline(name)
        except ValueError as exc:
            raise AlignprogError(f"--baselines: {exc}") from None
    return tuple(dict.fromkeys(names))


def _trained_predictor(cfg) -> dict:
    pc = cfg.progress
    if not pc.enabled:
        return {"method": "none", "predictor": None,
                "description": "none (alignment only): the cumulative_l2 rows read progress off "
                "the embeddings"}
    if pc.method == "learnable":
        return {"method": "learnable", "predictor": "head",
                "description": f"learnable head ({pc.learnable.arch}): the 'head' row"}
    return {"method": "cumulative_l2", "normaliser": pc.cumulative_normaliser,
            "predictor": "cumulative_l2" if pc.cumulative_normaliser == "class"
            else "cumulative_l2_offline",
            "description": f"cumulative_l2 (normaliser '{pc.cumulative_normaliser}' in the "
            "config): the cumulative_l2 rows"}


@guarded
def eval_progress(
    run_dir: Annotated[Path, typer.Argument(
        help="Run directory written by `alignprog train` (runs/NAME).", show_default=False)],
    split: Annotated[str, typer.Option(
        help="Split to evaluate: train, val or test. Normalisers and priors always come from "
        "train.", **split_choice())] = "test",
    dataset: Annotated[Optional[Path], typer.Option(
        help="Dataset root to read instead of the one in the run's config (same videos; the "
        "run's split.json is used).", show_default="the run's")] = None,
    checkpoint: Annotated[str, typer.Option(
        help="best (lowest validation loss; the latest if none), last (highest step), or a "
        "checkpoint directory (absolute, or a name under the run's checkpoints/).")] = "best",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    alignment: Annotated[bool, typer.Option(
        "--alignment", help="Also compute the alignment metrics (Kendall's tau, EAE, phase "
        "classification and progression: probes fitted on train, scored on --split).")] = False,
    json_: Annotated[bool, typer.Option(
        "--json", help="Print the report as JSON on stdout (diagnostics on stderr).")] = False,
    plots: Annotated[Optional[Path], typer.Option(
        help=f"Folder to write several PNG figures into (--plots DIR; one-figure commands "
        f"take --plot FILE): progress curves of up to {PLOT_VIDEOS} videos of the split "
        "(actions shaded and labelled) and the error per progress bin.",
        show_default=False)] = None,
    baselines: Annotated[Optional[list[str]], typer.Option(
        help="Baselines, comma-separated or repeated: constant_<c> (c in [0, 1]), frame_count, "
        "random (seeds 0..9 averaged) or random_<seed>.",
        show_default=", ".join(DEFAULT_BASELINES))] = None,
) -> None:
    """Evaluate a trained run's progress predictions against ground truth and baselines.

    Reports the learnable head (online, action-level), the cumulative_l2 progress of the
    embeddings (normalised by training-split path lengths, clipped and raw), the video-level
    OGPE, and the naive baselines, with shape metrics (monotonicity, endpoint errors) beside the
    errors. The report is saved as evaluation_<split>.json in the run directory.
    """
    from alignprog.training.distributed import is_main_process

    if not is_main_process():
        return  # under torchrun, rank 0 alone evaluates and writes the report
    if alignment and split == "train":
        fail("--alignment fits its probes on the train split; scoring them on train would "
             "report training accuracy: choose --split val or test", 2)
    names = _baselines(baselines)

    from alignprog.evaluation.report import evaluate_progress
    from alignprog.training.restore import open_run
    from alignprog.training.rundir import to_json_value

    evaluate_alignment = None
    if alignment:
        from alignprog.evaluation.alignment import evaluate_alignment

    # Refuses a damaged checkpoint or corrupted weights in one line, before reading any data.
    opened = open_run(run_dir, checkpoint=checkpoint, dataset=dataset, device=device)
    run, ckpt, dev = opened.run, opened.checkpoint, opened.device
    cfg, model, state = opened.config, opened.model, opened.state
    err_console.print(f"evaluating {escape(str(ckpt))} on the {split} split of "
                      f"{escape(str(opened.data_config.root or 'the synthetic dataset'))} "
                      f"({dev})", highlight=False, soft_wrap=True)
    with Phases() as phases:
        phases.phase("reading the dataset")
        ds = opened.dataset  # read now, after the line above
        for warning in ds.warnings:
            report("warning", warning)
        n_split, n_train = len(ds.indices(split)), len(ds.indices("train"))
        if not n_split:
            fail(f"the {split} split of {ds.name} has no videos")
        if not n_train:
            fail(f"the train split of {ds.name} has no videos: the normalisers and priors "
                 "need it")

        phases.phase(f"embedding {n_split} {split} and {n_train} train videos, head "
                     f"predictions, baselines ({len(names)})")
        rep = evaluate_progress(model, ds, split, device=dev, baselines=names, cumulative=True,
                                video_level=True,
                                curves=PLOT_VIDEOS if plots is not None else 0)
        curves = rep.pop("curves", [])
        if evaluate_alignment is not None:
            phases.phase(f"alignment metrics (probes fitted on train, scored on {split})")
            rep["alignment"] = evaluate_alignment(model, ds, device=dev, train_split="train",
                                                  test_split=split)
    rep = {
        "run": str(run.path),
        "checkpoint": {"requested": checkpoint, "path": str(ckpt),
                       "step": state.get("step"), "epoch": state.get("epoch")},
        "device": str(dev),
        "protocol": PROTOCOL,
        "trained_predictor": _trained_predictor(cfg),
        "method": cfg.train.method,
    } | rep
    if plots is not None and len(curves) < PLOT_VIDEOS:
        report("note", f"--plots: progress curves of {len(curves)} video"
               f"{'s' if len(curves) != 1 else ''}, not {PLOT_VIDEOS}: the {split} split has "
               f"only {len(curves)} with an action")
    try:
        with Phases() as phases:
            phases.phase("writing the report" + (" and plots" if plots is not None else ""))
            # not eval_test.json: that is train's record of its final model
            saved = run.write_json(f"evaluation_{split}.json", rep)
            written = write_plots(rep, curves, plots) if plots is not None else []
    except OSError as exc:
        fail(f"cannot write {exc.filename or 'the output'}: {exc.strerror or exc}")

    if json_:
        typer.echo(json.dumps(to_json_value(rep), allow_nan=False))
    else:
        print_report(rep)
    err_console.print(f"report: {escape(str(saved))}", highlight=False, soft_wrap=True)
    for path in written:
        err_console.print(f"plot: {escape(str(path))}", highlight=False, soft_wrap=True)
