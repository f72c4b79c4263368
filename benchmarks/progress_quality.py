"""Does the progress head learn on realistic procedural data? Every method, against baselines.

    PYTHONPATH=. python -m benchmarks.progress_quality --out progress_quality_out
    PYTHONPATH=. python -m benchmarks.progress_quality --methods lav --epochs 1 --device cpu \
        --no-compare-none --out /tmp/pq                                   # the quick check
    PYTHONPATH=. python -m benchmarks.progress_quality --jobs 4 \
        --sweep progress.balance_ratio=1,2,3                              # a balance sweep

The data is the embedded synthetic dataset on the real EgoProceL timelines, 256-wide features
(`data.synthetic.timelines=egoprocel`, `data.synthetic.dim=256`; see
docs/data.md#egoprocel-timeline-data): the real orders, repeats, durations and background of
the 161 non-CMU EgoProceL videos, with an appearance that hides progress. It is loaded once;
every run trains on it with the configuration defaults plus the `--set KEY=VALUE` flags (which
apply to every run and may also replace the two data settings above), `--epochs`, `--device`
and `--seed`.

Every number is on the test split. The headline is the online action-level progress MAE, mean
over videos (docs/evaluation.md#online-action-level-mae): per frame of each true foreground
action, |prediction - (t - s + 1) / L|, background excluded. Rows of the table:

* one per method of `--methods` (default tcc, gtcc, lav, vava), trained with its defaults: the
  head's MAE, its ratio to the better of constant 0.5 and frame counting (below 1: the head
  beats both), and alignment metrics of the encoder (`evaluate_alignment`,
  docs/evaluation.md#alignment-metrics): Kendall's tau, tau in the wild, phase classification
  (foreground frames, every training frame labelled, mean over tasks) and EAE (lower is
  better), all means over tasks. With `--compare-none` (default) each method is trained once
  more with `progress.enabled=false`: "none" columns, alignment without any progress loss, and
  in the JSON the differences default minus none (does progress learning cost alignment?);
* baselines (docs/evaluation.md#progress-baselines), alignment columns empty: constant 0.5;
  frame counting (frames elapsed in the action over its label's mean training length); random
  (U[0, 1], 10 seeds); a ridge probe: per-frame ridge regression from one frame's raw features
  (log1p, standardised) to its progress, fitted on the training split's foreground frames, alpha
  picked on the validation split, clipped to [0, 1]: how much progress a single frame shows
  linearly; a GRU on the true segments: a causal one-layer GRU (hidden 128, linear + sigmoid)
  run over the raw features of each true action from its first frame, trained on the training
  split's actions: what a sequence model sees given the true segments and no alignment;
* with `--sweep KEY=v1,v2,...`, one more run per method and value (second table section, and
  `progress_quality_sweep.png`: head MAE against Kendall's tau, one series per method).

Writes to `--out` (default progress_quality_out): `progress_quality.json` (everything: configs,
overrides, environment, seconds per run, full reports), `progress_quality.md` (the table, also
printed at the end), `progress_quality.png` (MAE bars, lines at constant, frame counting and the
ridge probe). `--jobs N` trains in N spawned processes (several runs share one GPU).

How long: on one NVIDIA H200 shared by 7-10 runs, a default run (20 epochs, its alignment
metrics included) took 2.5-3.6 minutes for TCC, 2.7 GTCC, 3.2-4.4 LAV, 5.3-5.5 VAVA (a run
alone: not measured); each run holds up to ~16 GB of CUDA-graph pools (one per shape
bucket), so `--jobs 7` fits where 14 ran out of memory. On 2 CPU cores the quick check above
takes about 4.5 minutes (the LAV epoch 200 s, its alignment metrics 46 s, mostly the
phase-classification SVMs, the baselines 15 s); a default run is about an hour there. On a
busy machine `--threads 1` can be several times faster.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import math
import multiprocessing
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from alignprog.config import Config, load_config, parse_overrides
from alignprog.data import Dataset, VideoAnnotation, load_dataset
from alignprog.errors import ConfigError
from alignprog.evaluation import evaluate_alignment, evaluate_progress
from alignprog.evaluation.metrics import action_frames, progress_metrics

METHODS = ("tcc", "gtcc", "lav", "vava")
# The realistic data (docs/data.md#egoprocel-timeline-data); `--set` may replace either.
REALISTIC = {"data.synthetic.timelines": "egoprocel", "data.synthetic.dim": 256}
# Baselines of evaluate_progress (docs/evaluation.md#progress-baselines).
BASELINES = ("constant_0.5", "frame_count", "random")
BASELINE_TITLES = {"constant_0.5": "constant 0.5", "frame_count": "frame counting",
                   "random": "random", "ridge": "ridge probe (one frame)",
                   "gru": "GRU on true segments"}
RIDGE_ALPHAS = (0.1, 1.0, 10.0, 100.0, 1000.0)
GRU_HIDDEN = 128
GRU_STEPS = 400
GRU_BATCH = 32
GRU_LR = 1e-3
FILES = {"json": "progress_quality.json", "md": "progress_quality.md",
         "png": "progress_quality.png", "sweep_png": "progress_quality_sweep.png"}


def headline(metrics: dict | None) -> float | None:
    """The headline of a `progress_metrics` dict: MAE, mean over videos."""
    return None if metrics is None else metrics["mae"]["mean_over_videos"]


# ----------------------------------------------------------------------------------------------
# A split's raw features, its action-level targets, and scoring with the repository's metric code


@dataclass(frozen=True)
class SplitData:
    """The raw feature arrays (T_i, D) and canonical annotations of one split's videos."""

    arrays: list[np.ndarray]
    annotations: list[VideoAnnotation]


def split_data(dataset: Dataset, split: str, layout: str | None = None) -> SplitData:
    """The videos of `split` that have a foreground frame (as `evaluate_progress` keeps them),
    with their raw features of `layout` (default: the dataset's)."""
    keep = [i for i in dataset.indices(split)
            if dataset.videos[i].annotation.is_foreground.any()]
    return SplitData([dataset.load(i, layout) for i in keep],
                     [dataset.videos[i].annotation for i in keep])


def score(per_video: Sequence[np.ndarray], annotations: Sequence[VideoAnnotation]) -> dict:
    """`progress_metrics` of per-video predictions (T_i,) each on the videos' foreground frames:
    the code and aggregation `evaluate_progress` scores every predictor with."""
    frames = action_frames(annotations)
    return progress_metrics(frames.gather(per_video), frames)


def foreground_targets(annotation: VideoAnnotation) -> tuple[np.ndarray, np.ndarray]:
    """Foreground frame indices (N,) of a video and their action-level progress (N,):
    (t - s + 1) / L (docs/evaluation.md#action-level-ground-truth)."""
    frames, targets = [], []
    for s, n, fg in zip(annotation.starts, annotation.lengths, annotation.is_foreground):
        if fg:
            frames.append(np.arange(s, s + n))
            targets.append(np.arange(1, n + 1) / n)
    if not frames:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    return np.concatenate(frames), np.concatenate(targets)


def _transform(x: np.ndarray, kind: str) -> np.ndarray:
    if kind == "log1p":
        return np.log1p(np.maximum(x, 0.0))   # the features are non-negative (ReLU outputs)
    if kind == "none":
        return x
    raise ValueError(f"unknown feature transform {kind!r} (log1p or none)")


class Standardiser:
    """Per-dimension mean and std of the transformed training foreground frames."""

    def __init__(self, data: SplitData, transform: str) -> None:
        rows = np.concatenate([_transform(a[foreground_targets(ann)[0]], transform)
                               for a, ann in zip(data.arrays, data.annotations)])
        self.transform = transform
        self.mean = rows.mean(0)
        self.std = np.where(rows.std(0) > 1e-8, rows.std(0), 1.0)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return ((_transform(x, self.transform) - self.mean) / self.std).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Ridge probe: one frame's raw features -> its progress


def _ridge_design(data: SplitData, norm: Standardiser) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for a, ann in zip(data.arrays, data.annotations):
        idx, gt = foreground_targets(ann)
        xs.append(norm(a[idx]))
        ys.append(gt)
    return np.concatenate(xs), np.concatenate(ys)


def _ridge_predict(model: Any, data: SplitData, norm: Standardiser) -> list[np.ndarray]:
    """Per-video predictions (T_i,), clipped to [0, 1], 0 on background."""
    out = []
    for a, ann in zip(data.arrays, data.annotations):
        pred = np.clip(model.predict(norm(a)), 0.0, 1.0)
        out.append(np.where(ann.foreground_mask(), pred, 0.0))
    return out


def ridge_probe(train: SplitData, val: SplitData | None, test: SplitData, *,
                alphas: Sequence[float] = RIDGE_ALPHAS, transform: str = "log1p") -> dict:
    """Per-frame ridge regression from one frame's features to its action-level progress.

    Fitted on the training videos' foreground frames (features `transform`ed, then standardised
    with the training frames' statistics); alpha is the one of `alphas` with the lowest MAE
    (mean over videos) on `val`, or `RidgeCV`'s choice on the training frames where `val` has
    no video. Predictions are clipped to [0, 1] and scored on `test` with `score`. The probe
    sees no time: only what a single frame shows linearly.
    """
    from sklearn.linear_model import Ridge, RidgeCV

    t0 = time.perf_counter()
    norm = Standardiser(train, transform)
    x, y = _ridge_design(train, norm)
    val_mae: dict[str, float | None] = {}
    if val is not None and val.annotations:
        best = None
        for alpha in alphas:
            model = Ridge(alpha=alpha).fit(x, y)
            val_mae[f"{alpha:g}"] = mae = headline(score(_ridge_predict(model, val, norm),
                                                         val.annotations))
            if mae is not None and (best is None or mae < best[0]):
                best = (mae, alpha, model)
        if best is None:
            raise ValueError("ridge probe: no alpha gave a finite validation MAE")
        _, alpha, model = best
        chosen_by = "validation MAE (mean over videos)"
    else:
        model = RidgeCV(alphas=tuple(alphas)).fit(x, y)
        alpha, chosen_by = float(model.alpha_), "RidgeCV (efficient leave-one-out) on train"
    metrics = score(_ridge_predict(model, test, norm), test.annotations)
    return {"mae": headline(metrics), "alpha": float(alpha), "alphas": [float(a) for a in alphas],
            "alpha_chosen_by": chosen_by, "val_mae": val_mae, "transform": transform,
            "standardised": True, "train_frames": int(len(y)), "clipped": [0.0, 1.0],
            "seconds": time.perf_counter() - t0, "metrics": metrics}


# ----------------------------------------------------------------------------------------------
# GRU on the true segments: a causal sequence model over each action's raw features


class SegmentGRU(torch.nn.Module):
    """One-layer GRU over a segment's frames, then linear + sigmoid per frame: causal, so its
    prediction at a frame depends on the action's prefix only (online by construction)."""

    def __init__(self, dim: int, hidden: int = GRU_HIDDEN) -> None:
        super().__init__()
        self.gru = torch.nn.GRU(dim, hidden, batch_first=True)
        self.out = torch.nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """x (B, L, D) padded, lengths (B,) -> progress (B, L) (padding positions arbitrary)."""
        from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        y, _ = self.gru(packed)
        y, _ = pad_packed_sequence(y, batch_first=True, total_length=x.shape[1])
        return torch.sigmoid(self.out(y)).squeeze(-1)


def _segments(data: SplitData) -> list[tuple[int, int, int]]:
    """(video, start, length) of every foreground segment."""
    return [(v, int(s), int(n)) for v, ann in enumerate(data.annotations)
            for s, n, fg in zip(ann.starts, ann.lengths, ann.is_foreground) if fg]


def _pad(seqs: list[np.ndarray], device: torch.device
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Segments (L_i, D) -> padded x (B, L, D) on `device`, lengths (B,) on the CPU, and on
    `device` their progress targets (B, L) ((r + 1) / L_i, 0 on padding) and validity mask."""
    lengths = np.array([len(s) for s in seqs])
    width = int(lengths.max())
    x = np.zeros((len(seqs), width, seqs[0].shape[1]), dtype=np.float32)
    target = np.zeros((len(seqs), width), dtype=np.float32)
    for i, s in enumerate(seqs):
        x[i, :len(s)] = s
        target[i, :len(s)] = np.arange(1, len(s) + 1) / len(s)
    valid = np.arange(width)[None, :] < lengths[:, None]
    return (torch.from_numpy(x).to(device), torch.from_numpy(lengths),
            torch.from_numpy(target).to(device), torch.from_numpy(valid).to(device))


def gru_baseline(train: SplitData, test: SplitData, *, device: torch.device | str = "cpu",
                 seed: int = 0, steps: int = GRU_STEPS, batch: int = GRU_BATCH,
                 lr: float = GRU_LR, hidden: int = GRU_HIDDEN, transform: str = "log1p"
                 ) -> dict:
    """A causal GRU on the raw features of each true foreground segment, from its start.

    Features `transform`ed and standardised as the ridge probe's. Trained for `steps` Adam steps
    on batches of `batch` training segments (drawn with replacement from a generator seeded with
    `seed`) with the L1 loss over their frames (the metric's error); the weights and the draws
    are seeded, and deterministic kernels are on, so a seed gives the same numbers on the same
    device. Scored on `test` with `score` (0 on background, never scored). On a CPU it runs on
    one thread: the recurrence is a chain of small matrix products, which several threads only
    slow down (100x on a busy 2-core machine).
    """
    t0 = time.perf_counter()
    device = torch.device(device)
    norm = Standardiser(train, transform)
    train_x = [norm(a) for a in train.arrays]
    segs = _segments(train)
    if not segs:
        raise ValueError("GRU baseline: the training split has no foreground segment")
    losses: list[float] = []
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        preds = _gru_fit_predict(train_x, segs, test, norm, device=device, seed=seed, steps=steps,
                                 batch=batch, lr=lr, hidden=hidden, losses=losses)
    finally:
        torch.set_num_threads(threads)
    metrics = score(preds, test.annotations)
    tail = losses[-max(1, len(losses) // 10):]
    return {"mae": headline(metrics), "hidden": hidden, "layers": 1, "steps": steps,
            "batch_segments": batch, "lr": lr, "loss": "l1", "seed": seed,
            "transform": transform, "standardised": True, "train_segments": len(segs),
            "final_train_loss": float(np.mean(tail)), "device": str(device),
            "cpu_threads": 1 if device.type == "cpu" else threads,
            "seconds": time.perf_counter() - t0, "metrics": metrics}


def _gru_fit_predict(train_x: list[np.ndarray], segs: list[tuple[int, int, int]],
                     test: SplitData, norm: Standardiser, *, device: torch.device, seed: int,
                     steps: int, batch: int, lr: float, hidden: int, losses: list[float]
                     ) -> list[np.ndarray]:
    """`gru_baseline`'s training and its per-video test predictions (T_i,)."""
    from alignprog.runtime import deterministic

    dim = train_x[0].shape[1]
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), deterministic(True):
        torch.manual_seed(seed)
        model = SegmentGRU(dim, hidden).to(device)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        gen = np.random.default_rng(seed)
        model.train()
        step_losses = []
        for _ in range(steps):
            pick = gen.integers(0, len(segs), size=min(batch, len(segs)))
            x, lengths, target, valid = _pad([train_x[v][s:s + n]
                                              for v, s, n in (segs[k] for k in pick)], device)
            pred = model(x, lengths)                                              # (B, L)
            loss = ((pred - target).abs() * valid).sum() / valid.sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step_losses.append(loss.detach())
        losses += torch.stack(step_losses).cpu().tolist() if step_losses else []
        model.eval()
        test_x = [norm(a) for a in test.arrays]
        preds = [np.zeros(ann.num_frames) for ann in test.annotations]
        test_segs = _segments(test)
        with torch.no_grad():
            for lo in range(0, len(test_segs), 256):
                chunk = test_segs[lo:lo + 256]
                x, lengths, _, _ = _pad([test_x[v][s:s + n] for v, s, n in chunk], device)
                out = model(x, lengths).cpu().double().numpy()
                for i, (v, s, n) in enumerate(chunk):
                    preds[v][s:s + n] = out[i, :n]
    return preds


# ----------------------------------------------------------------------------------------------
# Training runs (in this process or in spawned workers: plain dicts in and out, never models)


_DATASETS: dict[str, Dataset] = {}


def dataset_for(cfg: Config) -> Dataset:
    """The dataset of `cfg.data`, loaded once per process (it is deterministic)."""
    key = cfg.data.model_dump_json()
    if key not in _DATASETS:
        _DATASETS[key] = load_dataset(cfg.data)
    return _DATASETS[key]


def alignment_summary(report: dict) -> dict:
    """Headline numbers of an `evaluate_alignment` report, each a mean over tasks: Kendall's
    tau, tau in the wild, phase classification at the largest label fraction (foreground frames;
    and with background as a class), EAE (lower is better) and phase progression R^2."""
    m = report["metrics"]
    pc = m["phase_classification"]
    full = f"{max(pc['fractions']):g}"
    return {
        "kendall_tau": m["kendall_tau"]["mean_over_tasks"],
        "kendall_tau_wild": m["kendall_tau_wild"]["mean_over_tasks"],
        "phase_classification": pc["background_excluded"][full]["mean_over_tasks"],
        "phase_classification_with_background": pc["background_included"][full]["mean_over_tasks"],
        "phase_classification_fraction": float(full),
        "enclosed_area_error": m["enclosed_area_error"]["mean_over_tasks"],
        "phase_progression_r2": m["phase_progression"]["r2_pooled"]["mean_over_tasks"],
    }


def train_and_evaluate(job: dict) -> dict:
    """One run: `fit` the config of `job["overrides"]`, then score the encoder's alignment;
    both score the final model (`alignprog eval-progress` and `export` default to `best`).

    Returns the job with the head's test metrics, the test progress report, the alignment
    summary and report, the config, the last history records and seconds; or the job with
    ``error`` when the run failed (a long benchmark keeps its other runs)."""
    from alignprog.runtime import device_info, resolve_device
    from alignprog.training.loop import fit

    threads = torch.get_num_threads()
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    out = dict(job)
    t0 = time.perf_counter()
    try:
        cfg = load_config(overrides=job["overrides"])
        dataset = dataset_for(cfg)
        result = fit(cfg, dataset=dataset, run=None)
        fit_s = time.perf_counter() - t0
        device = resolve_device(cfg.train.device)
        t1 = time.perf_counter()
        alignment = evaluate_alignment(result.model, dataset, device=device)
        report = result.test_report or {}
        head = report.get("predictors", {}).get("head")
        out |= {
            "head_mae": headline(head["metrics"]) if head else None,
            "head_metrics": head["metrics"] if head else None,
            "alignment": alignment_summary(alignment),
            "alignment_report": alignment,
            "test_report": report,
            "steps": result.step, "epochs": result.epoch,
            "history": [r for r in result.history if r["kind"] in ("epoch", "end")],
            "last_step": next((r for r in reversed(result.history) if r["kind"] == "step"),
                              None),
            "config": cfg.model_dump(mode="json"),
            "device": device_info(device),
            "seconds": {"fit": fit_s, "alignment": time.perf_counter() - t1,
                        "total": time.perf_counter() - t0},
        }
    except Exception as exc:  # noqa: BLE001 (reported in the table and JSON, not raised)
        out |= {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(),
                "seconds": {"total": time.perf_counter() - t0}}
    finally:
        torch.set_num_threads(threads)
        # The trainer and its CUDA graphs refer to each other: free their memory pools now,
        # not at some later collection, before the next run of this process starts.
        result = None  # noqa: F841 (drops the last reference)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def build_jobs(methods: Sequence[str], base: dict, *, compare_none: bool,
               sweep: tuple[str, list[str]] | None) -> list[dict]:
    """The runs: each method with its defaults, then without progress (`compare_none`), then
    at each sweep value. `base` holds the overrides of every run (data, --set, epochs,...)."""
    jobs = []
    for method in methods:
        over = base | {"train.method": method}
        jobs.append({"name": f"{method}", "method": method, "variant": "default",
                     "value": None, "overrides": over})
        if compare_none:
            jobs.append({"name": f"{method} none", "method": method, "variant": "none",
                         "value": None, "overrides": over | {"progress.enabled": False}})
        if sweep is not None:
            key, values = sweep
            for raw in values:
                value = parse_overrides([f"{key}={raw}"])[key]
                jobs.append({"name": f"{method} {key}={raw}", "method": method,
                             "variant": "sweep", "value": raw,
                             "overrides": over | {key: value}})
    return jobs


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def progress_line(run: dict) -> str:
    """One line per finished run: name, head MAE, tau, seconds."""
    secs = run["seconds"]["total"]
    if "error" in run:
        return f"{run['name']:<32} FAILED after {secs:.0f} s: {run['error']}"
    return (f"{run['name']:<32} head MAE {_fmt(run['head_mae'], 4):>7}  "
            f"tau {_fmt(run['alignment']['kendall_tau']):>6}  {secs:7.1f} s")


def run_jobs(jobs: list[dict], n_workers: int, *, on_done: Callable[[dict], None],
             meanwhile: Callable[[], Any] | None = None, threads: int | None = None
             ) -> tuple[list[dict], Any]:
    """Run `jobs` (in order here when `n_workers` is 1, else in spawned worker processes),
    calling `on_done` as each finishes; `meanwhile()` runs in this process while workers
    train (first, with one worker). `threads`: torch's intra-op threads per run (None: torch's
    default with one worker, cpu_count // n_workers with several). Returns the results in job
    order and meanwhile's value."""
    if n_workers <= 1:
        extra = meanwhile() if meanwhile else None
        results = []
        for job in jobs:
            results.append(train_and_evaluate(job | {"threads": threads}))
            on_done(results[-1])
        return results, extra
    threads = threads or max(1, (os.cpu_count() or 1) // n_workers)
    results: list[dict | None] = [None] * len(jobs)
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(n_workers, mp_context=ctx) as pool:
        futures = {pool.submit(train_and_evaluate, job | {"threads": threads}): i
                   for i, job in enumerate(jobs)}
        extra = meanwhile() if meanwhile else None
        for fut in concurrent.futures.as_completed(futures):
            i = futures[fut]
            try:
                results[i] = fut.result()
            except Exception as exc:  # noqa: BLE001 (a dead worker: the other runs go on)
                results[i] = jobs[i] | {"error": f"worker died: {type(exc).__name__}: {exc}"}
            on_done(results[i])
    return [r for r in results if r is not None], extra


# ----------------------------------------------------------------------------------------------
# Baselines of the same test split


def baselines(dataset: Dataset, layout: str, *, device: torch.device | str, seed: int,
              gru_steps: int = GRU_STEPS) -> dict:
    """constant 0.5, frame counting and random (`evaluate_progress` without a model), the ridge
    probe and the GRU on true segments, each with `mae` (test, mean over videos), `metrics` and
    `seconds`."""
    out: dict[str, dict] = {}
    t0 = time.perf_counter()
    report = evaluate_progress(None, dataset, "test", device=device, baselines=BASELINES)
    seconds = time.perf_counter() - t0
    for name in BASELINES:
        pred = report["predictors"][name]
        out[name] = {"mae": headline(pred["metrics"]), "seconds": seconds,
                     **{k: v for k, v in pred.items() if k != "metrics"},
                     "metrics": pred["metrics"]}
    train = split_data(dataset, "train", layout)
    val = split_data(dataset, "val", layout)
    test = split_data(dataset, "test", layout)
    out["ridge"] = ridge_probe(train, val, test)
    out["gru"] = gru_baseline(train, test, device=device, seed=seed, steps=gru_steps)
    return out


# ----------------------------------------------------------------------------------------------
# Table and plots


COLUMNS = ("row", "head MAE", "/ min(const, count)", "tau", "tau none", "tau wild", "PC",
           "PC none", "EAE", "EAE none", "s")


def markdown_table(rows: Sequence[Sequence[str]], columns: Sequence[str] = COLUMNS) -> str:
    """A Markdown table of string cells."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _run_cells(run: dict, none: dict | None, floor: float | None) -> list[str]:
    if "error" in run:
        return [run["name"], "error"] + [""] * (len(COLUMNS) - 3) + [
            f"{run['seconds']['total']:.0f}"]
    a = run["alignment"]
    b = none["alignment"] if none is not None and "error" not in none else None
    mae = run["head_mae"]

    def other(key: str) -> str:
        return "" if b is None else _fmt(b[key])

    return [run["name"], _fmt(mae, 4), _fmt(mae / floor if mae is not None and floor else None),
            _fmt(a["kendall_tau"]), other("kendall_tau"), _fmt(a["kendall_tau_wild"]),
            _fmt(a["phase_classification"]), other("phase_classification"),
            _fmt(a["enclosed_area_error"]), other("enclosed_area_error"),
            f"{run['seconds']['total']:.0f}"]


def trivial_floor(base: dict) -> float | None:
    """min(constant 0.5, frame counting): the MAE a useful predictor must beat."""
    values = [base[k]["mae"] for k in ("constant_0.5", "frame_count")
              if base.get(k, {}).get("mae") is not None]
    return min(values) if values else None


def results_table(runs: Sequence[dict], base: dict) -> str:
    """The Markdown table: method rows (with their `none` runs' alignment columns), baseline
    rows, then a second section for sweep runs, if any."""
    floor = trivial_floor(base)
    nones = {r["method"]: r for r in runs if r["variant"] == "none"}
    rows = [_run_cells(r, nones.get(r["method"]), floor) for r in runs
            if r["variant"] == "default"]
    for key, title in BASELINE_TITLES.items():
        if key in base:
            mae = base[key]["mae"]
            rows.append([title, _fmt(mae, 4), _fmt(mae / floor if mae is not None and floor
                                                   else None)]
                        + [""] * (len(COLUMNS) - 4) + [f"{base[key].get('seconds', 0):.0f}"])
    text = markdown_table(rows)
    sweep = [r for r in runs if r["variant"] == "sweep"]
    if sweep:
        text += "\n\nSweep:\n\n" + markdown_table([_run_cells(r, None, floor) for r in sweep])
    return text


def _canvas(width: float, height: float):
    """A figure on an explicit Agg canvas (no pyplot, no global backend: the style of
    alignprog.plots)."""
    from alignprog.plots import require_matplotlib

    require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def mae_figure(runs: Sequence[dict], base: dict):
    """Bars: head MAE of each method's default run, then each baseline's MAE; horizontal lines
    at constant 0.5, frame counting and the ridge probe."""
    from alignprog.plots import MAIN_COLOUR, OTHER_COLOUR

    names, values, colours = [], [], []
    for r in runs:
        if r["variant"] == "default":
            names.append(r["name"])
            values.append(math.nan if r.get("head_mae") is None else r["head_mae"])
            colours.append(MAIN_COLOUR)
    for key, title in BASELINE_TITLES.items():
        if key in base:
            names.append(title.replace(" (", "\n("))
            values.append(math.nan if base[key]["mae"] is None else base[key]["mae"])
            colours.append(OTHER_COLOUR)
    fig = _canvas(max(6.0, 1.1 * len(names) + 2), 4.2)
    ax = fig.subplots()
    ax.bar(range(len(names)), values, color=colours)
    for i, v in enumerate(values):
        if math.isfinite(v):
            ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    for key, style, colour in (("constant_0.5", "--", "#d62728"), ("frame_count", ":", "k"),
                               ("ridge", "-.", "#2ca02c")):
        if key in base and base[key]["mae"] is not None:
            ax.axhline(base[key]["mae"], ls=style, color=colour, lw=1,
                       label=f"{BASELINE_TITLES[key]} {base[key]['mae']:.3f}")
    ax.set_xticks(range(len(names)), names, fontsize=8)
    ax.set_ylabel("MAE (test, mean over videos)")
    ax.set_title("online action-level progress MAE: head of each method vs baselines "
                 "(lower is better)", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    return fig


def sweep_figure(runs: Sequence[dict], key: str):
    """Head MAE (y) against Kendall's tau (x) of the sweep runs, one series per method, each
    point labelled with its value."""
    fig = _canvas(6.5, 4.5)
    ax = fig.subplots()
    drawn = False
    for method in dict.fromkeys(r["method"] for r in runs if r["variant"] == "sweep"):
        pts = [(r["alignment"]["kendall_tau"], r["head_mae"], r["value"]) for r in runs
               if r["variant"] == "sweep" and r["method"] == method and "error" not in r
               and r["alignment"]["kendall_tau"] is not None and r["head_mae"] is not None]
        if not pts:
            continue
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        drawn = True
        for x, y, value in pts:
            ax.annotate(str(value), (x, y), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
    ax.set(xlabel="Kendall's tau (test, mean over tasks)",
           ylabel="head MAE (test, mean over videos)")
    ax.set_title(f"sweep of {key}" + ("" if drawn else " (no run with both numbers)"),
                 fontsize=9)
    if drawn:
        ax.legend(fontsize=8)
    return fig


# ----------------------------------------------------------------------------------------------
# Entry point


def parse_sweep(text: str | None) -> tuple[str, list[str]] | None:
    """`KEY=v1,v2,...` -> (KEY, [v1, v2, ...]) (values kept as typed, read as YAML per run)."""
    if not text:
        return None
    key, sep, values = text.partition("=")
    items = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not key.strip() or not items:
        raise ConfigError(f"--sweep '{text}' must look like KEY=v1,v2,... "
                          "e.g. progress.balance_ratio=1,2,3")
    return key.strip(), items


def environment(device: torch.device) -> dict:
    from alignprog.runtime import device_info

    return device_info(device) | {
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else platform.processor() or platform.machine()),
        "torch": torch.__version__, "python": platform.python_version(),
        "cpu_count": os.cpu_count(), "platform": platform.platform()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.progress_quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help="comma list (default: all)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run (repeatable)")
    p.add_argument("--compare-none", action=argparse.BooleanOptionalAction, default=True,
                   help="also train each method with progress.enabled=false (default on)")
    p.add_argument("--sweep", default=None, metavar="KEY=v1,v2,...",
                   help="also train every method at each value of this config key")
    p.add_argument("--epochs", type=int, default=None, help="default: the config's")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=None,
                   help="train.seed of every run and the GRU baseline's seed (default: the "
                   "config's)")
    p.add_argument("--jobs", type=int, default=1, help="parallel training processes")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads per run (default: torch's with --jobs 1, "
                   "cpu_count // jobs with more; 1 helps on a busy machine)")
    p.add_argument("--gru-steps", type=int, default=GRU_STEPS,
                   help="Adam steps of the GRU baseline")
    p.add_argument("--out", type=Path, default=Path("progress_quality_out"))
    args = p.parse_args(argv)

    from alignprog.fileio import atomic_write_bytes, atomic_write_json, atomic_write_text
    from alignprog.plots import png_bytes, require_matplotlib
    from alignprog.runtime import resolve_device

    t_start = time.perf_counter()
    require_matplotlib()   # fail before the work, not after it
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        p.error(f"--methods: unknown {unknown}; choose from {', '.join(METHODS)}")
    sets = parse_overrides(args.set)
    sweep = parse_sweep(args.sweep)
    base = REALISTIC | sets | {"train.device": args.device}
    if args.jobs < 1 or (args.threads is not None and args.threads < 1):
        p.error("--jobs and --threads must be at least 1")
    if args.epochs is not None:
        base["train.epochs"] = args.epochs
    if args.seed is not None:
        base["train.seed"] = args.seed
    jobs = build_jobs(methods, base, compare_none=args.compare_none, sweep=sweep)
    for job in jobs:                       # every config error before any work
        load_config(overrides=job["overrides"])
    cfg = load_config(overrides=base)
    device = resolve_device(args.device)
    dataset = dataset_for(cfg)             # loaded once: every in-process run reuses it
    seed = cfg.train.seed
    print(f"data: {dataset.name} ({cfg.data.synthetic.timelines} timelines, "
          f"dim {cfg.data.synthetic.dim}), {len(dataset.videos)} videos, "
          + ", ".join(f"{s} {len(dataset.indices(s))}" for s in ("train", "val", "test"))
          + f"; {len(jobs)} runs on {device}, {args.jobs} at a time", flush=True)

    def meanwhile() -> dict:
        t0 = time.perf_counter()
        out = baselines(dataset, cfg.data.layout, device=device, seed=seed,
                        gru_steps=args.gru_steps)
        print("baselines (" + f"{time.perf_counter() - t0:.0f} s): " + ", ".join(
            f"{BASELINE_TITLES[k]} {_fmt(v['mae'], 4)}" for k, v in out.items()), flush=True)
        return out

    def on_done(run: dict) -> None:
        print(progress_line(run), flush=True)

    if args.threads is not None and args.jobs <= 1:
        torch.set_num_threads(args.threads)   # the baselines too
    runs, base_results = run_jobs(jobs, args.jobs, on_done=on_done, meanwhile=meanwhile,
                                  threads=args.threads)
    nones = {r["method"]: r for r in runs if r["variant"] == "none" and "error" not in r}
    for run in runs:
        none = nones.get(run["method"])
        if run["variant"] == "default" and "error" not in run and none is not None:
            run["alignment_minus_none"] = {
                k: (v - none["alignment"][k] if v is not None and none["alignment"][k] is not None
                    else None) for k, v in run["alignment"].items()}
    table = results_table(runs, base_results)
    header = (f"Test split, online action-level progress MAE (mean over videos) and alignment "
              f"metrics (mean over tasks); data: {cfg.data.synthetic.timelines} timelines, "
              f"dim {cfg.data.synthetic.dim}; {len(runs)} runs on {device}.\n\n")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "progress_quality",
        "command": [sys.executable, "-m", "benchmarks.progress_quality", *(argv or sys.argv[1:])],
        "arguments": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "overrides": {"realistic": REALISTIC, "set": sets, "every_run": base},
        "sweep": None if sweep is None else {"key": sweep[0], "values": sweep[1]},
        "environment": environment(device) | {"jobs": args.jobs},
        "dataset": {"name": dataset.name, "videos": len(dataset.videos),
                    "splits": {s: len(dataset.indices(s)) for s in ("train", "val", "test")},
                    "split_sha256": dataset.splits.sha256(), "config": cfg.data.model_dump(
                        mode="json")},
        "headline": "test split, online action-level MAE, mean over videos "
                    "(docs/evaluation.md#online-action-level-mae)",
        "trivial_floor": trivial_floor(base_results),
        "baselines": base_results,
        "runs": runs,
        "table": table,
        "seconds": time.perf_counter() - t_start,
    }
    atomic_write_json(args.out / FILES["json"], result)
    atomic_write_text(args.out / FILES["md"], header + table + "\n")
    atomic_write_bytes(args.out / FILES["png"], png_bytes(mae_figure(runs, base_results)))
    if sweep is not None:
        atomic_write_bytes(args.out / FILES["sweep_png"], png_bytes(sweep_figure(runs, sweep[0])))
    print()
    print(header + table)
    print(f"\n{time.perf_counter() - t_start:.0f} s in all; wrote {args.out}/")
    return result


if __name__ == "__main__":
    main()
