"""Safetensors export of a trained model and the matching loader.

An export is a directory of three files (the convention of model hubs)::

    <out>/model.safetensors   the weights: AlignmentModel.state_dict() names, so every tensor sits
                              under one of three stable prefixes
                                encoder.*        the base encoder (encoder.base.*), the MCN heads
                                                 and attention (encoder.heads.*,
                                                 encoder.attention.*), the GTCC drop branch
                                progress_head.*  the learnable progress head (absent when the run
                                                 trained none)
                                progress_base.*  the head's own base encoder (only with
                                                 progress.learnable.input=separate)
                              metadata (string -> string, readable with plain `safe_open`):
                                format          "alignprog-export"
                                format_version  "1"
                                config          the model config as JSON (below)
                                dtype           "fp32" | "bf16" | "fp16" (floating tensors)
    <out>/config.json         the same config, indented
    <out>/README.md           a model card: method, data, training steps, test-split errors,
                              under a Hugging Face Hub YAML front-matter block (`card_metadata`)

The config holds everything `build_model` needs, so the file alone rebuilds the model:
``{"method", "layout", "input_shape", "num_tasks", "background_labels", "model": <ModelConfig>,
"progress": <ProgressConfig>, "dtype", "alignprog_version", "source": {run, checkpoint, step}}``.

Nothing is ever unpickled: the checkpoint is read through safetensors and JSON
(`load_trained_model`), the export through safetensors only (project rule; no ``torch.load``).
Running a loaded model on new videos is `alignprog.inference`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import yaml
from pydantic import ValidationError

import alignprog
from alignprog.config import (DEFAULT_BACKGROUND, ModelConfig, ProgressConfig,
                              with_saved_config_fixes)
from alignprog.errors import AlignprogError
from alignprog.fileio import fsync_file, load_json_text, replace_dir
from alignprog.models import ENCODER_LAYOUT, AlignmentModel, build_model

FORMAT = "alignprog-export"
FORMAT_VERSION = "1"
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
CARD_FILE = "README.md"
PREFIXES = ("encoder.", "progress_head.", "progress_base.")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16",
                  "half": "fp16"}
_MAX_LISTED = 12  # tensors listed in a mismatch report


class ExportError(AlignprogError):
    """An export cannot be written, or a file is not a (matching) alignprog export."""


def dtype_name(dtype: str | torch.dtype | None) -> str:
    """``"fp32" | "bf16" | "fp16"`` from a name or a torch dtype (None: fp32)."""
    if dtype is None:
        return "fp32"
    if isinstance(dtype, torch.dtype):
        for name, value in DTYPES.items():
            if value == dtype:
                return name
        raise ExportError(f"dtype {dtype} is not supported; choose one of {', '.join(DTYPES)}")
    name = _DTYPE_ALIASES.get(str(dtype), str(dtype))
    if name not in DTYPES:
        raise ExportError(f"dtype '{dtype}' is not supported; choose one of {', '.join(DTYPES)}")
    return name


# ----------------------------------------------------------------------------------------------
# Export


def export_run(run_dir: Path, *, checkpoint: str = "best", out_dir: Path, dtype: str = "fp32",
               overwrite: bool = False) -> Path:
    """Export a run's checkpoint (``best`` falls back to the latest, ``last``, or a path) to
    `out_dir`; returns the path of model.safetensors. See the module docstring for the files."""
    from alignprog.training.restore import load_checked_model
    from alignprog.training.checkpoint import read_checkpoint_meta
    from alignprog.training.restore import resolve_checkpoint
    from alignprog.training.rundir import RunDir

    name = dtype_name(dtype)
    run_dir = Path(run_dir)
    ckpt = resolve_checkpoint(run_dir, checkpoint)
    # safetensors + JSON only; the checks of eval-progress: a damaged checkpoint is one line,
    # NaN/Inf or absurd weights are refused
    cfg, model, state = load_checked_model(ckpt)
    meta = read_checkpoint_meta(ckpt)["meta"]
    config = {
        "method": cfg.train.method,
        "layout": ENCODER_LAYOUT[cfg.model.encoder],
        "input_shape": list(meta["input_shape"]),
        "num_tasks": int(meta["num_tasks"]),
        "background_labels": list(cfg.data.background_labels),
        "model": cfg.model.model_dump(mode="json"),
        "progress": cfg.progress.model_dump(mode="json"),
        "dtype": name,
        "alignprog_version": alignprog.__version__,
        "source": {"run": run_dir.name, "checkpoint": ckpt.name, "step": state.get("step"),
                   "epoch": state.get("epoch")},
    }
    run = RunDir.open(run_dir)
    card = model_card(config, model, run_meta=_read_optional(run, "meta.json"),
                      test_report=_read_optional(run, "eval_test.json"),
                      dataset=cfg.data.root)
    return export_model(model, config, out_dir, dtype=name, card=card, overwrite=overwrite)


def _read_optional(run, name: str) -> Any:
    try:
        return run.read_json(name)
    except AlignprogError:
        return None


def export_model(model: AlignmentModel, config: Mapping[str, Any], out_dir: Path, *,
                 dtype: str = "fp32", card: str | None = None, overwrite: bool = False) -> Path:
    """Write `model` with its `config` (see the module docstring) as an export directory.

    The directory is built under a hidden temporary name beside `out_dir` and renamed into place,
    so an interrupted export leaves nothing under the real name; an existing export is replaced
    only with `overwrite` (and a directory that is not an export never)."""
    name = dtype_name(dtype)
    config = dict(config) | {"dtype": name}
    out_dir = Path(out_dir)
    _check_target(out_dir, overwrite)
    tensors = {}
    for key, value in model.state_dict().items():
        t = value.detach().to("cpu")
        if t.is_floating_point():
            t = t.to(DTYPES[name])
        # clone(): each name its own storage (safetensors refuses shared ones; tied weights are
        # stored twice and loaded into the same parameter twice, which is harmless).
        tensors[key] = t.contiguous().clone()
    bad = [k for k in tensors if not k.startswith(PREFIXES)]
    if bad:
        raise ExportError(f"tensor names outside {'/'.join(PREFIXES)}: {bad[:_MAX_LISTED]}")
    config_json = json.dumps(config, sort_keys=False)
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": config_json,
                "dtype": name}

    from safetensors.torch import save_file

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_file(tensors, tmp / MODEL_FILE, metadata=metadata)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if card is not None:
            (tmp / CARD_FILE).write_text(card, encoding="utf-8")
        (tmp / EXPORT_MARKER).write_text(json.dumps({"format": FORMAT,
                                                     "format_version": FORMAT_VERSION}) + "\n",
                                         encoding="utf-8")
        # mkdtemp makes the directory 0700 and safetensors its file 0600: give them the
        # permissions a plain mkdir/open would, so that others can read the export.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
            fsync_file(f)
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir / MODEL_FILE


# Written into every export directory; --overwrite replaces only a directory that has it (a
# Hugging Face folder with model.safetensors and config.json is not ours to delete).
EXPORT_MARKER = ".alignprog-export"


def _is_export_dir(path: Path) -> bool:
    """An alignprog export: it has the marker, or (exports written before the marker) its
    model.safetensors metadata says format alignprog."""
    if (path / EXPORT_MARKER).is_file():
        return True
    if not (path / MODEL_FILE).is_file():
        return False
    try:
        from safetensors import safe_open
        with safe_open(str(path / MODEL_FILE), framework="pt") as fh:
            return (fh.metadata() or {}).get("format") == FORMAT
    except Exception:
        return False


def _check_target(out_dir: Path, overwrite: bool) -> None:
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise ExportError(f"{out_dir} exists and is not a directory; choose another --out")
    if not any(out_dir.iterdir()):
        return
    if not overwrite:
        raise ExportError(f"{out_dir} already exists; pass --overwrite to replace it or choose "
                          "another --out")
    if not _is_export_dir(out_dir):
        raise ExportError(f"refusing to overwrite {out_dir}: not written by alignprog (no "
                          f"{EXPORT_MARKER}: it is not an alignprog export); delete it yourself or "
                          "choose another --out")


def model_card(config: Mapping[str, Any], model: AlignmentModel, *, run_meta: Mapping | None,
               test_report: Mapping | None, dataset: Path | None = None) -> str:
    """README.md of an export: what the model is, what it was trained on, how well it did."""
    mc, pc, src = config["model"], config["progress"], config.get("source", {})
    n_params = sum(p.numel() for p in model.parameters())
    head = model.progress_head
    if head is not None:
        lc = pc["learnable"]
        arch = "mean" if not lc.get("use_gru", True) else lc["arch"]
        online = "streams frame by frame" if head.streamable else "re-runs each prefix online"
        reads = {"features": "the base encoder's features",
                 "separate": "its own base encoder (trained by the progress loss alone)"}.get(
                     model.head_input, "the aligned embeddings")
        head_line = (f"learnable `{arch}` head on {reads}, width {lc['hidden_dim']}, position "
                     f"feature `{lc['position']}` ({online})")
    elif pc.get("enabled") and pc.get("method") == "cumulative_l2":
        head_line = "none (the run used `cumulative_l2`, which needs no weights)"
    else:
        head_line = "none (the run trained no progress head)"
    encoder = f"`{mc['encoder']}`"
    if mc.get("mcn"):
        heads = mc.get("num_heads") or config["num_tasks"]
        encoder += f" with multi-head attention fusion ({heads} heads)"
    lines = [
        card_front_matter(config, test_report).rstrip("\n"),
        "",
        f"# alignprog model: {src.get('run', 'export')}",
        "",
        f"Exported by alignprog {config.get('alignprog_version', alignprog.__version__)} from "
        f"run `{src.get('run')}`, checkpoint `{src.get('checkpoint')}`.",
        "",
        "## Model",
        "",
        f"- alignment method: `{config['method']}`",
        f"- encoder: {encoder}; input: the `{config['layout']}` layout, one frame of shape "
        f"{tuple(config['input_shape'])}; embedding width {mc['output_dim']}",
        f"- progress head: {head_line}",
        f"- weights: {n_params:,} parameters stored as {config['dtype']}",
        "",
        "## Data and training",
        "",
    ]
    data_name = (run_meta or {}).get("dataset") or (str(dataset) if dataset else "synthetic")
    videos = (run_meta or {}).get("videos")
    lines.append(f"- dataset: {data_name}" + (f" ({videos} videos)" if videos else ""))
    lines.append(f"- tasks: {config['num_tasks']}")
    lines.append(f"- training: {src.get('step')} optimizer steps, {src.get('epoch')} epoch(s)")
    if run_meta and run_meta.get("git_commit"):
        lines.append(f"- source commit: `{run_meta['git_commit']}`")
    lines += ["", "## Evaluation", ""]
    if test_report and test_report.get("predictors"):
        lines += [f"Progress error on the {test_report.get('split', 'test')} split "
                  f"({test_report.get('convention', '')}), from the run's eval_test.json:",
                  "", "| predictor | MAE (mean over videos) | MAE (all frames) |",
                  "|---|---|---|"]
        for pname, res in test_report["predictors"].items():
            mae = res.get("metrics", {}).get("mae", {})
            lines.append(f"| {pname} | {_num(mae.get('mean_over_videos'))} | "
                         f"{_num(mae.get('pooled'))} |")
    else:
        lines.append("The run holds no evaluation report (eval_test.json).")
    lines += [
        "", "## Files", "",
        f"- `{MODEL_FILE}`: tensors named as `AlignmentModel.state_dict()`, under `encoder.`, "
        "`progress_head.` and (a head with its own base encoder) `progress_base.`; metadata "
        "`format_version`, `config` (JSON), `dtype`",
        f"- `{CONFIG_FILE}`: the same config",
        "", "## Use", "",
        "```python", "import alignprog", 'model = alignprog.load("THIS_DIR")', "```", "",
        "```", "alignprog predict THIS_DIR video.npy --segments segments.json", "```", "",
    ]
    return "\n".join(lines)


# The metrics the card's evaluation table reports, as named in eval_test.json.
CARD_METRICS = ("mae",)


def card_metadata(config: Mapping[str, Any], test_report: Mapping | None = None) -> dict:
    """The Hugging Face Hub metadata of an export's card: library, license, tags (the alignment
    method among them) and the names of the progress metrics the card reports (none when the
    run holds no evaluation report)."""
    tags = ["video-alignment", "action-progress", str(config["method"]), "alignprog"]
    meta: dict[str, Any] = {"library_name": "alignprog", "license": "mit",
                            "tags": list(dict.fromkeys(tags))}
    if test_report and test_report.get("predictors"):
        meta["metrics"] = list(CARD_METRICS)
    return meta


def card_front_matter(config: Mapping[str, Any], test_report: Mapping | None = None) -> str:
    """`card_metadata` as the YAML front-matter block a Hub README.md starts with:
    ``---``, the YAML, ``---`` (each line ending in a newline)."""
    body = yaml.safe_dump(card_metadata(config, test_report), sort_keys=False,
                          default_flow_style=None, allow_unicode=True)
    return f"---\n{body}---\n"


def _num(x: Any) -> str:
    return f"{x:.4f}" if isinstance(x, (int, float)) and math.isfinite(x) else "-"


# ----------------------------------------------------------------------------------------------
# Load


@dataclass(frozen=True)
class ExportInfo:
    """What an export's metadata says: the raw config and its validated parts."""

    path: Path                    # the model.safetensors file
    config: dict[str, Any]        # the raw config JSON
    model: ModelConfig
    progress: ProgressConfig
    method: str
    layout: str                   # "features" (T, D) or "frames" (T, C, H, W)
    input_shape: tuple[int, ...]  # one frame's shape
    num_tasks: int
    background_labels: tuple[str, ...]
    dtype: str                    # the stored dtype of the floating tensors
    format_version: str


def _export_file(path: Path) -> Path:
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise ExportError(f"{path}: no such file (expected an export directory or its "
                          f"{MODEL_FILE})")
    return path


def read_export_info(path: Path) -> ExportInfo:
    """The export's metadata, checked, without reading any tensor data."""
    from safetensors import safe_open

    path = _export_file(path)
    try:
        with safe_open(path, framework="pt") as fh:
            metadata = fh.metadata() or {}
    except Exception as exc:  # SafetensorError for damaged files, OSError for unreadable ones
        raise ExportError(f"{path}: not a readable safetensors file ({_short(exc)}); is it "
                          "truncated or corrupted?") from None
    return _parse_metadata(path, metadata)


def _short(exc: Exception) -> str:
    return str(exc).replace("Error while deserializing header: ", "").splitlines()[0]


def _parse_metadata(path: Path, metadata: Mapping[str, str]) -> ExportInfo:
    if "format_version" not in metadata or "config" not in metadata:
        raise ExportError(f"{path}: not an alignprog export (its safetensors metadata lacks "
                          "'format_version'/'config'; a training checkpoint? export it with "
                          "`alignprog export RUN_DIR --out DIR`)")
    version = metadata["format_version"]
    if version != FORMAT_VERSION:
        raise ExportError(f"{path}: export format_version {version!r} is not readable by "
                          f"alignprog {alignprog.__version__} (reads version {FORMAT_VERSION})")
    config = load_json_text(metadata["config"], lambda reason: ExportError(
        f"{path}: the 'config' metadata is not valid JSON ({reason})"))
    if not isinstance(config, dict):
        raise ExportError(f"{path}: the 'config' metadata must be a JSON object")
    missing = [k for k in ("model", "progress", "method", "input_shape", "num_tasks")
               if k not in config]
    if missing:
        raise ExportError(f"{path}: the config lacks {', '.join(missing)}")
    try:
        model_cfg = ModelConfig.model_validate(config["model"])
        progress_cfg = ProgressConfig.model_validate(
            with_saved_config_fixes({"progress": config["progress"],
                                     "train": {"method": config["method"]}})["progress"])
    except ValidationError as exc:
        problems = "; ".join(
            ".".join(str(p) for p in e["loc"]) + ": " * bool(e["loc"])
            + e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise ExportError(f"{path}: the export's config is invalid ({problems})") from None
    shape, num_tasks = config["input_shape"], config["num_tasks"]
    dtype = metadata.get("dtype", config.get("dtype", "fp32"))
    if dtype not in DTYPES:
        raise ExportError(f"{path}: unknown dtype {dtype!r} in the metadata")
    background = config.get("background_labels") or list(DEFAULT_BACKGROUND)
    _check_config_fields(path, config, shape, num_tasks, background)
    return ExportInfo(path, config, model_cfg, progress_cfg, str(config["method"]),
                      ENCODER_LAYOUT[model_cfg.encoder], tuple(shape), num_tasks,
                      tuple(str(b) for b in background), dtype, version)


# Bounds of a plausible export config: a tampered one (input_shape [1e9], num_tasks 1e7) is
# refused before anything is allocated.
MAX_INPUT_RANK = 3          # (D,) features or (C, H, W) frames
MAX_INPUT_DIM = 1 << 16
MAX_INPUT_ELEMS = 1 << 24   # elements of one frame
MAX_TASKS = 100_000


def _check_config_fields(path: Path, config: Mapping[str, Any], shape: Any, num_tasks: Any,
                         background: Any) -> None:
    """Types and ranges of the config fields beside model/progress (one-line ExportError),
    checked before anything is built or allocated."""
    def bad(what: str) -> ExportError:
        return ExportError(f"{path}: the export's config is invalid ({what})")

    def positive_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    if not isinstance(shape, list) or not shape or not all(positive_int(v) for v in shape):
        raise bad(f"input_shape must be a list of positive integers, got {shape!r}")
    if not positive_int(num_tasks):
        raise bad(f"num_tasks must be a positive integer, got {num_tasks!r}")
    if len(shape) > MAX_INPUT_RANK or any(v > MAX_INPUT_DIM for v in shape) \
            or math.prod(shape) > MAX_INPUT_ELEMS:
        raise bad(f"input_shape {shape!r} is out of range (at most {MAX_INPUT_RANK} dimensions "
                  f"of at most {MAX_INPUT_DIM}, {MAX_INPUT_ELEMS} elements)")
    if num_tasks > MAX_TASKS:
        raise bad(f"num_tasks {num_tasks} is out of range (at most {MAX_TASKS})")
    if not isinstance(config["method"], str) or not config["method"]:
        raise bad(f"method must be a string, got {config['method']!r}")
    if (not isinstance(background, list) or not background
            or not all(isinstance(b, str) for b in background)):
        raise bad(f"background_labels must be a non-empty list of strings, got {background!r}")
    for key, kind in (("layout", str), ("dtype", str), ("alignprog_version", str),
                      ("source", dict)):
        if key in config and config[key] is not None and not isinstance(config[key], kind):
            raise bad(f"{key} must be a {'string' if kind is str else 'JSON object'}, got "
                      f"{config[key]!r}")


def _check_header(info: ExportInfo) -> dict[str, tuple[tuple[int, ...], str]]:
    """The file's tensor names/shapes/dtypes from its header, checked against the model the
    config describes, built on the meta device (nothing allocated) BEFORE the real build."""
    from safetensors import safe_open

    try:
        with safe_open(info.path, framework="pt") as fh:
            found = {k: (tuple(fh.get_slice(k).get_shape()), fh.get_slice(k).get_dtype())
                     for k in fh.keys()}
    except Exception as exc:
        raise ExportError(f"{info.path}: cannot read the tensors ({_short(exc)}); is the file "
                          "truncated or corrupted?") from None
    with torch.device("meta"):
        skeleton = build_from_info(info)
    problems = check_tensors(skeleton.state_dict(), found)
    if problems:
        raise ExportError(f"{info.path}: the tensors do not match the architecture its "
                          "config describes: " + "; ".join(problems))
    return found


def build_from_info(info: ExportInfo) -> AlignmentModel:
    """The (untrained) model the export's config describes."""
    try:
        return build_model(info.model, info.progress, input_shape=info.input_shape,
                           num_tasks=info.num_tasks, method=info.method)
    except (ValueError, TypeError) as exc:
        raise ExportError(f"{info.path}: cannot build the model its config describes "
                          f"({exc})") from None


def check_tensors(expected: Mapping[str, torch.Tensor],
                  found: Mapping[str, tuple[tuple[int, ...], str]]) -> list[str]:
    """Problems between a model's state dict and a file's ``{name: (shape, dtype name)}``:
    missing, unexpected and mismatched tensors (name, expected shape, got shape)."""
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    mismatched = []
    for k, v in expected.items():
        if k not in found:
            continue
        shape, dt = found[k]
        if tuple(shape) != tuple(v.shape):
            mismatched.append(f"{k} expected {tuple(v.shape)} got {tuple(shape)}")
        elif v.is_floating_point() != dt.startswith(("F", "BF")):
            mismatched.append(f"{k} expected a {v.dtype} tensor got {dt}")
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} (in the model, not the file): {_listed(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} (in the file, not the model): "
                        f"{_listed(unexpected)}")
    if mismatched:
        problems.append(f"mismatched {len(mismatched)}: {_listed(mismatched)}")
    return problems


def _listed(items: Sequence[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def load_with_config(path: Path, *, device: str | torch.device = "cpu",
                     dtype: str | torch.dtype | None = None) -> tuple[AlignmentModel, ExportInfo]:
    """Rebuild the model from an export (directory or model.safetensors) alone, in eval mode.

    `dtype` is the compute dtype of the returned model; None means float32 (a bf16/fp16 export is
    upcast: its weights are the rounded values). Tensor names and shapes are checked against the
    model the config describes before any weight is loaded."""
    from safetensors import safe_open

    info = read_export_info(path)
    _check_header(info)  # shapes vs the safetensors header before allocating the model
    model = build_from_info(info)
    try:
        with safe_open(info.path, framework="pt") as fh:
            # the names and shapes are those _check_header compared with the same config's model
            tensors = {k: fh.get_tensor(k) for k in model.state_dict()}
    except Exception as exc:
        raise ExportError(f"{info.path}: cannot read the tensors ({_short(exc)}); is the file "
                          "truncated or corrupted?") from None
    from alignprog.checks import check_weights
    try:
        check_weights(tensors, info.path)  # NaN/Inf, and absurd magnitudes (e.g. 3e38)
    except AlignprogError as exc:
        raise ExportError(str(exc)) from None
    target = DTYPES[dtype_name(dtype)]
    model = model.to(target)
    model.load_state_dict(tensors, strict=True)  # copy_ casts each tensor to its parameter dtype
    return model.to(device).eval(), info


def load(path: Path, *, device: str | torch.device = "cpu",
         dtype: str | torch.dtype | None = None) -> AlignmentModel:
    """``alignprog.load(DIR or FILE)``: the model of an export, in eval mode (see
    `load_with_config`)."""
    return load_with_config(path, device=device, dtype=dtype)[0]
