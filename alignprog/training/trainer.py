"""The trainer: the model, its optimizer and losses, one step (`step_batch`), validation,
checkpoints and the ranks' agreement. The loop over epochs is `loop.fit`; the step itself,
shared by the eager, graphed and multi-process paths, is `step.take_step`."""

from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn

from alignprog.config import Config
from alignprog.data import Batch, Dataset, make_loader
from alignprog.errors import AlignprogError
from alignprog.evaluation import evaluate_progress
from alignprog.losses import ALIGNMENT_LOSSES
from alignprog.losses.progress import (cumulative_l2_loss, progress_loss,
                                       segment_path_lengths)
from alignprog.models import AlignmentModel, EncoderOutput, build_model, set_dense
from alignprog.runtime import (autocast, fused_optimizer, host_lengths, seed_everything,
                               to_device, trusted_inputs)
from alignprog.sampling import SegmentSamples, gather_frames, gather_segments, sample_segments
from alignprog.training.checkpoint import (CheckpointError, checkpoint_name, load_checkpoint,
                                           save_checkpoint)
from alignprog.training.distributed import SINGLE, Dist
from alignprog.training.graphs import GraphInputs, StepGraphs
from alignprog.training.loss_graphs import LossGraphs
from alignprog.training.rundir import RunDir
from alignprog.training.schedule import lr_factor, scheduled, set_learning_rates, use_tensor_rates
from alignprog.training.step import (StepMetrics, backward, finish_accumulated, objective,
                                     take_step)
from alignprog.training.uploads import Uploads


class TrainingError(AlignprogError):
    """Training cannot go on (e.g. too many consecutive non-finite steps)."""


def loss_keywords(cfg: Config) -> dict[str, Any]:
    """The chosen method's keywords from the config (pure loss functions never see it)."""
    method = cfg.train.method
    return dict(getattr(cfg.loss, method).model_dump(), compat=cfg.loss.compat,
                reduction=cfg.loss.reduction)


def split_parameters(model: AlignmentModel) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(encoder parameters, progress-head parameters); the head's own base encoder
    (progress.learnable.input=separate) counts as the head's."""
    head = list(model.progress_head.parameters()) if model.progress_head is not None else []
    if model.progress_base is not None:
        head += list(model.progress_base.parameters())
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


def alignment_parameters(model: AlignmentModel) -> list[nn.Parameter] | None:
    """The encoder's parameters between the progress loss's input (`Trainer.head_point`) and
    the alignment loss: GTCC's drop branch (it reads the embeddings), and when the head reads
    the base encoder's features, everything after the base (the MCN heads and fusion). None
    when the head has its own base encoder: the losses read no tensor in common."""
    encoder = model.encoder
    if model.head_input == "separate":
        return None
    if model.head_input == "features":
        return [p for name, p in encoder.named_parameters() if not name.startswith("base.")]
    return list(encoder.drop.parameters()) if encoder.drop is not None else []


def training_generators(seed: int) -> dict[str, torch.Generator]:
    """Local generators for progress sampling and GTCC's draws, checkpointed (never the global
    RNG: docs/reference-bugs.md#global-rng-reseeding)."""
    return {"sampling": torch.Generator().manual_seed(seed + 1),
            "gtcc": torch.Generator().manual_seed(seed + 2)}


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
        groups += self.head_groups(tc.head_lr or tc.lr)
        # Adam over all parameters, betas (0.9, 0.999), eps 1e-8, no weight decay
        # (docs/algorithms.md#optimiser).
        # Fused on CUDA: one kernel, capturable in a CUDA graph, and it skips a non-finite
        # step on the device (found_inf) without a host sync.
        fused = fused_optimizer(device)
        self.optimizer = torch.optim.Adam(groups, betas=(0.9, 0.999), eps=1e-8,
                                          fused=fused or None, capturable=fused)
        # The groups' configured learning rates (the schedule's factor multiplies them) and the
        # stage's steps the schedule spans (`set_schedule`)
        self.base_lrs = [g["lr"] for g in groups]
        self.schedule_start, self.schedule_steps = 0, 1
        # On a GPU the model runs every padded position: no data-dependent shape, no host sync.
        set_dense(self.model, device.type == "cuda")
        # Batches copied to the GPU ahead of their step (`prefetch`), beside the compute
        self.uploads = Uploads(device)
        self.loss_fn = ALIGNMENT_LOSSES[tc.method]
        self.loss_kw = loss_keywords(cfg)
        self.lam = pc.lambda_for(tc.method) if pc.enabled else 0.0   # balance=fixed
        # Without a progress objective there is nothing to balance: the plain backward.
        self.balance = pc.balance if pc.enabled else "fixed"
        self.balance_ratio = pc.balance_ratio
        # balance=gradient: the sum and count of the steps' lambdas since the last validation,
        # on the device (their mean weighs the validation total)
        self.lam_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.lam_steps = torch.zeros((), dtype=torch.long, device=device)
        self.learnable = pc.enabled and pc.method == "learnable"
        # balance=gradient measures the two gradients on the tensor both losses read, the
        # head's input (`head_point`); these parameters lie between it and the alignment loss
        self.alignment_params = alignment_parameters(self.model)
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
        # balance=gradient: the first validation's (alignment, progress) losses, the units of
        # the validation score that picks `best` (see `validation_score`)
        self.val_reference: list[float] | None = None
        self.stage = 1            # 2: the head alone on the frozen encoder (train.two_stage)
        self.head_start = 0       # the epoch at which stage 2 began
        self.graphs = StepGraphs.create(
            self.model, self.optimizer, self.graph_backward, self.captured_step, cfg, device,
            several_processes=dist.active)
        # auto with a compute-bound encoder: the eager step replays VAVA's loss alone as CUDA
        # graphs; the counter is its phi step, read from the device there
        self.loss_graphs = LossGraphs.create(cfg, device, self.graphed_loss,
                                             several_processes=dist.active)
        self.loss_counter = torch.zeros((), dtype=torch.long, device=device)

    def enter_head_stage(self) -> None:
        """Stage 2 of two-stage training (docs/algorithms.md#two-stage-training): freeze the
        encoder and give the head its own Adam (lr head_lr, else 1e-3). Also rebuilt on resuming
        a stage-2 checkpoint."""
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
        groups = self.head_groups(tc.head_lr or 1e-3)
        self.optimizer = torch.optim.Adam(groups, betas=(0.9, 0.999), eps=1e-8,
                                          fused=fused or None, capturable=fused)
        self.base_lrs = [g["lr"] for g in groups]

    def set_schedule(self, start: int, steps: int) -> None:
        """The learning-rate schedule of the current stage spans its `steps` optimizer steps
        from global step `start` (docs/algorithms.md#learning-rate-schedule)."""
        self.schedule_start, self.schedule_steps = start, max(steps, 1)

    def _apply_schedule(self, graphed: bool = False) -> float:
        """Set the groups' learning rates for the step about to run; the encoder's (first
        group's), which the step logs. A step that may replay a CUDA graph (`graphed`) reads
        them from device tensors: made before the first capture (or after a resume, whose
        optimizer state brings its own), then refilled in place, as captured graphs read
        their memory."""
        if not scheduled(self.cfg.train):
            return self.base_lrs[0]
        held = self.optimizer.param_groups[0]["lr"]
        if graphed and not (isinstance(held, torch.Tensor) and held.is_cuda):
            use_tensor_rates(self.optimizer, self.device)
        factor = lr_factor(self.step - self.schedule_start, self.schedule_steps, self.cfg.train)
        set_learning_rates(self.optimizer, self.base_lrs, factor)
        return self.base_lrs[0] * factor

    def head_groups(self, head_lr: float) -> list[dict[str, Any]]:
        """The optimizer groups of the head's side: the head at `head_lr`; its own base encoder
        (progress.learnable.input=separate), an encoder, at the encoder's learning rate."""
        base = self.model.progress_base
        own = {id(p) for p in base.parameters()} if base is not None else set()
        head = [p for p in self.head_params if id(p) not in own]
        groups = [{"params": head, "lr": head_lr}] if head else []
        if base is not None:
            groups.append({"params": list(base.parameters()), "lr": self.cfg.train.lr})
        return groups

    def losses(self, batch: Batch, *, epoch: int, step: int,
               generators: dict[str, torch.Generator], host: Batch | None = None,
               graphed: bool = False) -> dict[str, Any]:
        """The forward pass: alignment and progress losses of a batch on the device.

        `host`: the same batch on the CPU, where the sampler reads the segments (default
        `batch`); giving it spares the copies back from the device. `graphed`: the alignment
        loss may be a replay of `loss_graphs` (the training step)."""
        out = self.forward(batch)
        emb = out.embeddings.float()                          # losses run in fp32
        point = self.head_point(out, emb)
        drop = None if out.drop_logits is None else out.drop_logits.float()
        alignment = None
        if graphed and self.loss_graphs is not None:
            self.loss_counter.fill_(self.phi_counter(epoch=epoch, step=step))
            alignment = self.loss_graphs(emb, batch.mask, self.loss_counter)
        if alignment is None:
            alignment = self.alignment_loss(emb, drop, batch.mask, epoch=epoch, step=step,
                                            generators=generators)
        progress, n_samples = self.progress_loss(point.float(), batch, host or batch,
                                                 generators=generators)
        return {"alignment": alignment, "progress": progress, "samples": n_samples,
                "embeddings": point}

    def head_point(self, out: EncoderOutput, emb: torch.Tensor) -> torch.Tensor:
        """The tensor (B, T, D) where both losses' gradients meet, which the progress loss
        reads (as fp32): the head's input (`progress.learnable.input`), else the fp32
        embeddings `emb` (cumulative_l2: no head, and `build_model` gives a model without a
        head the embeddings as its head input). The features are returned as the encoder gave
        them: under bf16/fp16 autocast their fp32 copy is not on the alignment loss's path.
        With a head of its own base encoder the point is that encoder's output, which the
        alignment loss does not read."""
        if self.model.head_input == "features":
            return out.features
        if self.model.head_input == "separate":
            return out.progress_features
        return emb

    def forward(self, batch: Batch):
        """The encoder on a device batch (`EncoderOutput`), in the configured precision."""
        with autocast(self.device, self.cfg.train.precision):
            return self.model(batch.features, batch.mask)

    def alignment_loss(self, emb: torch.Tensor, drop: torch.Tensor | None, mask: torch.Tensor,
                       *, epoch: int | torch.Tensor | None = None,
                       step: int | torch.Tensor | None = None,
                       generators: dict[str, torch.Generator] | None = None) -> torch.Tensor:
        """The method's alignment loss of fp32 embeddings (B, T, D) with their mask (B, T)
        (GTCC: and drop logits). VAVA's `epoch` and `step` may be device scalars (its phi in a
        CUDA graph, `phi_counter`)."""
        epoch = self.epoch if epoch is None else epoch
        step = self.step if step is None else step
        generators = generators or self.generators
        kw = dict(self.loss_kw)
        if self.cfg.train.method == "gtcc":
            kw.update(drop=drop, epoch=epoch, generator=generators["gtcc"])
        elif self.cfg.train.method == "vava":
            # Reference: phi indexed by the epoch; fixed: by the optimizer step
            # (docs/reference-bugs.md#vava-phi-indexed-by-epoch).
            kw.update(global_step=self.phi_counter(epoch=epoch, step=step))
        return self.loss_fn(emb, mask, **kw)

    def phi_counter(self, *, epoch: int | torch.Tensor | None = None,
                    step: int | torch.Tensor | None = None) -> int | torch.Tensor:
        """What VAVA's phi is indexed by (`alignment_loss`), as a graph's device counter
        holds it: the epoch with compat=reference, else the optimizer step."""
        if self.cfg.loss.compat == "reference":
            return self.epoch if epoch is None else epoch
        return self.step if step is None else step

    def graphed_loss(self, emb: torch.Tensor, mask: torch.Tensor, counter: torch.Tensor
                     ) -> torch.Tensor:
        """The alignment loss as `loss_graphs` captures it (VAVA: no drop logits, no
        generator): `counter` is the epoch or step that `alignment_loss` would pass."""
        with trusted_inputs():
            return self.alignment_loss(emb, None, mask, epoch=counter, step=counter)

    def progress_loss(self, emb: torch.Tensor, batch: Batch, host: Batch, *,
                      generators: dict[str, torch.Generator] | None = None
                      ) -> tuple[torch.Tensor | None, int]:
        """(progress loss or None, number of head samples) of what it reads, fp32 (B, T, D):
        the head's input or, for cumulative_l2, the embeddings (`head_point`)."""
        cfg, tc = self.cfg, self.cfg.train
        lc = cfg.progress.learnable
        generators = generators or self.generators
        progress, n_samples = None, 0
        if self.learnable:
            samples = self.draw_samples(host, generators["sampling"])
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

    def prefetch(self, batches: list[Batch]) -> None:
        """Start copying the batches of a later step to the GPU on a side stream, so that the
        copy overlaps the steps before it (`training.uploads`); the step that gets these host
        batches takes the copies. Does nothing off CUDA."""
        self.uploads.start(batches)

    def step_batch(self, batch: Batch, *, head_only: bool = False) -> StepMetrics:
        """One optimizer step (skipped on the device when the loss or a gradient is not
        finite); its metrics, device scalars where they come from the GPU: `read()` them (one
        host sync) at the steps that log. On CUDA the step is a CUDA-graph replay where the
        batch allows it (train.cuda_graphs)."""
        start = time.perf_counter()
        metrics = None
        graphed = (self.graphs is not None and self.graphs.failed is None and not head_only
                   and self.step > 0 and batch.size >= 2)
        lr = self._apply_schedule(graphed)
        uploaded = self.uploads.take(batch, copy_now=False)   # the copy `prefetch` began
        if graphed:
            metrics = self._graph_step(batch, uploaded)
        if metrics is None:
            # No gradient left over: a CUDA graph's replay leaves its own buffers in .grad
            self.optimizer.zero_grad(set_to_none=True)
            metrics = self._eager_step(batch, uploaded, head_only=head_only)
        return self._finish_step(metrics, lr, start)

    def step_batches(self, batches: list[Batch], *, head_only: bool = False) -> StepMetrics:
        """One optimizer step from the gradients of several batches (`train.accumulate`): each
        batch's forward and backward in turn (the memory of one), their gradients averaged,
        then the one clipping and Adam step of `take_step` (eager: a CUDA graph holds one
        batch's step). One batch is `step_batch`."""
        if len(batches) == 1:
            return self.step_batch(batches[0], head_only=head_only)
        if self.dist.active:
            raise TrainingError("train.accumulate > 1 runs in one process only")
        start = time.perf_counter()
        lr = self._apply_schedule()
        self.optimizer.zero_grad(set_to_none=True)
        parts = []
        for host in batches:
            out = self._device_losses(host)
            total, lam = backward(self, out["alignment"], out["progress"], out["embeddings"],
                                  head_only=head_only)
            parts.append((self._info(host, out["samples"]), out["alignment"].detach(),
                          None if out["progress"] is None else out["progress"].detach(),
                          total, lam))
            del out
        metrics = finish_accumulated(self, parts, head_only=head_only)
        return self._finish_step(metrics, lr, start)

    def _finish_step(self, metrics: StepMetrics, lr: float, start: float) -> StepMetrics:
        self.step += 1
        metrics.extra.update(lr=lr, seconds=time.perf_counter() - start)
        if self.device.type == "cuda":
            metrics.extra["gpu_memory_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return metrics

    def _info(self, host: Batch, samples: int) -> StepMetrics:
        """The host half of a step's metrics (the device values come from `take_step`)."""
        return StepMetrics(step=self.step + 1, epoch=self.epoch, lam=self.lam, samples=samples,
                           videos=host.size, frames=int(host.lengths.sum()),
                           alignment=torch.zeros(()))

    def _eager_step(self, host: Batch, uploaded: Batch | None = None, *,
                    head_only: bool = False) -> StepMetrics:
        """Forward and losses on the device (of the batch's device copy `uploaded` where
        `prefetch` made one), then `take_step` (backward, the ranks' averaging, head rescale,
        clipping, Adam)."""
        out = self._device_losses(host, uploaded)
        return take_step(self, out["alignment"], out["progress"],
                         self._info(host, out["samples"]), embeddings=out["embeddings"],
                         head_only=head_only)

    def _device_losses(self, host: Batch, uploaded: Batch | None = None) -> dict[str, Any]:
        """`losses` of a host batch on the device (`uploaded`, else the copy `prefetch` began,
        else a copy now), the model in training mode."""
        batch = uploaded if uploaded is not None else self.uploads.take(host)
        self.model.train()
        with trusted_inputs(), host_lengths(host.lengths):
            return self.losses(batch, epoch=self.epoch, step=self.step,
                               generators=self.generators, host=host, graphed=True)

    def _graph_step(self, host: Batch, uploaded: Batch | None = None) -> StepMetrics | None:
        """The step as a CUDA-graph replay (its buffers filled from `uploaded`, the batch's
        device copy, where there is one), or None where it must run eagerly (no progress
        sample this step, or a capture that failed). The progress samples are drawn here, on
        the host, with the generator and draws of the eager step."""
        gen = self.generators["sampling"]
        state = gen.get_state()
        samples = None
        if self.learnable:
            samples = self.draw_samples(host, gen)
            if len(samples) == 0:   # no progress term this step: the eager step draws again
                gen.set_state(state)
                return None
        values = self.graphs.replay(host, samples, self.phi_counter(), uploaded)
        if values is None:
            gen.set_state(state)
            return None
        info = self._info(host, len(samples) if samples is not None else 0)
        values["progress"] = values["progress"] if self.learnable else None
        return info.with_values(**values)

    def draw_samples(self, host: Batch, generator: torch.Generator) -> SegmentSamples:
        """The progress head's training segments of a host batch."""
        lc = self.cfg.progress.learnable
        return sample_segments(host.seg_start, host.seg_end, host.seg_foreground,
                               host.seg_mask, samples_per_video=lc.samples_per_video,
                               frames_per_segment=lc.frames_per_segment,
                               min_segment_len=lc.min_segment_len,
                               stratified=lc.stratified_sampling, generator=generator)

    def graph_losses(self, inputs: GraphInputs
                     ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(alignment, progress, embeddings) of a CUDA graph's static buffers: the eager losses
        on padded inputs (the padding carries no weight)."""
        lc = self.cfg.progress.learnable
        with trusted_inputs():
            with autocast(self.device, self.cfg.train.precision):
                out = self.model(inputs.features, inputs.mask)
            emb = out.embeddings.float()
            point = self.head_point(out, emb)
            drop = None if out.drop_logits is None else out.drop_logits.float()
            alignment = self.alignment_loss(emb, drop, inputs.mask, epoch=inputs.step,
                                            step=inputs.step)
            progress = None
            if self.learnable:
                seg = gather_frames(point.float(), inputs.video, inputs.start, inputs.length,
                                    inputs.width)
                with autocast(self.device, self.cfg.train.precision):
                    pred = self.model.progress_head(seg, inputs.length).float()    # (Qb,)
                progress = progress_loss(pred, inputs.gt, weighted=lc.weighted_loss,
                                         weight_cap=lc.weight_cap, kind=lc.loss,
                                         valid=inputs.valid)
        return alignment, progress, point

    def graph_backward(self, inputs: GraphInputs) -> None:
        """The graph losses' backward as the step runs it (the warm-up before a capture)."""
        backward(self, *self.graph_losses(inputs))

    def captured_step(self, inputs: GraphInputs) -> dict[str, torch.Tensor]:
        """The captured step: the graph losses through `take_step`, its device values out."""
        alignment, progress, emb = self.graph_losses(inputs)
        info = StepMetrics(step=0, epoch=0, lam=self.lam, samples=0, videos=0, frames=0,
                           alignment=alignment)
        metrics = take_step(self, alignment, progress, info, embeddings=emb,
                            release_grads=False)
        values = metrics.values()
        if values["progress"] is None:
            values["progress"] = torch.zeros((), device=self.device)
        if not isinstance(values["lam"], torch.Tensor):
            values["lam"] = torch.full((), values["lam"], device=self.device)
        return values

    def epoch_lambda(self) -> float:
        """The lambda of the validation total: balance=fixed, the fixed one; balance=gradient,
        the mean of the steps' lambdas since the last call (one host sync), or the fixed one
        before any step had both losses."""
        if self.balance != "gradient":
            return self.lam
        steps = int(self.lam_steps)
        lam = float(self.lam_sum) / steps if steps else self.lam
        self.lam_sum.zero_()
        self.lam_steps.zero_()
        return lam

    @property
    def skipped(self) -> int:
        return int(self.skipped_steps)

    def read(self, metrics: StepMetrics) -> dict:
        """The step's record with its device values read (one host sync) and the skip
        counters; a TrainingError once `train.max_bad_steps` consecutive steps were skipped."""
        out = metrics.read({"skipped_total": self.skipped_steps, "bad_run": self.bad_run})
        bad_run = out.pop("bad_run")
        if bad_run >= self.cfg.train.max_bad_steps:
            raise TrainingError(
                f"{bad_run} consecutive steps with a non-finite loss or gradient, the last at "
                f"step {out.get('step', self.step)}: lower the learning rate, --balance-ratio "
                "or --lambda, or use --precision fp32")
        return out

    @torch.no_grad()
    def validation_losses(self, split: str = "val") -> dict:
        """Mean losses over a split, with fixed sampling seeds so epochs compare (the reference
        samples its validation loss at random: docs/reference-bugs.md#config-drift)."""
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
            res["val_total"] = objective(res["val_alignment"], res["val_progress"],
                                         self.epoch_lambda())
            res["val_score"] = self.validation_score(res["val_alignment"], res["val_progress"],
                                                     res["val_total"])
        return res

    def validation_score(self, alignment: float, progress: float | None, total: float) -> float:
        """What picks the `best` checkpoint (lower is better). balance=fixed: the validation
        total. balance=gradient, whose lambda moves by orders of magnitude within a run: each
        loss over its value at the first validation, weighted 1 : balance_ratio as in the
        step, so the score does not follow lambda."""
        if self.balance != "gradient":
            return total
        if self.val_reference is None:
            self.val_reference = [alignment, progress]
        score = alignment / self.val_reference[0] if self.val_reference[0] else alignment
        if progress is not None and self.val_reference[1]:
            score += self.balance_ratio * progress / self.val_reference[1]
        return score

    def evaluate(self, split: str) -> dict | None:
        if not self.dataset.indices(split):
            return None
        return evaluate_progress(self.model, self.dataset, split, device=self.device)

    def state(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "skipped": self.skipped, "best_val": self.best_val,
                "class_paths": self.class_paths.tolist(),
                "class_seen": self.class_seen.tolist(), "world_size": self.dist.world_size,
                "stage": self.stage, "head_start": self.head_start,
                "val_reference": self.val_reference}

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
        reference = state.get("val_reference")
        if reference is not None and not (
                isinstance(reference, list) and len(reference) == 2
                and all(v is None or isinstance(v, (int, float)) for v in reference)):
            raise TypeError(f"state 'val_reference' is {reference!r}, not two losses")
        self.val_reference = reference
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
