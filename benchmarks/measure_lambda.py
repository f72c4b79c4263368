"""Gradient balance of alignment vs progress on the encoder at initialisation (synthetic data).

The ratio |grad alignment| / |grad progress| over the encoder's parameters is the lambda at which
both terms of total = alignment + lambda * progress pull the encoder equally;
``alignprog.config.DEFAULT_LAMBDA`` is chosen from it.

    PYTHONPATH=. python benchmarks/measure_lambda.py --batches 4
"""

from __future__ import annotations

import argparse
import statistics

import torch

from alignprog.config import load_config
from alignprog.data import load_dataset, make_loader
from alignprog.losses import ALIGNMENT_LOSSES
from alignprog.losses.progress import progress_loss
from alignprog.models import build_model
from alignprog.sampling import gather_segments, sample_segments


def grad_norm(loss: torch.Tensor, params: list[torch.Tensor]) -> float:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum(g.square().sum() for g in grads if g is not None)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--batches", type=int, default=4)
    args = p.parse_args()
    cfg = load_config()
    ds = load_dataset(cfg.data)
    shape = ds.videos[0].arrays[cfg.data.layout].shape[1:]
    for method, loss_fn in ALIGNMENT_LOSSES.items():
        torch.manual_seed(0)
        model = build_model(cfg.model, cfg.progress, input_shape=shape,
                            num_tasks=len(ds.tasks), method=method)
        params = list(model.encoder.parameters())
        loader = make_loader(ds, "train", batch_size=2, shuffle=True, drop_last=True, seed=0)
        gen = torch.Generator().manual_seed(0)
        rows = []
        for _, batch in zip(range(args.batches), loader):
            out = model(batch.features, batch.mask)
            extra = {"drop": out.drop_logits} if method == "gtcc" else {}
            align = loss_fn(out.embeddings, batch.mask, **extra)
            s = sample_segments(batch.seg_start, batch.seg_end, batch.seg_foreground,
                                batch.seg_mask, generator=gen)
            seg, lengths = gather_segments(out.embeddings, s)
            prog = progress_loss(model.progress_head(seg, lengths), s.gt)
            rows.append((align.item(), prog.item(),
                         grad_norm(align, params) / grad_norm(prog, params)))
        med = [statistics.median(col) for col in zip(*rows)]
        print(f"{method:5s} alignment {med[0]:.3g}  progress {med[1]:.3g}  "
              f"|grad alignment| / |grad progress| {med[2]:.3g}")


if __name__ == "__main__":
    main()
