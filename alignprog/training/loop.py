"""The training loop: one explicit `fit()` (STYLE habit 1; spec ALGORITHMS 7, DOC).

Per step: forward -> alignment loss of the method -> progress loss (learnable head on sampled
segments, or cumulative_l2, or none) -> total = alignment + lambda * progress -> backward ->
(several processes: gradients averaged over the ranks) -> progress-head gradients divided by
lambda -> clipping -> optimizer step -> zero grads.
Reporting goes through a callback (the CLI renders it; tests collect it), so no rich here.

Several processes (torchrun, `alignprog.distributed`): every rank holds the same model and takes
its share of each epoch's single-task batches; one step is one batch per rank, so the effective
batch is ranks x data.batch_size (the learning rate is not scaled). Rank 0 alone writes the run
directory and evaluates (validation, test) while the others wait; `fit` calls the callback on
every rank (the CLI passes a display to rank 0 only).
"""

from __future__ import annotations

import math
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from alignprog.config import Config
from alignprog.data import Batch, Dataset, load_dataset, make_loader
from alignprog.distributed import SINGLE, Dist
from alignprog.errors import AlignprogError, ConfigError
from alignprog.evaluation import evaluate_progress
from alignprog.losses import ALIGNMENT_LOSSES
from alignprog.losses.progress import (cumulative_l2_loss, progress_loss,
                                       segment_path_lengths)
from alignprog.models import ENCODER_LAYOUT, AlignmentModel, build_model, set_dense
from alignprog.runtime import (autocast, deterministic, device_info, fused_optimizer,
                               resolve_device, seed_everything, to_device, trusted_inputs)
from alignprog.sampling import gather_segments, sample_segments
from alignprog.training.checkpoint import (CheckpointError, checkpoint_name, load_checkpoint,
                                           save_checkpoint)
from alignprog.training.graphs import StepGraphs
from alignprog.training.rundir import RunDir

Callback = Callable[[str, dict], None]


class TrainingError(AlignprogError):
    """Training cannot go on (e.g. too many consecutive non-finite steps)."""


@dataclass
class FitResult:
    model: AlignmentModel
    step: int
    epoch: int
    history: list[dict] = field(default_factory=list)
    test_report: dict | None = None
    interrupted: bool = False


def loss_keywords(cfg: Config) -> dict[str, Any]:
    """The chosen method's keywords from the config (pure loss functions never see it)."""
    method = cfg.train.method
    return dict(getattr(cfg.loss, method).model_dump(), compat=cfg.loss.compat,
                reduction=cfg.loss.reduction)


def split_parameters(model: AlignmentModel) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(encoder parameters, progress-head parameters)."""
    head = list(model.progress_head.parameters()) if model.progress_head is not None else []
    ids = {id(p) for p in head}
    return [p for p in model.parameters() if id(p) not in ids], head


# Rank r > 0 of a multi-process run offsets its seeds by r * this: the same sampling streams on
# every rank would draw the same relative segment positions in every rank's batch.
RANK_SEED_STRIDE = 1_000_003


def rank_seed(seed: int, rank: int = 0, step: int = 0) -> int:
    """The seed of rank `rank`'s own random streams: `seed` itself for rank 0 (a single process
    draws what it always drew); other ranks, which restart their streams on resume (only rank
    0's are checkpointed), also fold in the step they resume at."""
    return seed if rank == 0 else seed + RANK_SEED_STRIDE * rank + step


def training_generators(seed: int) -> dict[str, torch.Generator]:
    """Local generators for progress sampling and GTCC's draws (spec P30), checkpointed."""
    return {"sampling": torch.Generator().manual_seed(seed + 1),
            "gtcc": torch.Generator().manual_seed(seed + 2)}


def grad_norm(params: list[nn.Parameter], device: torch.device | None = None) -> torch.Tensor:
    """The global L2 norm of the parameters' gradients, a 0-dim float32 tensor on their
    device, or on `device` when there are none (no host sync; 0 when none has a gradient)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=params[0].device if params else device)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))).float()


def clip_to(params: list[nn.Parameter], norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """Scale the gradients of `params` whose global norm is `norm` down to at most `max_norm`,
    as `nn.utils.clip_grad_norm_` does (coefficient max_norm / (norm + 1e-6), at most 1), on
    the device; returns the norm after clipping."""
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        torch._foreach_mul_(grads, coef)
    return norm * coef


def read_record(record: dict) -> dict:
    """A step record with its device scalars read as Python numbers (one host sync)."""
    keys = [k for k, v in record.items() if isinstance(v, torch.Tensor)]
    if not keys:
        return dict(record)
    # Records mix device scalars with CPU ones (skip counters, a progress loss of 0 when no
    # progress is trained): bring them to one device before stacking.
    device = next((record[k].device for k in keys if record[k].device.type != "cpu"),
                  record[keys[0]].device)
    values = torch.stack([record[k].detach().to(device, torch.float64).reshape(())
                          for k in keys]).tolist()
    return record | dict(zip(keys, values))


class Trainer:
    """The state of one run; `step_batch` is one optimizer step (of every rank together, when
    `dist` spans several processes)."""

    def __init__(self, cfg: Config, dataset: Dataset, device: torch.device,
                 dist: Dist = SINGLE) -> None:
        self.cfg = cfg
        self.dataset = dataset
        self.device = device
        self.dist = dist
        tc, pc = cfg.train, cfg.progress
        shape = dataset.videos[0].arrays[cfg.data.layout].shape[1:]
        self.input_shape = tuple(shape)
        seed_everything(tc.seed)
        self.model = build_model(cfg.model, pc, input_shape=shape, num_tasks=len(dataset.tasks),
                                 method=tc.method).to(device)
        if dist.rank:  # the same initial weights (seeded above), then the rank's own dropout
            seed_everything(rank_seed(tc.seed, dist.rank))
        self.encoder_params, self.head_params = split_parameters(self.model)
        groups = [{"params": self.encoder_params, "lr": tc.lr}]
        if self.head_params:
            groups.append({"params": self.head_params, "lr": tc.head_lr or tc.lr})
        # Spec 7: Adam over all parameters, betas (0.9, 0.999), eps 1e-8, no weight decay.
        # Fused on CUDA: one kernel, capturable in a CUDA graph, and it skips a non-finite
        # step on the device (found_inf) without a host sync.
        fused = fused_optimizer(device)
        self.optimizer = torch.optim.Adam(groups, betas=(0.9, 0.999), eps=1e-8,
                                          fused=fused or None, capturable=fused)
        # On a GPU the model runs every padded position: no data-dependent shape, no host sync.
        set_dense(self.model, device.type == "cuda")
        self.loss_fn = ALIGNMENT_LOSSES[tc.method]
        self.loss_kw = loss_keywords(cfg)
        self.lam = pc.lambda_for(tc.method) if pc.enabled else 0.0
        self.learnable = pc.enabled and pc.method == "learnable"
        self.generators = training_generators(rank_seed(tc.seed, dist.rank))
        # cumulative_l2 with class normalisers: running mean path length per label
        self.class_paths = torch.zeros(len(dataset.labels))
        self.class_seen = torch.zeros(len(dataset.labels), dtype=torch.bool)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0   # batches of the epoch done by all ranks together
        # Skipped (non-finite) steps, counted on the device: all of them, and the current run
        # of consecutive ones; read at the logged steps.
        self.skipped_steps = torch.zeros((), dtype=torch.long, device=device)
        self.bad_run = torch.zeros((), dtype=torch.long, device=device)
        self.best_val: float | None = None
        self.stage = 1            # 2: the head alone on the frozen encoder (train.two_stage)
        self.head_start = 0       # the epoch at which stage 2 began
        self.graphs = StepGraphs.create(self)

    def enter_head_stage(self) -> None:
        """Stage 2 (spec 7, two-stage alternative): freeze the encoder and give the head its
        own Adam (lr head_lr, else 1e-3). Also rebuilt on resuming a stage-2 checkpoint."""
        tc = self.cfg.train
        if self.stage != 2:
            self.head_start = self.epoch
            # Stage 2 picks its best checkpoint by the head's validation error: stage 1's best
            # pairs an earlier encoder with an untrained head.
            self.best_val = None
        self.stage = 2
        for p in self.encoder_params:
            p.requires_grad_(False)
        fused = fused_optimizer(self.device)
        self.optimizer = torch.optim.Adam(self.head_params, lr=tc.head_lr or 1e-3,
                                          betas=(0.9, 0.999), eps=1e-8, fused=fused or None,
                                          capturable=fused)

    def losses(self, batch: Batch, *, epoch: int, step: int,
               generators: dict[str, torch.Generator], host: Batch | None = None
               ) -> dict[str, Any]:
        """The forward pass: alignment and progress losses of a batch on the device.

        `host`: the same batch on the CPU, where the sampler reads the segments (default
        `batch`); giving it spares the copies back from the device."""
        out = self.forward(batch)
        emb = out.embeddings.float()                          # losses run in fp32
        drop = None if out.drop_logits is None else out.drop_logits.float()
        alignment = self.alignment_loss(emb, drop, batch.mask, epoch=epoch, step=step,
                                        generators=generators)
        progress, n_samples = self.progress_loss(emb, batch, host or batch,
                                                 generators=generators)
        return {"alignment": alignment, "progress": progress, "samples": n_samples}

    def forward(self, batch: Batch):
        """The encoder on a device batch (`EncoderOutput`), in the configured precision."""
        with autocast(self.device, self.cfg.train.precision):
            return self.model(batch.features, batch.mask)

    def alignment_loss(self, emb: torch.Tensor, drop: torch.Tensor | None, mask: torch.Tensor,
                       *, epoch: int | None = None, step: int | torch.Tensor | None = None,
                       generators: dict[str, torch.Generator] | None = None) -> torch.Tensor:
        """The method's alignment loss of fp32 embeddings (B, T, D) with their mask (B, T)
        (GTCC: and drop logits). `step` may be a device scalar (VAVA's phi in a CUDA graph)."""
        epoch = self.epoch if epoch is None else epoch
        step = self.step if step is None else step
        generators = generators or self.generators
        kw = dict(self.loss_kw)
        if self.cfg.train.method == "gtcc":
            kw.update(drop=drop, epoch=epoch, generator=generators["gtcc"])
        elif self.cfg.train.method == "vava":
            # Reference: phi indexed by the epoch (B19); fixed: by the optimizer step.
            kw.update(global_step=epoch if self.cfg.loss.compat == "reference" else step)
        return self.loss_fn(emb, mask, **kw)

    def progress_loss(self, emb: torch.Tensor, batch: Batch, host: Batch, *,
                      generators: dict[str, torch.Generator] | None = None
                      ) -> tuple[torch.Tensor | None, int]:
        """(progress loss or None, number of head samples) of fp32 embeddings (B, T, D)."""
        cfg, tc = self.cfg, self.cfg.train
        lc = cfg.progress.learnable
        generators = generators or self.generators
        progress, n_samples = None, 0
        if self.learnable:
            samples = sample_segments(host.seg_start, host.seg_end, host.seg_foreground,
                                      host.seg_mask, samples_per_video=lc.samples_per_video,
                                      frames_per_segment=lc.frames_per_segment,
                                      min_segment_len=lc.min_segment_len,
                                      stratified=lc.stratified_sampling,
                                      generator=generators["sampling"])
            n_samples = len(samples)
            if n_samples:
                segments, lengths = gather_segments(emb, samples)   # (Q, L, D), (Q,)
                with autocast(self.device, tc.precision):
                    pred = self.model.progress_head(segments, lengths).float()  # (Q,)
                progress = progress_loss(pred, to_device(samples.gt, self.device),
                                         weighted=lc.weighted_loss, weight_cap=lc.weight_cap,
                                         kind=lc.loss)
        elif cfg.progress.enabled:
            normaliser = None
            if cfg.progress.cumulative_normaliser == "class":
                normaliser = self.class_normaliser(emb, batch, update=self.model.training)
            progress = cumulative_l2_loss(
                emb, batch.mask, batch.seg_start, batch.seg_end, batch.seg_foreground,
                batch.seg_mask, frames_per_video=lc.samples_per_video * lc.frames_per_segment,
                normaliser=normaliser, generator=generators["sampling"])
        return progress, n_samples

    @torch.no_grad()
    def class_normaliser(self, emb: torch.Tensor, batch: Batch, *, update: bool) -> torch.Tensor:
        """Per-segment normaliser (B, K) of cumulative_l2: the running mean path length of the
        segment's action class (momentum 0.9 over training batches; the evaluator uses the
        class means over the training split, the same quantity at the end of training). A class
        not seen yet normalises by the segment's own path length."""
        paths = segment_path_lengths(emb.detach(), batch.mask, batch.seg_start, batch.seg_end,
                                     batch.seg_mask).cpu()                     # (B, K)
        labels = batch.seg_label.clamp(min=0).cpu()                             # (B, K)
        fg = (batch.seg_mask & batch.seg_foreground).cpu()
        if update and fg.any():
            n = len(self.class_paths)
            sums = torch.zeros(n).index_add_(0, labels[fg], paths[fg].float())
            counts = torch.zeros(n).index_add_(0, labels[fg], torch.ones(int(fg.sum())))
            present = counts > 0
            mean = sums[present] / counts[present]
            old = self.class_paths[present]
            self.class_paths[present] = torch.where(self.class_seen[present],
                                                    0.9 * old + 0.1 * mean, mean)
            self.class_seen |= present
        norm = torch.where(self.class_seen[labels], self.class_paths[labels], paths)
        return norm.to(emb.device)

    def step_batch(self, batch: Batch, *, head_only: bool = False) -> dict:
        """One optimizer step (skipped on the device when the loss or a gradient is not
        finite); its metrics, as device scalars where they come from the GPU: `read()` them
        (one host sync) at the steps that log. On CUDA the step is a CUDA-graph replay where
        `StepGraphs` supports the batch (train.cuda_graphs)."""
        start = time.perf_counter()
        record = None
        if self.graphs is not None and not head_only:
            record = self.graphs.step(batch)
        if record is None:
            # No gradient left over: a CUDA graph's replay leaves its own buffers in .grad
            self.optimizer.zero_grad(set_to_none=True)
            record = self.backward(batch, head_only=head_only)
            if not record.get("no_loss"):
                self.clip(record, head_only=head_only)
                self.optimizer_step(record)
        self.step += 1
        record["lr"] = self.optimizer.param_groups[0]["lr"]
        record["seconds"] = time.perf_counter() - start
        if self.device.type == "cuda":
            record["gpu_memory_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return record

    def optimizer_step(self, record: dict) -> None:
        """Adam on the clipped gradients, unless the step is bad (a non-finite loss or
        gradient, or no loss): then nothing changes but the skip counters. No host sync with
        the fused optimizer (CUDA); the CPU decides on the host, which costs nothing there."""
        bad = ~(record["finite"] & torch.isfinite(record["grad_encoder"])
                & torch.isfinite(record["grad_head"]))
        if self.optimizer.defaults.get("fused"):
            self.optimizer.found_inf = bad.float()
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        elif not bool(bad):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.count_bad(bad)
        record["bad"] = bad

    def count_bad(self, bad: torch.Tensor) -> None:
        self.skipped_steps += bad
        self.bad_run.copy_(torch.where(bad, self.bad_run + 1, 0))

    @property
    def skipped(self) -> int:
        return int(self.skipped_steps)

    def read(self, record: dict) -> dict:
        """`record` with its device values read (one host sync), the skip counters added; a
        TrainingError once `train.max_bad_steps` consecutive steps were skipped."""
        out = read_record(record | {"skipped_total": self.skipped_steps,
                                    "bad_run": self.bad_run})
        bad_run = int(out.pop("bad_run"))
        out["skipped_total"] = int(out["skipped_total"])
        if "bad" in out:
            out["skipped"] = bool(out.pop("bad"))
        out.pop("finite", None)
        if out.get("skipped"):
            out["total"] = None
        if out.get("progress") is not None and "weighted_progress" not in out:
            out["weighted_progress"] = self.lam * out["progress"]
        if bad_run >= self.cfg.train.max_bad_steps:
            raise TrainingError(
                f"{bad_run} consecutive steps with a non-finite loss or gradient, the last at "
                f"step {out.get('step', self.step)}: lower the learning rate or lambda, or use "
                "--precision fp32")
        return out

    def backward(self, batch: Batch, *, head_only: bool = False) -> dict:
        """Forward, losses, backward, the gradients averaged over the ranks (several
        processes) and the head-gradient rescaling; gradients are left in the parameters'
        .grad. The record holds the losses as device scalars and `finite`, whether the total
        is finite (a non-finite total still runs backward: the step is then skipped on the
        device, without a host sync).

        With several processes the record holds the mean losses over the ranks and the videos,
        frames and samples of all ranks, and the step is skipped on every rank when any rank's
        loss is not finite (or no rank has a loss)."""
        host, batch = batch, batch.to(self.device, non_blocking=True)
        self.model.train()
        with trusted_inputs():
            out = self.losses(batch, epoch=self.epoch, step=self.step,
                              generators=self.generators, host=host)
        alignment, progress = out["alignment"], out["progress"]
        if head_only:
            total = progress
        elif progress is not None:
            total = alignment + self.lam * progress
        else:
            total = alignment
        record = {"step": self.step + 1, "epoch": self.epoch, "alignment": alignment.detach(),
                  "progress": None if progress is None else progress.detach(),
                  "lambda": self.lam, "samples": out["samples"], "videos": batch.size,
                  "frames": int(host.lengths.sum())}
        if self.dist.active:
            return self._backward_ranks(record, alignment, progress, total, head_only)
        if total is None:   # nothing to learn from (head only, no sample): skipped, not bad
            self.skipped_steps += 1
            return record | {"no_loss": True, "bad": torch.ones((), dtype=torch.bool)}
        total.backward()
        record["total"] = total.detach()
        record["finite"] = torch.isfinite(record["total"])
        if progress is not None:
            record["weighted_progress"] = self.lam * record["progress"]
        self.rescale_head(head_only)
        return record

    def rescale_head(self, head_only: bool) -> None:
        """DOC step 7: the head received lambda * grad(progress); dividing by lambda lets it
        learn at the natural scale while the encoder keeps the lambda-scaled signal."""
        if self.learnable and not head_only and self.lam > 0 and self.lam != 1:
            grads = [p.grad for p in self.head_params if p.grad is not None]
            if grads:
                torch._foreach_div_(grads, self.lam)

    def _backward_ranks(self, record: dict, alignment: torch.Tensor,
                        progress: torch.Tensor | None, total: torch.Tensor | None,
                        head_only: bool) -> dict:
        """`backward` of one rank of several: the ranks agree on the host (an all_reduce of
        the losses with the gradients), so a bad step is skipped on every rank."""
        record = read_record(record)
        finite = total is not None and bool(torch.isfinite(total))
        if finite:
            total.backward()
        # Every rank joins this reduction on every step, whatever its batch held.
        n_loss, n_bad, bad = self.reduce(record, alignment, progress, total)
        mean_total = record.pop("mean_total", None)
        record["weighted_progress"] = (None if record["progress"] is None
                                       else self.lam * record["progress"])
        skip = bool(n_bad or not n_loss)
        if skip:
            self.optimizer.zero_grad(set_to_none=True)
            record.update(bad_terms=bad, no_loss=True, bad=torch.ones((), dtype=torch.bool))
            self.skipped_steps += 1
            self.bad_run += int(n_bad > 0)   # no rank with a loss is no bad step
            return record
        record["total"] = mean_total if mean_total is not None else total.item()
        record["finite"] = torch.ones((), dtype=torch.bool, device=self.device)
        self.rescale_head(head_only)
        return record

    def reduce(self, record: dict, alignment: torch.Tensor, progress: torch.Tensor | None,
               total: torch.Tensor | None) -> tuple[int, int, list[str]]:
        """(ranks with a loss, ranks with a non-finite loss, the non-finite terms) of this step
        over all ranks: averages the gradients over the ranks (the spec's order: before the
        head rescaling and the clipping) and puts the ranks' mean losses and summed counts in
        `record` (read on the host), all in one all_reduce."""
        terms = (("alignment", alignment), ("progress", progress))
        bad_term = [v is not None and not bool(torch.isfinite(v)) for _, v in terms]
        has_loss = total is not None
        bad = has_loss and not bool(torch.isfinite(total))
        stats = torch.tensor([has_loss, bad, *bad_term, record["alignment"],
                              record["progress"] or 0.0, progress is not None,
                              total.item() if has_loss else 0.0, record["videos"],
                              record["frames"], record["samples"]], dtype=torch.float64)
        params = [p for p in self.model.parameters() if p.requires_grad]
        (n_loss, n_bad, bad_align, bad_prog, align_sum, prog_sum, n_prog, total_sum, videos,
         frames, samples) = self.dist.average_gradients(params, stats)
        ranks = self.dist.world_size
        record.update(alignment=align_sum / ranks,
                      progress=prog_sum / n_prog if n_prog else None,
                      videos=int(videos), frames=int(frames), samples=int(samples), ranks=ranks)
        if n_loss:
            record["mean_total"] = total_sum / n_loss
        return int(n_loss), int(n_bad), [n for (n, _), b in zip(terms, (bad_align, bad_prog))
                                         if b]

    def clip(self, record: dict, *, head_only: bool = False) -> None:
        """Gradient clipping (spec 7 step 10, B2): global, separate or none; the norms before
        and after go to `record` as device scalars."""
        tc = self.cfg.train
        # A run without a head still reports a head norm of 0, on the encoder's device.
        enc, head = (grad_norm(self.encoder_params, self.device),
                     grad_norm(self.head_params, self.device))
        enc_c, head_c = enc, head
        if head_only or tc.clip_mode == "separate":
            if not head_only:
                enc_c = clip_to(self.encoder_params, enc, tc.encoder_clip)
            if self.head_params:
                head_c = clip_to(self.head_params, head, tc.head_clip)
        elif tc.clip_mode == "global":
            both = torch.linalg.vector_norm(torch.stack([enc, head]))
            coef = clip_to(list(self.model.parameters()), both, tc.encoder_clip) / both
            coef = torch.where(both > 0, coef, 1.0)
            enc_c, head_c = enc * coef, head * coef
        record.update(grad_encoder=enc, grad_head=head, grad_encoder_clipped=enc_c,
                      grad_head_clipped=head_c)

    @torch.no_grad()
    def validation_losses(self, split: str = "val") -> dict:
        """Mean losses over a split, with fixed sampling seeds so epochs compare (B29)."""
        if not self.dataset.indices(split):
            return {}
        self.model.eval()
        gens = {"sampling": torch.Generator().manual_seed(12345),
                "gtcc": torch.Generator().manual_seed(54321)}
        loader = make_loader(self.dataset, split, batch_size=self.cfg.data.batch_size,
                             shuffle=False, drop_last=False)
        sums = {"alignment": 0.0, "progress": 0.0}
        counts = {"alignment": 0, "progress": 0}
        for batch in loader:
            if batch.size < 2:
                continue
            out = self.losses(batch.to(self.device), epoch=self.epoch, step=self.step,
                              generators=gens)
            for name in sums:
                value = out[name]
                if value is not None and torch.isfinite(value):
                    sums[name] += float(value)
                    counts[name] += 1
        res = {f"val_{k}": (sums[k] / counts[k] if counts[k] else None) for k in sums}
        if res["val_alignment"] is not None:
            res["val_total"] = res["val_alignment"] + self.lam * (res["val_progress"] or 0.0)
        return res

    def evaluate(self, split: str) -> dict | None:
        if not self.dataset.indices(split):
            return None
        return evaluate_progress(self.model, self.dataset, split, device=self.device)

    def state(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "skipped": self.skipped, "best_val": self.best_val,
                "class_paths": self.class_paths.tolist(),
                "class_seen": self.class_seen.tolist(), "world_size": self.dist.world_size,
                "stage": self.stage, "head_start": self.head_start}

    def save(self, run: RunDir, *, best: bool = False) -> None:
        meta = {"method": self.cfg.train.method, "step": self.step, "epoch": self.epoch,
                "input_shape": list(self.input_shape), "num_tasks": len(self.dataset.tasks),
                "config": self.cfg.model_dump(mode="json")}
        path = run.checkpoints_dir / ("best" if best else checkpoint_name(self.step))
        save_checkpoint(path, model=self.model, optimizer=self.optimizer, state=self.state(),
                        meta=meta, generators=self.generators)
        run.release_replaced()   # the new run can continue now: the one it replaced may go

    def restore(self, path) -> dict:
        """Continue from checkpoint `path`; a stage-2 checkpoint rebuilds the stage-2 optimizer
        first (its parameter groups differ). A damaged state is a CheckpointError."""
        try:
            peek = load_checkpoint(path, restore_rng=False)
            if not isinstance(peek, dict):
                raise TypeError(f"the state is a {type(peek).__name__}, not an object")
            if peek.get("stage", 1) == 2:
                self.stage, self.head_start = 1, int(peek["head_start"])
                self.enter_head_stage()
                self.head_start = int(peek["head_start"])
            state = load_checkpoint(path, model=self.model, optimizer=self.optimizer,
                                    generators=self.generators)
            self._set_state(state)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:
            raise CheckpointError(f"{path}: cannot resume, the training state is damaged "
                                  f"({type(exc).__name__}: {exc})") from None
        return state

    def _set_state(self, state: dict) -> None:
        for key in ("step", "epoch", "batch_in_epoch", "skipped"):
            value = state[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise TypeError(f"state '{key}' is {value!r}, not a non-negative integer")
        self.step, self.epoch = state["step"], state["epoch"]
        self.batch_in_epoch = state["batch_in_epoch"]
        self.skipped_steps.fill_(state["skipped"])
        self.best_val = state.get("best_val")
        self.stage = int(state.get("stage", 1))
        self.head_start = int(state.get("head_start", 0))
        if "class_paths" in state:
            self.class_paths = torch.tensor(state["class_paths"], dtype=torch.float32)
            self.class_seen = torch.tensor(state["class_seen"], dtype=torch.bool)

    def sync(self, extra: dict | None = None) -> dict:
        """Every rank takes rank 0's weights, optimizer state and counters (its initial
        weights, or the checkpoint it alone restored: other nodes need not see the run
        directory), and rank 0's `extra`, which it returns. Ranks > 0 restart their own random
        streams at this step (only rank 0's are checkpointed)."""
        if not self.dist.active:
            return dict(extra or {})
        self.dist.broadcast_module_(self.model)
        tree = self.dist.broadcast_tree({"state": self.state(), "extra": dict(extra or {}),
                                         "optimizer": self.optimizer.state_dict()}
                                        if self.dist.is_main else None)
        if not self.dist.is_main:
            self.optimizer.load_state_dict(tree["optimizer"])
            self._set_state(tree["state"])
            seed = rank_seed(self.cfg.train.seed, self.dist.rank, self.step)
            seed_everything(seed)
            self.generators = training_generators(seed)
        return tree["extra"]


class StepClock:
    """Seconds per step between two logged steps: on a GPU `step_batch` returns before the GPU
    is done, so its own duration says nothing; a logged step has waited for it (`read`)."""

    def __init__(self, step: int) -> None:
        self.restart(step)

    def restart(self, step: int) -> None:
        self.time, self.step = time.perf_counter(), step

    def lap(self, record: dict, step: int) -> dict:
        now = time.perf_counter()
        if step > self.step:
            record["seconds"] = (now - self.time) / (step - self.step)
        self.time, self.step = now, step
        return record


def summarise(report: dict | None) -> dict:
    """Headline numbers of a progress report: mean-over-videos MAE per predictor."""
    if not report:
        return {}
    return {name: res["metrics"]["mae"]["mean_over_videos"]
            for name, res in report.get("predictors", {}).items()}


def _iterate(loader, batches: list[list[int]], skip: int):
    """The epoch's batches from `skip` on (resuming mid-epoch skips loading the done ones)."""
    for indices in batches[skip:]:
        yield loader.collate_fn([loader.dataset[i] for i in indices])


def fit(cfg: Config, *, dataset: Dataset | None = None, run: RunDir | None = None,
        resume: bool = False, callback: Callback | None = None,
        dist: Dist = SINGLE) -> FitResult:
    """Train the model `cfg` describes; the same seed and config give the same numbers on
    the same device (deterministic kernels are switched on for the run).

    `dist`: this process's place in a multi-process run (`alignprog.distributed.setup`); it
    trains on `dist.device`, and only rank 0 uses `run` (the others may pass None)."""
    with deterministic(cfg.train.deterministic), _sigterm_as_interrupt():
        return _fit(cfg, dataset=dataset, run=run, resume=resume, callback=callback, dist=dist)


class _sigterm_as_interrupt:
    """During fit, SIGTERM raises KeyboardInterrupt in the main thread, so a killed run saves a
    checkpoint as Ctrl-C does; the previous handler is restored afterwards."""

    def __enter__(self):
        self.old = None
        if threading.current_thread() is threading.main_thread():
            def handler(signum, frame):
                raise KeyboardInterrupt
            self.old = signal.signal(signal.SIGTERM, handler)
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGTERM, self.old)
        return False


def _fit(cfg: Config, *, dataset: Dataset | None, run: RunDir | None, resume: bool,
         callback: Callback | None, dist: Dist) -> FitResult:
    """Train the model `cfg` describes (see the module docstring for one step).

    Every `train.log_every` steps a "step" record, at each epoch end an "epoch" record with the
    validation losses and progress errors, at the end an "end" record with the test errors; each
    goes to `callback(kind, record)` and, with a run directory, to its metrics.jsonl.
    """
    emit = callback or (lambda kind, record: None)
    tc = cfg.train
    check_config(cfg)
    device = dist.device if dist.active else resolve_device(tc.device)
    run = run if dist.is_main else None          # rank 0 alone writes the run directory
    dataset = dataset or load_dataset(cfg.data)
    trainer = Trainer(cfg, dataset, device, dist)
    saved: dict = {}
    if run is not None:
        if resume:
            state = trainer.restore(run.latest_checkpoint())
            saved["world_size"] = state.get("world_size", 1)
            run.truncate_metrics_after(trainer.step)
        else:
            run.write_config(cfg)
            run.write_split(dataset.splits)
            run.write_environment(device_info(device) | {"dataset": dataset.name,
                                                         "videos": len(dataset.videos)})
    saved = trainer.sync(saved)   # rank 0's weights, optimizer and counters on every rank
    return _fit_loop(cfg, trainer, dataset, run, resume, emit, dist, device, saved)


def check_config(cfg: Config) -> None:
    """The config errors `fit` raises before any work (the CLI calls this before it creates
    or replaces the run directory)."""
    if not cfg.data.multi_task:
        raise ConfigError("data.multi_task=false (single-task mode) is not supported by train "
                          "yet; train on one task with --set 'data.tasks=[TASK]' instead")
    if ENCODER_LAYOUT[cfg.model.encoder] != cfg.data.layout:
        raise ConfigError(f"model.encoder '{cfg.model.encoder}' reads the "
                          f"'{ENCODER_LAYOUT[cfg.model.encoder]}' layout but data.layout is "
                          f"'{cfg.data.layout}'")


def _fit_loop(cfg: Config, trainer: Trainer, dataset: Dataset, run: RunDir | None, resume: bool,
              emit: Callback, dist: Dist, device: torch.device, saved: dict) -> FitResult:
    tc = cfg.train
    loader = make_loader(dataset, "train", batch_size=cfg.data.batch_size, shuffle=True,
                         drop_last=True, seed=tc.seed, num_workers=tc.num_workers,
                         pin_memory=device.type == "cuda", num_replicas=dist.world_size,
                         rank=dist.rank)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ConfigError("the training split forms no batch (a task needs at least two "
                          "training videos)")
    total_steps = tc.steps or tc.epochs * steps_per_epoch
    if resume and not tc.steps and saved.get("world_size", 1) != dist.world_size:
        # Resumed with another number of ranks: the steps done were counted at the old one;
        # finish the remaining epochs at the new one (checkpoints hold the global step).
        total_steps = (trainer.step + (tc.epochs - trainer.epoch) * steps_per_epoch
                       - trainer.batch_in_epoch // dist.world_size)
    emit("start", {"steps": total_steps, "epochs": math.ceil(total_steps / steps_per_epoch),
                   "steps_per_epoch": steps_per_epoch, "device": str(device),
                   "lambda": trainer.lam, "method": tc.method, "ranks": dist.world_size,
                   "resumed_at": trainer.step if resume else None})
    result = FitResult(trainer.model, trainer.step, trainer.epoch)

    def log(kind: str, record: dict) -> None:
        result.history.append(record | {"kind": kind})
        if run is not None:
            run.log_metrics(record | {"kind": kind})
        emit(kind, record)

    clock = StepClock(trainer.step)
    try:
        while trainer.stage == 1 and trainer.step < total_steps:
            loader.batch_sampler.set_epoch(trainer.epoch)
            # batch_in_epoch counts the batches of all ranks: a run resumed with another
            # number of ranks redoes at most one batch per rank rather than skipping any.
            for batch in _iterate(loader, loader.batch_sampler.batches(),
                                  trainer.batch_in_epoch // dist.world_size):
                record = trainer.step_batch(batch)
                trainer.batch_in_epoch += dist.world_size
                # Reading a record waits for the GPU: only at the logged steps, and every
                # max_bad_steps steps to stop a run that keeps skipping.
                if trainer.step % tc.log_every == 0 or trainer.step == total_steps:
                    log("step", clock.lap(trainer.read(record), trainer.step))
                elif trainer.step % tc.max_bad_steps == 0:
                    trainer.read(record)
                if (run is not None and tc.checkpoint_every
                        and trainer.step % tc.checkpoint_every == 0):
                    trainer.save(run)
                if trainer.step >= total_steps:
                    break
            record = {"step": trainer.step, "epoch": trainer.epoch}
            improved = False
            if dist.is_main:  # the others wait at the barrier below: no double counting
                record |= trainer.validation_losses("val")
                record["val_progress_mae"] = summarise(trainer.evaluate("val"))
                improved = record.get("val_total") is not None and (
                    trainer.best_val is None or record["val_total"] < trainer.best_val)
            if improved:
                trainer.best_val = record["val_total"]
            trainer.epoch += 1
            trainer.batch_in_epoch = 0
            log("epoch", record)
            if run is not None:
                trainer.save(run)
                if improved:
                    trainer.save(run, best=True)
            dist.barrier()
            clock.restart(trainer.step)   # evaluation and saving are not training time
        if tc.two_stage and trainer.learnable:
            _train_head_only(trainer, loader, log, run)
    except KeyboardInterrupt:
        if run is not None:
            trainer.save(run)
        result.interrupted = True
        result.step, result.epoch = trainer.step, trainer.epoch
        return result
    test = trainer.evaluate("test") if dist.is_main else None
    dist.barrier()
    if run is not None and test is not None:
        run.write_json("eval_test.json", test)
    log("end", {"step": trainer.step, "epoch": trainer.epoch,
                "test_progress_mae": summarise(test)})
    result.step, result.epoch, result.test_report = trainer.step, trainer.epoch, test
    return result


def _train_head_only(trainer: Trainer, loader, log: Callable[[str, dict], None],
                     run: RunDir | None = None) -> None:
    """Second stage (spec 7, two-stage alternative): the progress head alone on the frozen
    encoder, progress loss only, its own Adam (lr head_lr, else 1e-3) and head clip. Each
    stage-2 epoch ends with a checkpoint (state "stage": 2), so the latest checkpoint holds the
    trained head and an interrupted stage 2 resumes; a resumed stage-2 run comes in here with
    the stage-2 optimizer already rebuilt."""
    tc = trainer.cfg.train
    dist = trainer.dist
    if trainer.stage != 2:
        trainer.enter_head_stage()
    while trainer.epoch - trainer.head_start < tc.head_epochs:
        loader.batch_sampler.set_epoch(trainer.epoch)
        for batch in _iterate(loader, loader.batch_sampler.batches(),
                              trainer.batch_in_epoch // dist.world_size):
            record = trainer.step_batch(batch, head_only=True)
            trainer.batch_in_epoch += dist.world_size
            if trainer.step % tc.log_every == 0:
                log("step", trainer.read(record) | {"stage": "head"})
            elif trainer.step % tc.max_bad_steps == 0:
                trainer.read(record)
            if run is not None and tc.checkpoint_every and trainer.step % tc.checkpoint_every == 0:
                trainer.save(run)
        record = {"step": trainer.step, "epoch": trainer.epoch, "stage": "head"}
        improved = False
        if dist.is_main:
            record["val_progress_mae"] = summarise(trainer.evaluate("val"))
            head_mae = (record["val_progress_mae"] or {}).get("head")
            improved = trainer.best_val is None or (
                head_mae is not None and head_mae < trainer.best_val)
            if improved and head_mae is not None:
                trainer.best_val = head_mae
        dist.barrier()
        trainer.epoch += 1
        trainer.batch_in_epoch = 0
        log("epoch", record)
        if run is not None:
            trainer.save(run)
            if improved:
                trainer.save(run, best=True)
        dist.barrier()
