"""The training step of `alignprog train`, timed and taken apart.

    PYTHONPATH=. python -m benchmarks.train_step --method lav --encoder stacking \
        --lengths 450,380 --device cuda --steps 50 --json lav.json

Builds the real model, losses and progress sampler from alignprog (`alignprog.training.Trainer`,
the configuration of `alignprog train` plus the flags below) on one batch of random features with
a procedural annotation (background and actions of 5-40 frames alternating), and times warm
`Trainer.step_batch` calls, each a full step: forward, alignment and progress losses, backward,
head-gradient rescale, clipping, Adam (a CUDA-graph replay where the trainer uses one; pass
`--set train.cuda_graphs=off` for the eager step). On CUDA the steps run back to back, as in
training, and each is timed with CUDA events (see `time_steps`).

Reported per method: median / min / max ms per step, peak GPU memory, and with --breakdown the
step taken apart (each part timed alone, forward + backward): encoder (base model + heads),
alignment loss, progress (sampling, gathering, head, loss) and optimizer (clip + Adam). With
--flops the encoder's training FLOPs (3 x forward) over the card's measured matmul rate: the
compute floor of the step and the ratio of the measured step to it. --profile DIR writes a
torch.profiler table per method. --json writes everything.

Defaults are the pipeline description's configuration: 16 MCN heads, D = 128, a batch of 2
videos of 450 and 380 frames, the GRU progress head with 10 x 5 samples per video, Adam;
`stacking` on (T, 2048) features, `resnet50` on (T, 1024, 14, 14) layer3 maps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from alignprog.config import Config, load_config, parse_overrides
from alignprog.data import Batch, load_dataset
from alignprog.runtime import deterministic
from alignprog.training.step import clip_gradients
from alignprog.training.trainer import Trainer
from benchmarks.bench_models import timed

METHODS = ("tcc", "gtcc", "lav", "vava")
FRAME_SHAPES = {"stacking": (2048,), "naive": (2048,), "resnet50": (1024, 14, 14)}


def make_batch(lengths: tuple[int, ...], frame_shape: tuple[int, ...], seed: int = 0) -> Batch:
    """A padded batch of random frames with alternating background / action segments."""
    g = torch.Generator().manual_seed(seed)
    b, t = len(lengths), max(lengths)
    feats = torch.rand((b, t, *frame_shape), generator=g)
    mask = torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]
    rows = []
    for n in lengths:
        segs, pos, fg = [], 0, False
        while pos < n:
            size = int(torch.randint(5, 41, (1,), generator=g))
            segs.append((pos, min(n, pos + size) - 1, fg))
            pos += size
            fg = not fg
        rows.append(segs)
    k = max(len(r) for r in rows)
    seg_start = torch.zeros(b, k, dtype=torch.long)
    seg_end = torch.full((b, k), -1, dtype=torch.long)
    seg_fg = torch.zeros(b, k, dtype=torch.bool)
    seg_mask = torch.zeros(b, k, dtype=torch.bool)
    seg_of_frame = torch.zeros(b, t, dtype=torch.long)
    foreground = torch.zeros(b, t, dtype=torch.bool)
    for row, segs in enumerate(rows):
        for i, (s, e, f) in enumerate(segs):
            seg_start[row, i], seg_end[row, i], seg_fg[row, i] = s, e, f
            seg_mask[row, i] = True
            seg_of_frame[row, s:e + 1] = i
            foreground[row, s:e + 1] = f
    return Batch(feats, mask, torch.tensor(lengths), seg_of_frame, foreground, seg_start,
                 seg_end, seg_fg.long(), seg_fg, seg_mask, (), "bench", tuple(range(b)))


def make_config(method: str, encoder: str, device: str, precision: str,
                overrides: dict | None = None) -> Config:
    """The configuration of `alignprog train --method METHOD` for this encoder."""
    frame_shape = FRAME_SHAPES[encoder]
    return load_config(overrides={
        "train.method": method, "train.device": device, "train.precision": precision,
        "model.encoder": encoder, "model.num_heads": 16,
        "data.layout": "frames" if encoder == "resnet50" else "features",
        "data.synthetic.tasks": 2, "data.synthetic.videos_per_task": 2,
        **({"data.synthetic.frame_channels": frame_shape[0],
            "data.synthetic.frame_size": frame_shape[-1]} if len(frame_shape) == 3
           else {"data.synthetic.dim": frame_shape[0]})} | (overrides or {}))


def build(method: str, encoder: str, device: str, precision: str, lengths: tuple[int, ...],
          overrides: dict | None = None) -> tuple[Trainer, Batch]:
    """The trainer of `alignprog train --method METHOD` for this encoder, and the batch."""
    cfg = make_config(method, encoder, device, precision, overrides)
    trainer = Trainer(cfg, load_dataset(cfg.data), torch.device(device))
    batch = make_batch(lengths, FRAME_SHAPES[encoder])
    return trainer, (batch.pin_memory() if device.startswith("cuda") else batch)


def stats(times: list[float]) -> dict:
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


def time_steps(trainer: Trainer, batch: Batch, steps: int, warmup: int, *,
               prefetch: bool = True) -> list[float]:
    """Milliseconds of each of `steps` steps after `warmup` untimed ones. On CUDA the steps run
    back to back as in training (the host prepares step n + 1 while the GPU runs step n, no
    sync in between) and a step's time lies between CUDA events recorded around it: the time
    the GPU needs per step, or the host's where the host is slower. `prefetch`: as the
    training loop does, the batch's copy to the GPU for step n + 1 starts on a side stream
    before step n (`Trainer.prefetch`); otherwise each step copies its batch itself."""
    def step() -> None:
        if prefetch:
            trainer.prefetch([batch])
        trainer.step_batch(batch)

    if prefetch:
        trainer.prefetch([batch])
    for _ in range(warmup):
        step()
    if trainer.device.type != "cuda":
        times = []
        for _ in range(steps):
            begin = time.perf_counter()
            step()
            times.append((time.perf_counter() - begin) * 1e3)
        return times
    torch.cuda.synchronize()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(steps)]
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize()
    trainer.uploads.clear()
    return [start.elapsed_time(end) for start, end in events]


def breakdown(trainer: Trainer, batch: Batch, reps: int) -> dict:
    """Each part of the step alone, forward + backward, median ms over `reps` warm runs
    (`bench_models.timed`: a sync around each run)."""
    dev = trainer.device
    trainer.optimizer.zero_grad(set_to_none=True)   # not a CUDA graph's gradient buffers
    host = batch
    batch = batch.to(dev, non_blocking=True)
    with torch.no_grad():
        out0 = trainer.forward(batch)
    emb0 = out0.embeddings.float()
    drop0 = None if out0.drop_logits is None else out0.drop_logits.float()

    def encoder():
        out = trainer.forward(batch)
        out.embeddings.float().sum().backward()

    def alignment():
        emb = emb0.detach().requires_grad_()
        trainer.alignment_loss(emb, drop0, batch.mask).backward()

    def progress():
        emb = emb0.detach().requires_grad_()
        loss, _ = trainer.progress_loss(emb, batch, host)
        if loss is not None:
            loss.backward()

    def optimizer():
        clip_gradients(trainer)
        trainer.optimizer.step()

    parts = {"encoder": encoder, "alignment": alignment, "progress": progress}
    out = {name: timed(fn, dev, reps) * 1e3 for name, fn in parts.items()}
    encoder()  # gradients in place for the optimizer
    out["optimizer"] = timed(optimizer, dev, reps) * 1e3
    trainer.optimizer.zero_grad(set_to_none=True)
    return out


def flop_floor(trainer: Trainer, lengths: tuple[int, ...], precision: str) -> dict:
    """The model's training FLOPs over the real frames (`benchmarks.flops`) over the
    card's measured matmul rate in the step's precision (fp32: TF32 where cuDNN uses it, as
    the convolutions do): the least time the step's products can take on this card."""
    from benchmarks.flops import measure_matmul_tflops, model_flops
    flops = model_flops(trainer.model, sum(lengths), training=True)
    if precision == "bf16":
        tflops = measure_matmul_tflops(trainer.device, torch.bfloat16)
    else:
        tflops = measure_matmul_tflops(trainer.device, torch.float32,
                                       tf32=torch.backends.cudnn.allow_tf32)
    return {"train_flops": flops, "matmul_tflops": tflops,
            "floor_ms": flops / (tflops * 1e12) * 1e3}


def profile(trainer: Trainer, batch: Batch, path: Path, steps: int = 5) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda"
                                     else [])
    for _ in range(2):
        trainer.step_batch(batch)
    with torch_profile(activities=acts) as prof:
        for _ in range(steps):
            trainer.step_batch(batch)
        if trainer.device.type == "cuda":
            torch.cuda.synchronize()
    sort = "cuda_time_total" if trainer.device.type == "cuda" else "cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=40)
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy_us = sum(e.device_time for e in kernels) / steps if kernels else 0.0
    summary = (f"steps profiled: {steps}\nGPU kernels per step: {len(kernels) / steps:.0f}\n"
               f"GPU busy per step: {busy_us / 1e3:.2f} ms\n\n")
    path.write_text(summary + table)


def run_one(args, method: str) -> dict:
    overrides = parse_overrides(args.set)
    cfg = make_config(method, args.encoder, args.device, args.precision, overrides)
    # as `alignprog train` runs: deterministic kernels unless train.deterministic=false
    with deterministic(cfg.train.deterministic):
        return _run_one(args, method, overrides)


def _run_one(args, method: str, overrides: dict) -> dict:
    trainer, batch = build(method, args.encoder, args.device, args.precision, args.lengths,
                           overrides)
    cuda = trainer.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = time_steps(trainer, batch, args.steps, args.warmup,
                       prefetch=not args.no_prefetch)
    row = {"method": method, "encoder": args.encoder, "precision": args.precision,
           "lengths": list(args.lengths), "steps": args.steps, **stats(times)}
    if cuda:
        row["peak_memory_mb"] = torch.cuda.max_memory_allocated() / 2**20
    if args.breakdown:
        row["breakdown_ms"] = breakdown(trainer, batch, max(3, args.steps // 2))
    if args.flops:
        row |= flop_floor(trainer, args.lengths, args.precision)
        row["floor_ratio"] = row["median_ms"] / row["floor_ms"]
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        profile(trainer, batch, args.profile / f"{args.encoder}-{method}.txt")
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", default="lav",
                   help="tcc, gtcc, lav, vava, a comma list of them, or all")
    p.add_argument("--encoder", default="stacking", choices=sorted(FRAME_SHAPES))
    p.add_argument("--lengths", default="450,380",
                   type=lambda s: tuple(int(v) for v in s.split(",")),
                   help="frames of each video of the batch, comma separated")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    p.add_argument("--no-prefetch", action="store_true",
                   help="each step copies its batch to the GPU itself, on the step's stream "
                   "(the loop starts the next step's copy ahead, on a side stream)")
    p.add_argument("--breakdown", action="store_true", help="time the parts of the step too")
    p.add_argument("--flops", action="store_true", help="compute floor and ratio")
    p.add_argument("--profile", type=Path, default=None, help="write profiler tables here")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, as `alignprog train --set` (repeatable)")
    p.add_argument("--json", type=Path, default=None, help="write the results here")
    args = p.parse_args(argv)
    methods = METHODS if args.method == "all" else tuple(args.method.split(","))
    rows = []
    for method in methods:
        row = run_one(args, method)
        rows.append(row)
        mem = f"{row['peak_memory_mb']:.0f} MB" if "peak_memory_mb" in row else "n/a"
        line = (f"{args.encoder:9s} {method:5s} T={args.lengths} median "
                f"{row['median_ms']:8.2f} ms (min {row['min_ms']:.2f}, max {row['max_ms']:.2f})"
                f"  peak {mem}")
        if "breakdown_ms" in row:
            line += "  " + ", ".join(f"{k} {v:.2f}" for k, v in row["breakdown_ms"].items())
        if "floor_ratio" in row:
            line += f"  floor {row['floor_ms']:.1f} ms, ratio {row['floor_ratio']:.2f}"
        print(line, flush=True)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"device: {name}, torch {torch.__version__}")
    if args.json:
        args.json.write_text(json.dumps({"device": name, "torch": torch.__version__,
                                         "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
