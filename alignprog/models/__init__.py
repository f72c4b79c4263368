"""Encoders, multi-head attention fusion and progress heads; `build_model(config)`."""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import torch
from torch import nn

from alignprog.config import ENCODER_LAYOUT, ModelConfig, ProgressConfig
from alignprog.models.encoders import BaseEncoder, build_encoder
from alignprog.models.mcn import EncoderOutput, MultiHeadEncoder, SingleHeadEncoder
from alignprog.models.progress_heads import ProgressHead, build_progress_head

# ENCODER_LAYOUT lives in the config (which checks data.layout against it); it is re-exported
# here for the code that builds models.
__all__ = ["ENCODER_LAYOUT", "AlignmentModel", "BaseEncoder", "EncoderOutput", "MultiHeadEncoder",
           "ProgressHead", "SingleHeadEncoder", "build_encoder", "build_model",
           "build_progress_head"]


HEAD_INPUTS = ("embeddings", "features", "separate")


class AlignmentModel(nn.Module):
    """The encoder and the progress head, trained together (the pipeline description's design).

    With head_input "separate" the head reads `progress_base`, a base encoder of its own (the
    alignment encoder's architecture, its own weights) that only the progress loss trains."""

    def __init__(self, encoder: MultiHeadEncoder | SingleHeadEncoder,
                 progress_head: ProgressHead | None, *, head_input: str = "embeddings",
                 progress_base: BaseEncoder | None = None) -> None:
        super().__init__()
        if head_input not in HEAD_INPUTS:
            raise ValueError(f"head_input must be one of {HEAD_INPUTS}, got {head_input!r}")
        if (head_input == "separate") != (progress_base is not None):
            raise ValueError("head_input 'separate' goes with a progress_base, and only it")
        self.encoder = encoder
        self.progress_head = progress_head
        self.progress_base = progress_base
        self.head_input = head_input   # what the head reads (`head_features`)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> EncoderOutput:
        """The encoder's output; with a `progress_base`, its output as `progress_features`."""
        out = self.encoder(x, mask)
        if self.progress_base is not None:
            out = replace(out, progress_features=self.progress_base(x, mask))
        return out

    def head_features(self, out: EncoderOutput) -> torch.Tensor:
        """The per-frame input of the progress head (B, T, D) in an output of `forward`: the
        aligned embeddings, the base encoder's features, or the head's own base encoder's
        output (`progress.learnable.input`)."""
        if self.head_input == "separate":
            return out.progress_features
        return out.features if self.head_input == "features" else out.embeddings


def set_dense(model: nn.Module, dense: bool = True) -> None:
    """Switch every module of `model` that has a `dense` mode (the MCN heads, the `naive` and
    `resnet50` encoders): True runs every padded position with fixed shapes and no host sync
    (what the trainer uses on a GPU; `resnet50` there runs the real frames only where the
    caller gives the lengths on the host, `runtime.host_lengths`), False the real frames only
    (default)."""
    for module in model.modules():
        if isinstance(getattr(module, "dense", None), bool):
            module.dense = dense


def build_model(model: ModelConfig, progress: ProgressConfig | None = None, *,
                input_shape: Sequence[int], num_tasks: int = 1, method: str | None = None
                ) -> AlignmentModel:
    """Build the model a config describes.

    ``input_shape`` is one frame's array shape, (D_in,) for features or (C, H, W) for frames;
    ``num_tasks`` sets the MCN head count when ``model.num_heads`` is unset; ``method`` switches
    the drop branch on for GTCC when ``model.dropping`` is unset.
    """
    layout = ENCODER_LAYOUT[model.encoder]
    rank = 1 if layout == "features" else 3
    if len(input_shape) != rank:
        raise ValueError(f"encoder '{model.encoder}' reads the {layout} layout, frames of rank "
                         f"{rank}, got frames of shape {tuple(input_shape)}")
    base = _build_base(model, input_shape)
    dropping = model.dropping if model.dropping is not None else method == "gtcc"
    drop_layers = model.drop_layers if dropping else None
    if model.mcn:
        encoder: MultiHeadEncoder | SingleHeadEncoder = MultiHeadEncoder(
            base, model.num_heads or num_tasks, out_dim=model.output_dim,
            head_layers=model.head_layers, attn_layers=model.attn_layers,
            drop_layers=drop_layers)
    else:
        encoder = SingleHeadEncoder(base, drop_layers=drop_layers)
    head, head_input, progress_base = None, "embeddings", None
    if progress is not None and progress.enabled and progress.method == "learnable":
        lc = progress.learnable
        head = build_progress_head(lc.arch, in_dim=model.output_dim,
                                   hidden_dim=lc.hidden_dim, position=lc.position,
                                   learnable_h0=lc.learnable_h0,
                                   frame_count_max=lc.frame_count_max)
        head_input = lc.input_for(method)
        if head_input == "separate":
            # built after the encoder: the encoder's initial weights do not depend on it
            progress_base = _build_base(model, input_shape)
    return AlignmentModel(encoder, head, head_input=head_input, progress_base=progress_base)


def _build_base(model: ModelConfig, input_shape: Sequence[int]) -> BaseEncoder:
    """The base encoder of `model` (frames of shape `input_shape`), freshly initialised."""
    if model.encoder == "resnet50":
        base = build_encoder("resnet50", in_channels=input_shape[0],
                             temporal_depth=model.temporal_depth, out_dim=model.output_dim,
                             reference_window=model.reference_window)
    elif model.encoder == "naive":
        base = build_encoder("naive", in_dim=input_shape[0], layers=tuple(model.naive_layers),
                             out_dim=model.output_dim)
    else:
        base = build_encoder("stacking", in_dim=input_shape[0], channels=model.conv_channels,
                             out_dim=model.output_dim, temporal_depth=model.temporal_depth,
                             num_layers=model.stacking_layers)
    return base
