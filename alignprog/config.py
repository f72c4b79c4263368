"""Every setting of alignprog as pydantic v2 models, and the one way to load them.

Order of precedence: model defaults, then a config file (YAML or JSON), then
dotted overrides (CLI flags and ``--set key=value``), then one validation of the result.
Unknown keys are errors that name the key and suggest the closest valid one. No torch here.

Validation also settles what spans sections or has two names: the encoder fixes the data layout
(`ENCODER_LAYOUT`), and the pipeline description's names (``temporal_stacking``, ``use_gru``)
are read as the one name the rest of the code knows. Loading stays light (PyYAML and numpy are
imported on use): `alignprog --help` reads the models' fields for its choices and defaults.
One module on purpose (it is longer than most): the whole settings tree reads top to bottom in
one place, and it is the file `--help` sends users to.
"""

from __future__ import annotations

import copy
import difflib
import functools
import math
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping, Sequence, get_args, get_origin

from pydantic import (BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator,
                      model_validator)

from alignprog.errors import ConfigError

# The background set used by every component (docs/data.md#action-vocabulary-and-background):
# the reference tests only 'SIL' (docs/reference-bugs.md#background-label-mismatch).
DEFAULT_BACKGROUND = ("0", "SIL", "background")

# Native fps of the EgoProceL sources (docs/data.md#tasks-and-sources); the fork extracted
# features at 1 fps.
# Patterns are matched against task names with fnmatch, first match wins.
EGOPROCEL_SOURCE_FPS: dict[str, float] = {
    "*.egtea": 24.0,
    "*.cmu": 30.0,
    "tent": 60.0,
    "meccano": 12.0,
    "pc_*": 12.0,
}


# Which data layout each base encoder reads: features/<handle>.npy (T, D) or frames/<handle>.npy
# (T, C, H, W). `Config` refuses a data.layout the encoder cannot read.
ENCODER_LAYOUT = {"stacking": "features", "naive": "features", "resnet50": "frames"}
LAYOUT_ENCODER = {"features": "stacking", "frames": "resnet50"}   # the default reader of each

# Names of the user's pipeline description that config files may use; validation turns each into the
# one name the code knows.
ENCODER_ALIASES = {"temporal_stacking": "stacking"}

_BOOL = TypeAdapter(bool)


# Largest width / hidden size / feature dimension accepted: anything larger fails here with a
# message instead of as an allocation traceback later.
MAX_WIDTH = 65536
Width = Annotated[int, Field(ge=1, le=MAX_WIDTH)]


def _bool_for_number(annotation: Any, value: Any) -> bool:
    """Whether `value` holds a bool where `annotation` wants an int or float (YAML `true` would
    otherwise become 1)."""
    if isinstance(value, bool):
        args = get_args(annotation) if get_origin(annotation) is not None else (annotation,)
        flat = set()
        for arg in args:
            flat |= set(get_args(arg)) if get_origin(arg) is Annotated else {arg}
        return bool(flat & {int, float}) and bool not in flat
    origin = get_origin(annotation)
    if origin is Annotated:
        return _bool_for_number(get_args(annotation)[0], value)
    if origin is list and isinstance(value, list):
        (item,) = get_args(annotation) or (Any,)
        return any(_bool_for_number(item, v) for v in value)
    if origin is dict and isinstance(value, dict):
        _, item = get_args(annotation) or (Any, Any)
        return any(_bool_for_number(item, v) for v in value.values())
    if origin is not None and not isinstance(value, (list, dict)):
        return False
    if origin is not None:  # Optional[list[int]] and the like
        return any(_bool_for_number(arg, value) for arg in get_args(annotation))
    return False


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False,
                              defer_build=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_numbers(cls, value: Any, info: Any) -> Any:
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        if field is not None and _bool_for_number(field.annotation, value):
            raise ValueError("expected a number, not a boolean")
        return value


class SplitConfig(StrictModel):
    """How videos are divided into train / val / test (docs/data.md#splits)."""

    mode: Literal["random", "ordered"] = Field(
        "random",
        description="random: per task, shuffle the handles with `seed` and cut by the fractions "
        "(the reference fork's data_splits.json procedure); ordered: the original code's "
        "split, the first round(train*n) handles of each task in JSON order are train and the "
        "rest test.",
    )
    train: float = Field(0.75, gt=0, le=1,
                         description="Fraction of each task's videos used for training.")
    val: float = Field(0.10, ge=0, le=1,
                       description="Fraction of each task's videos used for validation.")
    test: float = Field(0.15, ge=0, le=1,
                        description="Fraction of each task's videos used for testing.")
    seed: int = Field(42, description="Seed of the per-task shuffle (random mode).")
    file: Path | None = Field(
        None,
        description="Explicit split file (the reference fork's data_splits.json format). "
        "Overrides the fractions. When unset, `<root>/splits.json` is used if present.",
    )

    @model_validator(mode="after")
    def _fractions(self) -> "SplitConfig":
        total = self.train + self.val + self.test
        if not math.isclose(total, 1.0, abs_tol=1e-6):
            raise ValueError(f"data.split fractions must sum to 1, got train+val+test = {total:g}")
        return self


class FpsConfig(StrictModel):
    """What the numbers in the annotation JSON mean (docs/data.md#frame-units-and-fps-presets).

    By default annotation frames are feature frames (identity). With a source-fps table, a bound
    ``t`` becomes ``floor(t * feature / source_fps(task))``; with ``unit: seconds`` it becomes
    ``floor(t * feature)``. The fork divided by the native fps whatever the feature rate
    (docs/reference-bugs.md#fps-mapping-ignores-feature-rate).
    """

    preset: Literal["none", "egoprocel"] = Field(
        "none",
        description="none: annotation frames are feature frames unless `source` says otherwise; "
        "egoprocel: the EgoProceL sources' native fps (EGTEA 24, CMU 30, tent 60, MECCANO 12, "
        "PC 12) mapped to `feature` fps.",
    )
    source: dict[str, Annotated[float, Field(gt=0)]] = Field(
        default_factory=dict,
        description="Task name or fnmatch pattern -> fps of the annotation frame numbers of that "
        "task. Checked before the preset's entries; every task must match one when the table is "
        "not empty.",
    )
    feature: float = Field(1.0, description="Frame rate of the feature files (frames per second).")
    unit: Literal["frames", "seconds"] = Field(
        "frames", description="Unit of the annotation bounds: source frames or seconds."
    )
    tolerance_s: float = Field(
        2.0, ge=0,
        description="Warn when the annotated length and the feature length differ by more than "
        "this many seconds of video.",
    )

    @field_validator("feature")
    @classmethod
    def _positive_feature(cls, value: float) -> float:
        if not value > 0:
            raise ValueError(f"data.fps.feature must be > 0, got {value}")
        return value

    def table(self) -> list[tuple[str, float]]:
        """The source-fps patterns in match order: user entries, then the preset's."""
        entries = list(self.source.items())
        if self.preset == "egoprocel":
            entries += list(EGOPROCEL_SOURCE_FPS.items())
        return entries

    @property
    def tolerance_frames(self) -> int:
        return int(math.ceil(self.tolerance_s * self.feature))


class SyntheticConfig(StrictModel):
    """The embedded procedural dataset used when no dataset is named."""

    tasks: int = Field(4, ge=1, le=64, description="Number of tasks (procedures).")
    videos_per_task: int = Field(20, ge=1, le=10_000, description="Videos generated per task.")
    dim: int = Field(2048, ge=1, le=MAX_WIDTH,
                     description="Feature dimension of the `features` layout.")
    frame_channels: int = Field(1024, ge=1, le=MAX_WIDTH,
                                description="Channels of the `frames` layout.")
    frame_size: int = Field(14, ge=1, le=1024,
                            description="Spatial size of the `frames` layout maps.")
    seed: int = Field(0, description="Seed of the generator; the same seed gives the same data.")
    timelines: Literal["generated", "egoprocel"] = Field(
        "generated", description="generated: drawn procedures (the quick demo); egoprocel: the "
        "real EgoProceL timelines at 1 fps with features in which progress is hard to see "
        "(docs/data.md#egoprocel-timeline-data; tasks and videos_per_task do not apply).")
    cmu: bool = Field(False, description="egoprocel timelines: also the CMU tasks (their "
                      "annotation lists are paired with the videos by position).")


class DataConfig(StrictModel):
    """Where the videos come from and how they become batches (docs/data.md)."""

    root: Path | None = Field(
        None,
        description="Dataset root holding dataset.json, features/ and/or frames/. "
        "Unset: the embedded synthetic dataset.",
    )
    annotations: Path | None = Field(
        None, description="Annotation JSON to use instead of <root>/dataset.json."
    )
    id2action: Path | None = Field(
        None,
        description="Action vocabulary file (`<id> <name>` per line). Unset: "
        "<annotations stem>-id2action.txt beside the JSON, else <root>/id2action.txt, else none "
        "(any label accepted).",
    )
    layout: Literal["features", "frames"] = Field(
        "features",
        description="Which arrays the encoder reads: features/<handle>.npy (T, D) or "
        "frames/<handle>.npy (T, C, H, W).",
    )
    tasks: list[str] | None = Field(
        None, description="Task names or fnmatch patterns to keep (e.g. ['*.egtea']). Unset: all."
    )
    background_labels: list[str] = Field(
        default_factory=lambda: list(DEFAULT_BACKGROUND),
        description="Labels treated as background everywhere (sampler, metrics, statistics).",
    )
    strict: bool = Field(
        True,
        description="Unequal numbers of handles and annotation lists in a task are an error. "
        "False pairs them by position with a warning (the EgoProceL CMU tasks need this).",
    )
    fps: FpsConfig = Field(default_factory=FpsConfig, description="Annotation frame units.")
    split: SplitConfig = Field(default_factory=SplitConfig, description="Train/val/test split.")
    batch_size: int = Field(2, ge=1, description="Videos per batch; a batch holds one task only.")
    max_frames: int = Field(
        100_000, ge=1, description="Longest video accepted, in feature frames (checked from the "
        "array headers before any data is read; LAV and VAVA need memory quadratic in T).")
    max_repaired_share: float = Field(
        0.5, ge=0, le=1, description="Largest share of videos whose annotation loses segments "
        "past the end of their features or ends far from it; more is refused as a sign of "
        "annotations in other frame units (see data.fps). 1: accept any.")
    multi_task: bool = Field(
        True,
        description="True: one loader over all tasks, batches shuffled across tasks. "
        "False: single-task mode, one task at a time.",
    )
    synthetic: SyntheticConfig = Field(
        default_factory=SyntheticConfig, description="The synthetic default dataset."
    )

    @field_validator("background_labels")
    @classmethod
    def _some_background(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("data.background_labels must name at least one label")
        return value


class ModelConfig(StrictModel):
    """The encoder: base model, multi-head attention fusion (MCN), embedding width.

    See docs/algorithms.md#encoder and the defaults table (docs/algorithms.md#defaults), except
    the default base encoder: `stacking` (fast on a CPU) instead of the pipeline description's
    `resnet50`.
    """

    encoder: Literal["stacking", "resnet50", "naive"] = Field(
        "stacking",
        description="Base encoder: stacking (1-D temporal convs over features/ (T, 2048)), "
        "resnet50 (3-D convs over frames/ (T, 1024, 14, 14) layer3 maps, the pipeline "
        "description's), naive (per-frame MLP over features/). A config file may also say "
        "temporal_stacking, the pipeline description's name: it is read as stacking.",
    )
    mcn: bool = Field(True, description="Multi-head attention fusion (MCN) over the base output; "
                      "False: the base encoder's output is the embedding.")
    num_heads: int | None = Field(
        None, ge=1, le=1024,
        description="MCN heads. Unset: one per task of the dataset (16 on EgoProceL).")
    output_dim: int = Field(128, ge=2, le=MAX_WIDTH,
                            description="Width D of the aligned embeddings.")
    temporal_depth: int = Field(2, ge=1, le=64, description="Temporal window k of resnet50 and the "
                                "first stacking conv.")
    conv_channels: int = Field(256, ge=2, le=MAX_WIDTH,
                               description="stacking: channels of the first conv.")
    stacking_layers: int = Field(7, ge=2, le=256, description="stacking: number of convs in total.")
    naive_layers: list[Width] = Field(default_factory=lambda: [1024, 512, 512, 256],
                                    description="naive: hidden widths of the per-frame MLP.")
    head_layers: list[Width] = Field(default_factory=lambda: [512, 128, 256],
                                   description="MCN: hidden widths of each head's MLP.")
    attn_layers: list[Width] = Field(default_factory=lambda: [512, 1024, 512, 512],
                                   description="MCN: hidden widths of the attention network.")
    drop_layers: list[Width] = Field(default_factory=lambda: [256, 1024, 512, 256],
                                   description="Hidden widths of the GTCC drop branch.")
    dropping: bool | None = Field(None, description="Build the drop branch. Unset: only for "
                                  "GTCC, the one loss that uses it.")
    reference_window: bool = Field(
        False, description="resnet50: reproduce the reference's temporal window r-k..r-1, which "
        "never reads frame r, instead of r-k+1..r. Only for reproducing published numbers.")

    @field_validator("encoder", mode="before")
    @classmethod
    def _encoder_alias(cls, value: Any) -> Any:
        return ENCODER_ALIASES.get(value, value) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _stacking_widths(self) -> "ModelConfig":
        if self.encoder == "stacking":
            c, d = self.conv_channels, self.output_dim
            ok = c > d
            while ok and c > d and c % 2 == 0:
                c //= 2
            if not ok or c != d:
                raise ValueError(f"model.conv_channels must be model.output_dim times a power of "
                                 f"two (2, 4, ...) for the {self.encoder} encoder, got "
                                 f"conv_channels={self.conv_channels}, "
                                 f"output_dim={self.output_dim}")
        return self


# progress.learnable.input=auto: what the head reads per method. separate for every method: on
# the EgoProceL-timeline data its head was as good as or better than one on the shared encoder,
# and the alignment is that of alignment-only training
# (docs/algorithms.md#head-input-and-gradient-flow). Training saves the resolved value, never
# auto (`Config.resolved`), so a change here leaves runs and exports already written alone.
HEAD_INPUT = {"tcc": "separate", "gtcc": "separate", "lav": "separate", "vava": "separate"}

# What "auto" meant in configs saved before training resolved it: read so in saved configs.
SAVED_AUTO_INPUT = {"tcc": "features", "gtcc": "features", "lav": "embeddings",
                    "vava": "embeddings"}

# Settings whose default changed. A saved config (a run's config.yaml, a checkpoint's or an
# export's) that lacks one was written before the setting existed and ran with this value.
SAVED_DEFAULTS = {"progress.balance": "fixed", "progress.learnable.input": "embeddings"}


def _node(data: Any, sections: list[str]) -> Any:
    for section in sections:
        data = data.get(section) if isinstance(data, dict) else None
    return data


def saved_config_fixes(data: Any) -> dict[str, Any]:
    """What a saved config's dict `data` ran with where it does not say so itself: the
    `SAVED_DEFAULTS` it lacks (a key counts as lacking where its section is there without
    it), with their old values, and for a head input of "auto" the value it meant then
    (`SAVED_AUTO_INPUT` for `train.method`)."""
    fixes = {}
    for key, old in SAVED_DEFAULTS.items():
        *sections, name = key.split(".")
        node = _node(data, sections)
        if isinstance(node, dict) and name not in node:
            fixes[key] = old
    learnable = _node(data, ["progress", "learnable"])
    if isinstance(learnable, dict) and learnable.get("input") == "auto":
        method = _node(data, ["train", "method"])
        fixes["progress.learnable.input"] = SAVED_AUTO_INPUT.get(method, "embeddings") \
            if isinstance(method, str) else "embeddings"
    return fixes


def with_saved_config_fixes(data: Any) -> Any:
    """A saved config's dict with `saved_config_fixes` applied; `data` itself is not
    changed."""
    missing = saved_config_fixes(data)
    if not missing:
        return data
    data = copy.deepcopy(data)
    for key, old in missing.items():
        *sections, name = key.split(".")
        node = data
        for section in sections:
            node = node[section]
        node[name] = old
    return data


class LearnableProgressConfig(StrictModel):
    """The learnable progress head and how it is taught.

    The pipeline description's `learnable` block.
    """

    arch: Literal["gru", "mean", "transformer", "dilated_conv"] = Field(
        "gru", description="Head architecture: gru (the pipeline description's), mean (mean "
        "pooling), transformer (causal, ALiBi), dilated_conv (causal dilated convolutions). A "
        "config file may also hold the pipeline description's switch use_gru: false is read "
        "as arch mean (an arch other than gru or mean beside it is an error), true changes "
        "nothing; the loaded config keeps arch alone.")
    input: Literal["auto", "embeddings", "features", "separate"] = Field(
        "auto", description="What the head reads, per frame: embeddings, the aligned "
        "embeddings (the pipeline description's); features, the base encoder's output before "
        "the attention fusion (the same width; with model.mcn=false the two are one), so the "
        "fusion answers to the alignment loss alone; separate, a base encoder of the head's "
        "own (the same architecture, its own weights, trained by the progress loss alone), so "
        "the whole alignment encoder answers to the alignment loss alone and lambda and the "
        "balance change nothing; auto, the measured choice per method, now separate for "
        "every method (docs/algorithms.md#head-input-and-gradient-flow). Training saves the "
        "value auto stood for.")
    hidden_dim: int = Field(64, ge=1, le=MAX_WIDTH, description="Width of the head: GRU hidden "
                            "size, first MLP width of mean, d_model of transformer, channels of "
                            "dilated_conv.")
    position: Literal["relative", "count", "none"] = Field(
        "relative", description="Per-frame position feature: relative = tau/T (the pipeline "
        "description's; online use re-runs each prefix), count = "
        "log(2+tau)/log(1+frame_count_max) (causal: gru/transformer/dilated_conv step in O(1) "
        "per frame), none.")
    learnable_h0: bool = Field(True, description="GRU: learnable initial hidden state (zeros "
                               "init).")
    frame_count_max: int = Field(300, ge=1, description="Normaliser of the count position feature.")
    min_segment_len: int = Field(3, ge=1, description="Minimum frames of a sampled segment.")
    samples_per_video: int = Field(10, ge=1, description="Actions sampled per video per step.")
    frames_per_segment: int = Field(5, ge=1, description="Target frames per sampled action.")
    stratified_sampling: bool = Field(True, description="Cover the early/mid/late progress bins.")
    weighted_loss: bool = Field(True, description="Weight each sample by min(1/gt, weight_cap) "
                                "and take the weighted mean (the pipeline description's loss); "
                                "false: plain mean.")
    loss: Literal["l1", "mse"] = Field("l1", description="Per-sample error: l1 |pred - gt| (the "
                                       "pipeline description's) or mse (pred - gt)^2.")
    weight_cap: float = Field(10.0, ge=1, description="Largest weight of the weighted loss.")

    def input_for(self, method: str | None) -> str:
        """What the head reads for `method`: `input`, or under auto the per-method choice
        (the pipeline description's embeddings when no method is given)."""
        if self.input != "auto":
            return self.input
        return HEAD_INPUT.get(method or "", "embeddings")

    @model_validator(mode="before")
    @classmethod
    def _gru_switch(cls, data: Any) -> Any:
        """Turn the pipeline description's `use_gru` into `arch`, so that nothing else reads it."""
        if not isinstance(data, dict) or "use_gru" not in data:
            return data
        data = dict(data)
        try:
            use_gru = _BOOL.validate_python(data.pop("use_gru"))
        except ValidationError:
            raise ValueError("progress.learnable.use_gru must be true or false") from None
        if not use_gru:
            arch = data.get("arch", "gru")
            if arch not in ("gru", "mean"):
                raise ValueError(f"progress.learnable.use_gru=false means arch 'mean', but arch "
                                 f"is '{arch}'")
            data["arch"] = "mean"
        return data


# balance=fixed: lambda per alignment method, total = alignment + lambda * progress. Chosen so
# that the progress term's gradient on the encoder is about as large as the alignment's, or
# larger, at initialisation on the synthetic data (default model, fixed-mode losses, reference
# reduction), where |grad alignment| / |grad progress| is TCC 237, GTCC 6.4e5, LAV 3.8e5, VAVA
# 1.9e7.
# The pipeline description's table (GTCC 1e5-1e6, LAV 1e6, VAVA 1e4-1e5, TCC 1e4-1e5) assumes
# the reference losses, whose VAVA is far smaller: its transport cost is a constant
# (docs/reference-bugs.md#vava-transport-cost-constant).
DEFAULT_LAMBDA = {"tcc": 1e3, "gtcc": 1e6, "lav": 1e6, "vava": 1e7}

# balance=gradient: the progress gradient's norm on the embeddings over the alignment's
# (measured: docs/algorithms.md#balancing-the-objectives).
BALANCE_RATIO = 2.0


class ProgressConfig(StrictModel):
    """Progress learning.

    The pipeline description's PROGRESS_LOSS block; defaults as its training command.
    """

    enabled: bool = Field(True, description="Train a progress predictor with the encoder.")
    method: Literal["learnable", "cumulative_l2"] = Field(
        "learnable", description="learnable: the progress head; cumulative_l2: cumulative "
        "embedding distance, normalised per action (no head).")
    balance: Literal["gradient", "fixed"] = Field(
        "gradient", description="How the two objectives share the encoder. gradient: every "
        "step weighs them by their gradients on the embeddings, the progress gradient "
        "balance_ratio times as long as the alignment's, whatever the alignment loss's scale "
        "(docs/algorithms.md#balancing-the-objectives); fixed: total = alignment + lambda * "
        "progress with lambda_fixed or the per-method default (the pipeline description's "
        "recipe). Setting lambda_fixed alone chooses fixed.")
    balance_ratio: float = Field(
        BALANCE_RATIO, gt=0, le=1e6, description="balance=gradient: the norm of the progress "
        "gradient on the embeddings over the alignment gradient's.")
    lambda_fixed: float | None = Field(
        None, ge=0, description="balance=fixed: the weight of the progress loss in total = "
        "alignment + lambda * progress. Unset: the per-method default, tcc 1e3, gtcc 1e6, "
        "lav 1e6, vava 1e7.")
    cumulative_normaliser: Literal["self", "class"] = Field(
        "class", description="cumulative_l2: divide the cumulative distance within an action by "
        "the mean path length of its action class (causal; the same normaliser in training and "
        "evaluation) or by the action's own total (the reference's, non-causal).")
    learnable: LearnableProgressConfig = Field(
        default_factory=LearnableProgressConfig, description="The learnable head.")

    @model_validator(mode="before")
    @classmethod
    def _lambda_means_fixed(cls, data: Any) -> Any:
        """A lambda_fixed given without a balance chooses balance=fixed; with balance=gradient
        it would be ignored, so that is an error."""
        if not isinstance(data, dict) or data.get("lambda_fixed") is None:
            return data
        if "balance" not in data:
            return dict(data, balance="fixed")
        if data["balance"] == "gradient":
            raise ValueError("progress.lambda_fixed (--lambda) applies to progress.balance="
                             "fixed; balance=gradient sets lambda itself every step: add "
                             "--balance fixed, or drop the lambda (progress.lambda_fixed=null)")
        return data

    def lambda_for(self, method: str) -> float:
        """The fixed lambda of balance=fixed (the per-method default unless lambda_fixed)."""
        return self.lambda_fixed if self.lambda_fixed is not None else DEFAULT_LAMBDA[method]


class TCCLossConfig(StrictModel):
    softmax_temp: float = Field(0.1, gt=0, description="Softmax temperature tau.")
    alignment_variance: float = Field(0.001, ge=0, description="Weight of the log-variance term.")


class GTCCLossConfig(StrictModel):
    n_components: int = Field(15, ge=1, description="GMM components K (EgoProceL: 15).")
    delta: float = Field(0.2, ge=0.05, le=1.0, description="Cycle-back window width, a fraction "
                         "of the video.")
    gamma: float = Field(0.95, gt=0, le=1.0, description="Drop-floor decay; < 1 turns the drop "
                         "term on.")
    softmax_temp: float = Field(0.1, gt=0, description="Softmax temperature tau.")
    max_gmm_iters: int = Field(8, ge=1, description="Outer L-BFGS steps of each GMM fit.")
    alignment_variance: float = Field(0.0, ge=0, description="Weight of the log-variance term.")


class LAVLossConfig(StrictModel):
    min_temp: float = Field(0.1, gt=0, description="Soft-DTW smoothing gamma.")
    cr_coefficient: float = Field(0.01, ge=0, description="Weight of the intra-video regulariser.")


class VAVALossConfig(StrictModel):
    max_iter: int = Field(20, ge=1, description="Sinkhorn iterations.")
    lambda1: float = Field(1.0, description="Weight of the inverse-difference-moment reward.")
    lambda2: float = Field(0.1, description="Weight of the KL to the prior.")
    gamma: float = Field(0.5, ge=0, description="Weight of the contrastive part.")
    zeta: float = Field(0.5, ge=0, description="Cost of the virtual (drop) row and column.")
    delta: float = Field(0.6, ge=1e-3, description="Width of the Gaussian priors.")


class LossConfig(StrictModel):
    """Alignment-loss settings (docs/algorithms.md#alignment-losses and #defaults)."""

    compat: Literal["fixed", "reference"] = Field(
        "fixed", description="fixed: every known bug of the reference code corrected; "
        "reference: reproduce the reference's numbers, bugs included.")
    reduction: Literal["reference", "mean"] = Field(
        "reference", description="reference: the reference's unnormalised sums (the lambda "
        "defaults assume it); mean: per pair and frame.")
    tcc: TCCLossConfig = Field(default_factory=TCCLossConfig, description="TCC settings.")
    gtcc: GTCCLossConfig = Field(default_factory=GTCCLossConfig, description="GTCC settings.")
    lav: LAVLossConfig = Field(default_factory=LAVLossConfig, description="LAV settings.")
    vava: VAVALossConfig = Field(default_factory=VAVALossConfig, description="VAVA settings.")


class TrainConfig(StrictModel):
    """The training run (docs/algorithms.md#training-step and #defaults)."""

    method: Literal["tcc", "gtcc", "lav", "vava"] = Field("lav", description="Alignment method.")
    epochs: int = Field(20, ge=1, description="Epochs over the training split (the "
                        "pipeline description trains 50 on EgoProceL; 20 take about 3.5 "
                        "minutes on the synthetic default on 2 CPU cores).")
    steps: int | None = Field(None, ge=1, description="Total optimizer steps; overrides epochs.")
    lr: float = Field(3e-4, gt=0, description="Adam learning rate of the encoder (the "
                      "pipeline description's is 1e-4; see the README for the "
                      "measurements behind 3e-4).")
    head_lr: float | None = Field(3e-3, gt=0, description="Adam learning rate of the progress "
                                  "head. Unset: lr.")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="How every learning rate moves over a stage's optimizer steps "
        "after the warm-up: constant, or cosine (down to min_lr_ratio times it at the last "
        "step). CUDA graphs read the scheduled rates from device tensors.")
    warmup_steps: int = Field(0, ge=0, description="Optimizer steps over which every learning "
                              "rate grows linearly to its value (step k of the warm-up runs at "
                              "k / warmup_steps of it); 0: none.")
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine: the last step's learning "
                                "rate as a fraction of the configured one.")
    accumulate: int = Field(1, ge=1, description="Batches whose gradients are averaged into one "
                            "optimizer step (gradient accumulation: the memory of one batch, "
                            "the step of accumulate batches). Steps, epochs, warm-up and "
                            "log_every count optimizer steps.")
    clip_mode: Literal["global", "separate", "none"] = Field(
        "separate", description="global: one clip over all parameters at encoder_clip (the "
        "pipeline description's); separate: encoder at encoder_clip, head at head_clip (see "
        "the README for why this is the default); none.")
    encoder_clip: float = Field(1.0, gt=0, description="Max gradient norm of the encoder (and "
                                "of everything in global mode). The pipeline description's 1e-5 "
                                "leaves the head almost no gradient.")
    head_clip: float = Field(1.0, gt=0, description="Max gradient norm of the progress head "
                             "(separate mode).")
    seed: int = Field(0, description="Seed of weights, batch order and progress sampling.")
    device: str = Field("auto", description="auto (CUDA if available), cpu, cuda or cuda:N.")
    precision: Literal["fp32", "bf16"] = Field("fp32", description="bf16: autocast for the "
                                                "model; losses stay in fp32.")
    deterministic: bool = Field(True, description="Deterministic kernels: the same seed and "
                                "config give the same numbers on the same device.")
    log_every: int = Field(10, ge=1, description="Log metrics every N steps (on a GPU the "
                           "only steps that wait for it: the others run ahead).")
    csv_metrics: bool = Field(False, description="Also write the run's step and epoch "
                              "records as metrics_step.csv and metrics_epoch.csv (one row per "
                              "logged step or epoch, nested values as dotted columns).")
    tensorboard: bool = Field(False, description="Also write the run's step and epoch "
                              "records as TensorBoard events under RUN_DIR/tensorboard/ (needs "
                              "the tensorboard package: pip install 'alignprog[tensorboard]').")
    cuda_graphs: Literal["auto", "on", "off"] = Field(
        "auto", description="Replay the whole training step as a CUDA graph, one per shape "
        "bucket (frames rounded up to graph_frame_bucket): removes the per-kernel launch cost "
        "that dominates small models. auto: on for a single CUDA process with a launch-bound "
        "configuration (stacking or naive encoder; tcc, lav or vava; learnable or no progress), "
        "capturing a shape the second time it comes and at most max_graphs of them (other "
        "shapes run eagerly); with the compute-bound resnet50 encoder the step stays eager and "
        "auto captures VAVA's loss alone (forward and backward, per videos and frame bucket); "
        "on: wherever supported (the reason is printed where not), every shape at once; off: "
        "never.")
    graph_frame_bucket: int = Field(64, ge=1, description="CUDA graphs: a batch's frames are "
                                    "padded up to a multiple of this (fewer graphs, some "
                                    "padding work).")
    max_graphs: int = Field(16, ge=1, description="CUDA graphs kept at once (each holds the "
                            "memory of one step). cuda_graphs=on: the least recently used "
                            "goes first; auto: further shapes run eagerly.")
    max_bad_steps: int = Field(20, ge=1, description="Stop after this many consecutive steps "
                               "with a non-finite loss or gradient (each leaves the weights and "
                               "Adam untouched, is counted in skipped_total and still counts as "
                               "a step; checked at least every max_bad_steps steps).")
    two_stage: bool = Field(False, description="Train alignment first (epochs), then the "
                            "progress head alone on the frozen encoder (head_epochs).")
    head_epochs: int = Field(10, ge=1, description="Epochs of the second stage.")
    checkpoint_every: int | None = Field(None, ge=1, description="Also save a checkpoint every "
                                         "this many steps (unset: at epoch ends only).")
    memory_check: bool = Field(True, description="Before starting, estimate the memory of the "
                               "largest training batch and refuse a run that cannot fit.")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes.")
    runs_dir: Path = Field(Path("runs"), description="Folder of the run directories.")
    name: str | None = Field(None, description="Run name. Unset: <method>-<timestamp>.")

    @field_validator("cuda_graphs", mode="before")
    @classmethod
    def _yaml_switch(cls, value: Any) -> Any:
        # YAML reads a bare on/off as true/false (`--set train.cuda_graphs=off`).
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class Config(StrictModel):
    """The whole configuration."""

    data: DataConfig = Field(default_factory=DataConfig, description="Dataset and batching.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The encoder.")
    progress: ProgressConfig = Field(default_factory=ProgressConfig,
                                     description="Progress learning.")
    loss: LossConfig = Field(default_factory=LossConfig, description="Alignment losses.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="The training run.")

    def resolved(self) -> "Config":
        """This config with the per-method choices written out (progress.learnable.input
        auto: its value for train.method), as training saves it: a saved config then says
        what ran, whatever `HEAD_INPUT` later says."""
        lc = self.progress.learnable
        if lc.input != "auto":
            return self
        cfg = self.model_copy(deep=True)
        cfg.progress.learnable.input = lc.input_for(self.train.method)
        return cfg

    @model_validator(mode="after")
    def _encoder_reads_layout(self) -> "Config":
        """The encoder reads one data layout. A data.layout chosen without an encoder picks the
        encoder that reads it (frames: resnet50), so `data check --set data.layout=frames`
        works; an encoder chosen at odds with the layout is an error."""
        wanted = ENCODER_LAYOUT[self.model.encoder]
        if wanted == self.data.layout:
            return self
        if ("layout" in self.data.model_fields_set
                and "encoder" not in self.model.model_fields_set):
            self.model.encoder = LAYOUT_ENCODER[self.data.layout]
            return self
        raise ValueError(f"model.encoder '{self.model.encoder}' reads the '{wanted}' layout "
                         f"but data.layout is '{self.data.layout}'")


# ----------------------------------------------------------------------------------------------
# Loading


# Limits of what a config file or override may hold (YAML alias bombs, deep nesting).
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_ALIASES = 16
MAX_YAML_DEPTH = 32


class _YamlLimit(Exception):
    pass


@functools.cache
def _bounded_loader() -> type:
    """The loader class, built on first use: PyYAML is not imported to show `--help`."""
    import yaml

    class BoundedLoader(yaml.SafeLoader):
        """SafeLoader that refuses more than MAX_YAML_ALIASES aliases and deeper than
        MAX_YAML_DEPTH nesting, so that a small alias bomb (billion laughs) fails at once
        instead of expanding."""

        def __init__(self, stream: Any) -> None:
            super().__init__(stream)
            self._aliases = 0
            self._depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                self._aliases += 1
                if self._aliases > MAX_YAML_ALIASES:
                    raise _YamlLimit(f"more than {MAX_YAML_ALIASES} YAML aliases (*name)")
            self._depth += 1
            try:
                if self._depth > MAX_YAML_DEPTH:
                    raise _YamlLimit(f"nested deeper than {MAX_YAML_DEPTH} levels")
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

    return BoundedLoader


def _safe_yaml(text: str) -> Any:
    """yaml.safe_load with the limits above; raises ValueError with a one-line reason."""
    import yaml

    if len(text) > MAX_CONFIG_BYTES:
        raise ValueError(f"larger than {MAX_CONFIG_BYTES} bytes")
    loader = _bounded_loader()(text)
    try:
        return loader.get_single_data()
    except _YamlLimit as exc:
        raise ValueError(str(exc)) from None
    except yaml.YAMLError as exc:
        raise ValueError(f"not valid YAML/JSON ({exc})".replace("\n", " ")) from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
    finally:
        loader.dispose()


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`["data.split.seed=3", "data.tasks=[a, b]"]` -> dotted dict; values are read as YAML."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"override '{item}' must look like key=value, e.g. data.split.seed=3")
        try:
            out[key] = _safe_yaml(raw) if raw.strip() else None
        except ValueError as exc:
            raise ConfigError(f"override '{key}': value is {exc}".replace(
                "is not valid YAML/JSON", "is not valid YAML")) from None
    return out


def read_config_file(path: Path) -> dict[str, Any]:
    path = Path(path)
    try:
        if path.is_file() and path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: config file larger than {MAX_CONFIG_BYTES} bytes")
        from alignprog.fileio import read_user_text   # a FIFO or folder: OSError, no hang
        text = read_user_text(path)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: cannot read config file (not UTF-8 text)") from None
    try:
        data = _safe_yaml(text)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping, got {type(data).__name__}")
    return data


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = {}
            node[part] = child
        elif not isinstance(child, dict):
            section = ".".join(parts[:i + 1])
            raise ConfigError(f"'{key}': '{section}' is set to the single value {child!r}, not a "
                              "section of settings")
        node = child
    node[parts[-1]] = value


def load_config(
    file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
    model: type[StrictModel] = Config,
) -> Any:
    """Defaults, then `file`, then dotted `overrides`, then validation. Raises ConfigError."""
    tree: dict[str, Any] = read_config_file(file) if file is not None else {}
    for key, value in (overrides or {}).items():
        _set_dotted(tree, key, value)
    try:
        return model.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, model, source=file)) from None


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        keys.append(dotted)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += _known_keys(ann, dotted + ".")
    return keys


def _flatten(value: Any, prefix: str = "") -> list[str]:
    """Dotted leaf keys of a nested mapping ([] for a non-mapping)."""
    if not isinstance(value, dict):
        return []
    out = []
    for key, sub in value.items():
        out += _flatten(sub, f"{prefix}{key}.") or [f"{prefix}{key}"]
    return out


def format_validation_error(exc: ValidationError, model: type[BaseModel], source: Path | None
                            ) -> str:
    known = _known_keys(model)
    lines = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            # Name the whole key the user typed (data.splt.seed, not data.splt) and suggest the
            # closest valid key of the same depth.
            typed = [f"{loc}.{sub}" for sub in _flatten(err.get("input"))] or [loc]
            for key in typed:
                hint = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
                msg = f"unknown setting '{key}'"
                if hint:
                    msg += f" (did you mean '{hint[0]}'?)"
                lines.append(msg)
        else:
            text = err["msg"].removeprefix("Value error, ")
            got = err.get("input")
            if text.startswith(loc.split(".")[0] + ".") or not loc:
                lines.append(text)
            else:
                lines.append(f"{loc}: {text}" + (f", got {got!r}" if not isinstance(got, dict)
                                                  else ""))
    where = f"{source}: " if source is not None else ""
    return where + "; ".join(lines)


def dump_config(cfg: BaseModel) -> str:
    import yaml

    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def save_config(cfg: BaseModel, path: Path) -> None:
    from alignprog.fileio import atomic_write_text  # numpy: not needed to read a config

    atomic_write_text(path, dump_config(cfg))
