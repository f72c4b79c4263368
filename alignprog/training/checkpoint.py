"""Checkpoints as directories of safetensors and JSON files; no pickle anywhere.

A checkpoint ``<run>/checkpoints/step-00001234/`` holds

* ``model.safetensors``      the model's ``state_dict`` (tied parameters stored once, see below);
* ``optimizer.safetensors``  every tensor of ``optimizer.state_dict()``, keyed by its path in that
  dict (``state.<param_index>.<name>``, ``param_groups.<g>.<key>`` for a tensor hyperparameter);
* ``rng.safetensors``        RNG states: torch CPU, each CUDA device (when CUDA is initialised),
  numpy's global MT19937 keys, python's ``random`` state and the caller's named generators;
* ``state.json``             the caller's ``state`` (step, epoch, counters, best metric...), the
  optimizer's non-tensor parts (param_groups hyperparameters) and the scalar parts of the RNG
  states;
* ``meta.json``              ``{"format": "alignprog-checkpoint", "schema_version": 1, ...,
  "meta": <caller's meta>}``.

The directory is built under a hidden temporary name beside its final place and renamed into place,
so that a crash while saving never leaves a half-written checkpoint under a real name, and replacing
an existing checkpoint (``best/``) keeps the old one until the new one is complete. Weights are read
with ``safetensors.torch.load_file`` only (project rule: never unpickle; no ``torch.load``).

Tied tensors: safetensors refuses two names over one storage, so a tensor that is exactly the same
view as an earlier one is stored once and its name recorded as an alias in the file's metadata;
a tensor that overlaps another in any other way is stored as its own copy.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import alignprog
from alignprog.errors import AlignprogError
from alignprog.fileio import fsync_file, replace_dir

SCHEMA_VERSION = 1
FORMAT = "alignprog-checkpoint"
BEST_NAME = "best"

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "state.json"
META_FILE = "meta.json"

_ALIASES_KEY = "alignprog.aliases"  # safetensors metadata entry: JSON {alias: stored name}
_STEP_RE = re.compile(r"^step-(\d+)$")
_MAX_LISTED = 8  # key names listed in a missing/unexpected-keys message


class CheckpointError(AlignprogError):
    """A checkpoint is missing, of an unknown format, or does not match the model/optimizer."""


# ----------------------------------------------------------------------------------------------
# Names


def checkpoint_name(step: int) -> str:
    """``12 -> "step-00000012"`` (zero-padded; readers still sort numerically, never by glob
    order: docs/reference-bugs.md#checkpoint-chosen-by-glob-order)."""
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return f"step-{int(step):08d}"


def checkpoint_step(name: str) -> int | None:
    """The step of a ``step-N`` directory name (any padding), None for other names."""
    match = _STEP_RE.match(name)
    return int(match.group(1)) if match else None


def is_checkpoint(path: Path) -> bool:
    """True for a complete checkpoint directory (meta.json is written last, and the directory
    only gets its real name once complete)."""
    path = Path(path)
    return path.is_dir() and (path / META_FILE).is_file()


# ----------------------------------------------------------------------------------------------
# JSON encoding of the non-tensor parts


def _encode(obj: Any, where: str, tensors: dict[str, torch.Tensor] | None) -> Any:
    """A JSON-able copy of `obj`; tensors go to `tensors` under the key `where` and are replaced by
    ``{"__tensor__": key}``. Tuples and non-finite floats are tagged so that they come back as
    they were (Adam's ``betas`` is a tuple)."""
    if isinstance(obj, torch.Tensor):
        if tensors is None:
            raise CheckpointError(f"{where}: a tensor cannot be stored in the checkpoint state; "
                                  "pass a Python number (tensor.item()) or list (tensor.tolist())")
        tensors[where] = obj
        return {"__tensor__": where}
    if isinstance(obj, np.generic):
        obj = obj.item()
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{where}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{where}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        out = {}
        for key, value in obj.items():
            if not isinstance(key, str):
                raise CheckpointError(f"{where}: dictionary key {key!r} is not a string")
            out[key] = _encode(value, f"{where}.{key}", tensors)
        return out
    raise CheckpointError(f"{where}: cannot store a {type(obj).__name__} in a checkpoint "
                          "(JSON values, tuples and tensors only)")


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if obj.keys() == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if obj.keys() == {"__tuple__"}:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if obj.keys() == {"__float__"}:
            return float(obj["__float__"])
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


# ----------------------------------------------------------------------------------------------
# File writing inside the temporary directory


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_json(path: Path, obj: Any) -> None:
    # allow_nan=False: the files must be valid JSON; non-finite floats are tagged by _encode.
    path.write_text(json.dumps(obj, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    fsync_file(path)


def _compact(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """CPU tensors safetensors accepts (contiguous, no two over one storage) and the aliases
    ``{name: stored name}`` of names that were exactly the same view as a stored tensor."""
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    claimed: dict[int, list[tuple[tuple, str]]] = {}  # storage ptr -> [(view signature, name)]
    for name, tensor in tensors.items():
        t = tensor.detach().to("cpu")
        if t.numel() == 0:
            out[name] = t.clone(memory_format=torch.contiguous_format)
            continue
        ptr = t.untyped_storage().data_ptr()
        view = (t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        same = [n for v, n in claimed.get(ptr, []) if v == view]
        if same:
            aliases[name] = same[0]
            continue
        whole = t.untyped_storage().nbytes() == t.numel() * t.element_size()
        if ptr in claimed or not t.is_contiguous() or not whole:
            t = t.clone(memory_format=torch.contiguous_format)
        claimed.setdefault(ptr, []).append((view, name))
        out[name] = t
    return out, aliases


def _write_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    stored, aliases = _compact(tensors)
    metadata = {_ALIASES_KEY: json.dumps(aliases)} if aliases else None
    save_file(stored, path, metadata=metadata)
    fsync_file(path)


def _read_tensors(path: Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    try:
        with safe_open(path, framework="pt") as fh:
            metadata = fh.metadata() or {}
        tensors = load_file(path, device=device)
    except Exception as exc:  # safetensors raises its own SafetensorError for damaged files
        raise CheckpointError(f"{path}: cannot read tensors ({exc})") from None
    for alias, name in json.loads(metadata.get(_ALIASES_KEY, "{}")).items():
        tensors[alias] = tensors[name]
    return tensors


# ----------------------------------------------------------------------------------------------
# RNG states


def _rng_state(generators: Mapping[str, torch.Generator]) -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"torch.cpu": torch.get_rng_state()}
    info: dict[str, Any] = {"cuda_devices": 0}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states = torch.cuda.get_rng_state_all()
        for i, state in enumerate(states):
            tensors[f"torch.cuda.{i}"] = state
        info["cuda_devices"] = len(states)
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    tensors["numpy.keys"] = torch.from_numpy(keys.astype(np.int64))
    info["numpy"] = {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss),
                     "cached_gaussian": float(cached)}
    version, internal, gauss_next = random.getstate()
    tensors["python.state"] = torch.tensor(internal, dtype=torch.int64)  # 625 values < 2**32
    info["python"] = {"version": version, "gauss_next": gauss_next}
    for name, gen in generators.items():
        tensors[f"generator.{name}"] = gen.get_state()
    info["generators"] = sorted(generators)
    return tensors, info


def _restore_rng(tensors: Mapping[str, torch.Tensor], info: Mapping, *, restore_global: bool,
                 generators: Mapping[str, torch.Generator], where: Path) -> None:
    missing = [name for name in generators if f"generator.{name}" not in tensors]
    if missing:
        saved = ", ".join(info.get("generators", [])) or "none"
        raise CheckpointError(f"{where}: no state for generator(s) {', '.join(missing)} "
                              f"(the checkpoint has: {saved})")
    for name, gen in generators.items():
        gen.set_state(tensors[f"generator.{name}"].to(torch.uint8).cpu())
    if not restore_global:
        return
    torch.set_rng_state(tensors["torch.cpu"].cpu())
    n_cuda = int(info.get("cuda_devices", 0))
    if n_cuda and torch.cuda.is_available():
        # A run resumed on fewer devices restores the ones it has.
        for i in range(min(n_cuda, torch.cuda.device_count())):
            torch.cuda.set_rng_state(tensors[f"torch.cuda.{i}"].cpu(), device=i)
    npi = info["numpy"]
    np.random.set_state((npi["kind"], tensors["numpy.keys"].numpy().astype(np.uint32),
                         npi["pos"], npi["has_gauss"], npi["cached_gaussian"]))
    pyi = info["python"]
    random.setstate((pyi["version"], tuple(int(v) for v in tensors["python.state"].tolist()),
                     pyi["gauss_next"]))


# ----------------------------------------------------------------------------------------------
# Save


def save_checkpoint(path: Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                    state: Mapping[str, Any], meta: Mapping[str, Any],
                    generators: Mapping[str, torch.Generator] | None = None) -> None:
    """Write the checkpoint directory `path` atomically (replacing an existing one safely).

    `state` is the caller's JSON-able training state (step, epoch, best metric...), returned by
    `load_checkpoint`; `meta` is stored in meta.json for readers that do not load weights (model
    and head configuration, feature source, the step). `generators` are named `torch.Generator`s
    whose states are saved beside the global RNG states.
    """
    path = Path(path)
    parent = path.parent
    parent.mkdir(parents=True, exist_ok=True)
    generators = dict(generators or {})
    # Encode everything before touching the disk, so that a bad value fails early.
    state_json = _encode(dict(state), "state", None)
    meta_json = _encode(dict(meta), "meta", None)
    opt_tensors: dict[str, torch.Tensor] = {}
    opt_json = None
    if optimizer is not None:
        opt_sd = optimizer.state_dict()
        opt_json = {
            "class": type(optimizer).__name__,
            # Parameter indices are ints in torch's dict; JSON keys are strings (undone on load).
            "state": {str(i): _encode(dict(s), f"state.{i}", opt_tensors)
                      for i, s in opt_sd["state"].items()},
            "param_groups": [_encode(dict(g), f"param_groups.{k}", opt_tensors)
                             for k, g in enumerate(opt_sd["param_groups"])],
        }
    rng_tensors, rng_json = _rng_state(generators)
    model_sd = model.state_dict()
    bad = [k for k, v in model_sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"model state entries that are not tensors cannot be saved: {bad}")

    _remove_stale(parent, path.name, ".tmp-")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=parent))
    try:
        _write_tensors(tmp / MODEL_FILE, model_sd)
        if optimizer is not None:
            _write_tensors(tmp / OPTIMIZER_FILE, opt_tensors)
        _write_tensors(tmp / RNG_FILE, rng_tensors)
        _write_json(tmp / STATE_FILE, {"state": state_json, "optimizer": opt_json,
                                       "rng": rng_json})
        # meta.json last: a directory with it is complete.
        _write_json(tmp / META_FILE, {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "alignprog_version": alignprog.__version__,
            "torch_version": torch.__version__,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "files": sorted(p.name for p in tmp.iterdir()) + [META_FILE],
            "meta": meta_json,
        })
        _fsync_dir(tmp)
        _move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(parent)
    _remove_stale(parent, path.name, ".old-")


def _remove_stale(parent: Path, name: str, kind: str) -> None:
    """Delete leftovers of an earlier save of `name` that was killed half-way."""
    for stale in parent.glob(f".{name}{kind}*"):
        shutil.rmtree(stale, ignore_errors=True)


def _move_into_place(tmp: Path, path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a checkpoint directory")
    replace_dir(tmp, path)


# ----------------------------------------------------------------------------------------------
# Load


def read_checkpoint_meta(path: Path) -> dict:
    """meta.json of a checkpoint, after checking its format and schema version.

    The caller's meta is under the key ``"meta"``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint")
    if not path.is_dir():
        raise CheckpointError(f"{path}: a checkpoint is a directory (with model.safetensors and "
                              "meta.json); this is a file")
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"{path}: not an alignprog checkpoint (no {META_FILE}; an "
                              "unfinished save leaves no checkpoint under a real name)")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{meta_path}: cannot read ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise CheckpointError(f"{meta_path}: not an alignprog checkpoint (format {got!r}, "
                              f"expected {FORMAT!r})")
    version = meta.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CheckpointError(f"{meta_path}: unknown checkpoint schema_version {version!r} "
                              f"(this alignprog reads version {SCHEMA_VERSION})")
    if version > SCHEMA_VERSION:
        raise CheckpointError(
            f"{meta_path}: checkpoint schema_version {version} was written by a newer alignprog "
            f"(written by {meta.get('alignprog_version', 'unknown')}, this is "
            f"{alignprog.__version__}, which reads version {SCHEMA_VERSION}); upgrade alignprog")
    meta["meta"] = _decode(meta.get("meta", {}), {})
    return meta


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    return shown + (f" and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else "")


def _load_model(path: Path, model: nn.Module, map_location: str, strict: bool) -> None:
    loaded = _read_tensors(path / MODEL_FILE, device=map_location)
    expected = model.state_dict()
    missing = [k for k in expected if k not in loaded]
    unexpected = [k for k in loaded if k not in expected]
    problems = []
    if strict and missing:
        problems.append(f"missing keys (in the model, not in the checkpoint): {_listed(missing)}")
    if strict and unexpected:
        problems.append(f"unexpected keys (in the checkpoint, not in the model): "
                        f"{_listed(unexpected)}")
    shapes = [f"{k} checkpoint {tuple(loaded[k].shape)} vs model {tuple(v.shape)}"
              for k, v in expected.items() if k in loaded and loaded[k].shape != v.shape]
    if shapes:
        problems.append("shape mismatches: " + _listed(shapes))
    if problems:
        raise CheckpointError(f"{path}: the checkpoint does not match the model: "
                              + "; ".join(problems)
                              + " (was it written for another model configuration?)")
    model.load_state_dict({k: v for k, v in loaded.items() if k in expected}, strict=strict)


def _load_optimizer(path: Path, optimizer: torch.optim.Optimizer, opt_json: Mapping | None
                    ) -> None:
    if opt_json is None:
        raise CheckpointError(f"{path}: the checkpoint holds no optimizer state (it was saved "
                              "with optimizer=None)")
    if opt_json["class"] != type(optimizer).__name__:
        raise CheckpointError(f"{path}: the optimizer state is for {opt_json['class']}, "
                              f"not {type(optimizer).__name__}")
    # Loaded on CPU; Optimizer.load_state_dict casts to each parameter's device and dtype. Cloned
    # so that the optimizer owns ordinary (not file-backed) memory it can update in place.
    tensors = {k: v.clone() for k, v in _read_tensors(path / OPTIMIZER_FILE).items()}
    sd = {
        "state": {int(i): _decode(s, tensors) for i, s in opt_json["state"].items()},
        "param_groups": [_decode(g, tensors) for g in opt_json["param_groups"]],
    }
    try:
        optimizer.load_state_dict(sd)
    except (ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: the optimizer state does not match the optimizer "
                              f"({exc})") from None


def load_checkpoint(path: Path, *, model: nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None,
                    generators: Mapping[str, torch.Generator] | None = None,
                    restore_rng: bool = True, map_location: str | torch.device = "cpu",
                    strict: bool = True) -> dict:
    """Load a checkpoint written by `save_checkpoint` and return the caller's `state` dict.

    Weights go into `model` (when given), the optimizer state into `optimizer` (exactly: training
    continues bit-identically on CPU). `restore_rng` restores the global torch/CUDA/numpy/python
    RNG states; the `generators` passed are always restored (it is an error if one is missing).
    `strict=False` tolerates missing and unexpected model keys (a shape mismatch is still an
    error), e.g. to load an alignment checkpoint into a model with a new progress head.
    """
    path = Path(path)
    read_checkpoint_meta(path)
    try:
        saved = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path / STATE_FILE}: cannot read ({exc})") from None
    if model is not None:
        _load_model(path, model, str(map_location), strict)
    if optimizer is not None:
        _load_optimizer(path, optimizer, saved.get("optimizer"))
    if restore_rng or generators:
        _restore_rng(_read_tensors(path / RNG_FILE), saved["rng"], restore_global=restore_rng,
                     generators=dict(generators or {}), where=path)
    return _decode(saved["state"], {})
