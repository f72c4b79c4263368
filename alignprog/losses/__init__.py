"""Alignment losses: pure tensor functions, no config import (docs/algorithms.md#alignment-losses).

Each method has a padded-batch core ``<name>_loss_batch(x (B, T, D), mask (B, T), ...)`` and the
list form ``<name>_loss(seqs, ...)``; ``compat="fixed"`` (default) corrects every listed
reference bug, ``compat="reference"`` reproduces the reference numbers; ``reduction="reference"``
keeps the reference magnitudes that the pipeline description's lambda values assume, ``"mean"``
normalises by pairs and frames.
"""

from alignprog.losses.gtcc import gtcc_loss, gtcc_loss_batch
from alignprog.losses.lav import lav_loss, lav_loss_batch
from alignprog.losses.softdtw import soft_dtw
from alignprog.losses.tcc import tcc_loss, tcc_loss_batch
from alignprog.losses.vava import vava_loss, vava_loss_batch

# Variants by name: method -> padded-batch loss.
ALIGNMENT_LOSSES = {
    "tcc": tcc_loss_batch,
    "gtcc": gtcc_loss_batch,
    "lav": lav_loss_batch,
    "vava": vava_loss_batch,
}

__all__ = ["ALIGNMENT_LOSSES", "gtcc_loss", "gtcc_loss_batch", "lav_loss", "lav_loss_batch",
           "soft_dtw", "tcc_loss", "tcc_loss_batch", "vava_loss", "vava_loss_batch"]
