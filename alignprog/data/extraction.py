"""Video files -> the feature layouts the encoders read (docs/data.md#feature-extraction).

The data layer's extraction side (`alignprog extract-features`): `alignprog.data.video` decodes
and samples the frames, one torchvision ResNet-50 pass per batch of them gives both arrays, which
`alignprog.data.dataset` reads back:

* ``frames/<handle>.npy``   (T, 1024, 14, 14): the ``layer3`` (conv4) maps, what the
  reference fork's ``extract_features.py`` stores for the ``resnet50`` conv encoder;
* ``features/<handle>.npy`` (T, 2048): the global average pool of ``layer4``, the conventional
  pooled ResNet-50 vector (torchvision's ``avgpool``; ``fc`` is never run).

Preprocessing (ImageNet, as torchvision's weights expect): the frame is converted to RGB by
FFmpeg (swscale, ``rgb24``), scaled to [0, 1], resized to 224x224 without keeping the aspect
ratio (bilinear with antialiasing, ``torch.nn.functional.interpolate``: what
``torchvision.transforms.v2.functional.resize(antialias=True)`` does on a float tensor), then
normalised with the ImageNet mean and std. The network runs in float32 (on CUDA, cuDNN may use
TF32, PyTorch's default for convolutions); arrays are cast to the storage dtype (float16 by
default, as the fork stores them) only when written.

The library never prints: progress goes through callbacks; the CLI draws the bar.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from alignprog.data.arrays import read_npy_header
from alignprog.data.video import SampledFrames, VideoError
from alignprog.errors import AlignprogError, ConfigError, DataError
from alignprog.fileio import atomic_save_npy, atomic_write_json, read_user_text

Layout = Literal["features", "frames"]
LAYOUTS: tuple[Layout, ...] = ("features", "frames")
MANIFEST = "manifest.json"
MANIFEST_SCHEMA = 1
INPUT_SIZE = 224                      # ResNet-50's ImageNet input; layer3 is then 14x14
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RANDOM_SEED = 0                       # --weights random: the same network every time
DOWNLOAD_TIMEOUT_S = 30               # a machine without network fails fast instead of hanging
STORAGE_DTYPES = {"fp16": np.float16, "fp32": np.float32}


# ------------------------------------------------------------------------------------------------
# Preprocessing and network


def preprocess(rgb: torch.Tensor) -> torch.Tensor:
    """RGB uint8 frames (B, H, W, 3) -> ImageNet-normalised float32 (B, 3, 224, 224).

    Same device as the input; see the module docstring for the exact steps."""
    x = rgb.permute(0, 3, 1, 2).to(torch.float32) / 255.0                         # (B, 3, H, W)
    x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False,
                      antialias=True)                                    # (B, 3, 224, 224)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


@dataclass(frozen=True)
class FeatureOutput:
    layer3: torch.Tensor             # (B, 1024, 14, 14): torchvision `layer3` (conv4) maps
    pooled: Optional[torch.Tensor]   # (B, 2048): global average pool of `layer4`; None if skipped


class ResNet50Features(nn.Module):
    """A torchvision ResNet-50 without its classifier: one pass gives layer3 and pooled layer4."""

    def __init__(self, resnet: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
        self.layer1, self.layer2 = resnet.layer1, resnet.layer2
        self.layer3, self.layer4 = resnet.layer3, resnet.layer4

    def forward(self, x: torch.Tensor, *, pooled: bool = True) -> FeatureOutput:
        h = self.layer2(self.layer1(self.stem(x)))            # (B, 512, 28, 28)
        l3 = self.layer3(h)                                   # (B, 1024, 14, 14)
        if not pooled:                                        # frames only: layer4 is not needed
            return FeatureOutput(l3, None)
        return FeatureOutput(l3, self.layer4(l3).mean(dim=(2, 3)))   # (B, 2048)


@dataclass(frozen=True)
class LoadedWeights:
    network: ResNet50Features
    description: str   # what the manifest records: which weights exactly


def load_network(weights: str, *, device: torch.device | str = "cpu",
                 seed: int = RANDOM_SEED) -> LoadedWeights:
    """ResNet-50 in eval mode with `weights`: ``imagenet`` (torchvision IMAGENET1K_V1, from the
    torch hub cache, downloaded there if missing and a network exists), ``random`` (torchvision's
    initialisation under `seed`) or a local file (``.safetensors``, or a torch state dict read
    with ``weights_only=True``: nothing is unpickled)."""
    import torchvision

    if weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            resnet = torchvision.models.resnet50(weights=None)
        description = f"random (torchvision init, seed {seed})"
    else:
        resnet = torchvision.models.resnet50(weights=None)
        if weights == "imagenet":
            state, description = _imagenet_state()
        else:
            state, description = _file_state(Path(weights))
        _load_state(resnet, state, weights)
    net = ResNet50Features(resnet).eval().requires_grad_(False).to(device)
    return LoadedWeights(net, description)


def _imagenet_state() -> tuple[dict, str]:
    from torchvision.models import ResNet50_Weights

    url = ResNet50_Weights.IMAGENET1K_V1.url
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)  # torchvision's cache
    if not path.is_file():
        # The file name carries the SHA-256 prefix torch.hub checks (resnet50-0676ba61.pth).
        hash_prefix = path.stem.rsplit("-", 1)[-1]
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with _socket_timeout(DOWNLOAD_TIMEOUT_S):
                torch.hub.download_url_to_file(url, str(path), hash_prefix=hash_prefix,
                                               progress=False)
        except (OSError, RuntimeError, ValueError) as exc:
            raise AlignprogError(
                f"--weights imagenet: torchvision's ResNet-50 IMAGENET1K_V1 weights are not in "
                f"the torch hub cache ({path}) and could not be downloaded ({exc}). Copy {url} "
                f"to that path (or set TORCH_HOME), or pass --weights PATH to a local file, or "
                f"--weights random") from None
    return _torch_load(path), f"imagenet (torchvision ResNet50_Weights.IMAGENET1K_V1, {path.name})"


def _file_state(path: Path) -> tuple[dict, str]:
    if not path.is_file():
        raise ConfigError(f"--weights: '{path}' is neither imagenet, random nor an existing file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as exc:
            raise ConfigError(f"--weights {path}: not a readable safetensors file "
                              f"({exc})") from None
    else:
        state = _torch_load(path)
        for key in ("state_dict", "model"):   # common checkpoint wrappers
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    return state, f"file {path} (sha256 {_sha256(path)[:16]})"


def _torch_load(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ...
        why = " ".join(str(exc).split())[:200]   # one line
        raise ConfigError(f"--weights {path}: cannot read it as a torch state dict with "
                          f"weights_only=True ({type(exc).__name__}: {why})") from None
    if not isinstance(state, dict):
        raise ConfigError(f"--weights {path}: holds a {type(state).__name__}, not a state dict")
    return state


def _load_state(resnet: nn.Module, state: dict, name: str) -> None:
    state = {k.removeprefix("module."): v for k, v in state.items()}
    try:
        missing, unexpected = resnet.load_state_dict(state, strict=False)
    except RuntimeError as exc:   # shape mismatches
        first = " ".join(str(exc).split())[:300]   # one line: the first mismatches
        raise ConfigError(f"--weights {name}: not ResNet-50 weights ({first})") from None
    missing = [k for k in missing if not k.startswith("fc.")]   # the classifier is never run
    if missing or unexpected:
        raise ConfigError(f"--weights {name}: not torchvision ResNet-50 weights ("
                          f"{len(missing)} missing keys, e.g. {missing[:3]}; "
                          f"{len(unexpected)} unexpected, e.g. {unexpected[:3]})")


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    before = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(before)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------
# One video


@dataclass
class VideoFeatures:
    features: Optional[np.ndarray]   # (T, 2048) or None when not asked for
    frames: Optional[np.ndarray]     # (T, 1024, 14, 14) or None
    num_frames: int                  # T
    decoded_frames: int              # frames decoded to find them
    native_fps: Fraction
    decode_s: float                  # decoding + RGB conversion
    network_s: float                 # preprocessing + network + copy back


@torch.inference_mode()
def extract_video(path: Path, net: ResNet50Features, *, fps: float, layouts: tuple[Layout, ...],
                  device: torch.device | str = "cpu", batch_size: int = 32,
                  dtype: str = "fp16", on_frames: Callable[[int], None] | None = None
                  ) -> VideoFeatures:
    """Decode `path`, sample at `fps`, run `net` on batches of `batch_size` frames and return
    the requested arrays in the storage `dtype`. Raises `VideoError` for unreadable videos."""
    if not layouts or any(layout not in LAYOUTS for layout in layouts):
        raise ConfigError(f"layouts must be some of {LAYOUTS}, got {layouts}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    if dtype not in STORAGE_DTYPES:
        raise ConfigError(f"--dtype must be fp16 or fp32, got {dtype!r}")
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    device = torch.device(device)
    want_pooled = "features" in layouts
    pooled_parts: list[np.ndarray] = []
    map_parts: list[np.ndarray] = []
    network_s = 0.0

    def run(batch: list[torch.Tensor]) -> None:
        nonlocal network_s
        start = time.perf_counter()
        x = torch.cat(batch)                                                 # (B, 3, 224, 224)
        out = net(x, pooled=want_pooled)
        if "frames" in layouts:
            map_parts.append(out.layer3.to(torch_dtype).cpu().numpy())      # (B, 1024, 14, 14)
        if want_pooled:
            pooled_parts.append(out.pooled.to(torch_dtype).cpu().numpy())   # (B, 2048)
        network_s += time.perf_counter() - start   # .cpu() waits for the device
        if on_frames is not None:
            on_frames(len(batch))

    with SampledFrames(path, fps) as video:
        batch: list[torch.Tensor] = []
        for rgb in video:                                                    # (H, W, 3) uint8
            start = time.perf_counter()
            # Resized one frame at a time on the device: a batch of full-size frames would be
            # large (64 frames of 4K are 1.6 GB), 224x224 ones are small.
            frame = torch.from_numpy(rgb).to(device, non_blocking=True)[None]  # (1, H, W, 3)
            batch.append(preprocess(frame))                                  # (1, 3, 224, 224)
            network_s += time.perf_counter() - start
            if len(batch) == batch_size:
                run(batch)
                batch = []
        if batch:
            run(batch)
        decoded, native_fps, decode_s = video.decoded, video.native_fps, video.decode_s
    if decoded == 0:
        raise VideoError("no video frame could be decoded", file=str(path))
    features = np.concatenate(pooled_parts) if want_pooled else None        # (T, 2048)
    frames = np.concatenate(map_parts) if "frames" in layouts else None     # (T, 1024, 14, 14)
    num = len(features) if features is not None else len(frames)
    return VideoFeatures(features, frames, num, decoded, native_fps, decode_s, network_s)


# ------------------------------------------------------------------------------------------------
# A folder of videos -> a dataset root


@dataclass(frozen=True)
class ExtractSettings:
    fps: float = 1.0
    layouts: tuple[Layout, ...] = ("features",)
    weights: str = "imagenet"
    batch_size: int = 32
    dtype: str = "fp16"
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not (self.fps > 0 and math.isfinite(self.fps)):
            raise ConfigError(f"--fps must be a positive number, got {self.fps}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.dtype not in STORAGE_DTYPES:
            raise ConfigError(f"--dtype must be fp16 or fp32, got {self.dtype!r}")
        if not self.layouts or any(layout not in LAYOUTS for layout in self.layouts):
            raise ConfigError(f"layouts must be some of {LAYOUTS}, got {self.layouts}")


@dataclass
class VideoResult:
    handle: str
    source: str
    status: Literal["done", "skipped", "failed"]
    frames: int = 0
    decoded_frames: int = 0
    native_fps: float | None = None
    error: str | None = None
    decode_s: float = 0.0
    network_s: float = 0.0


@dataclass
class ExtractSummary:
    out_root: str
    settings: dict
    weights: str
    videos: list[VideoResult] = field(default_factory=list)

    @property
    def failed(self) -> list[VideoResult]:
        return [v for v in self.videos if v.status == "failed"]

    def count(self, status: str) -> int:
        return sum(v.status == status for v in self.videos)

    def to_dict(self) -> dict:
        done = [v for v in self.videos if v.status == "done"]
        frames = sum(v.frames for v in done)
        decode_s = sum(v.decode_s for v in done)
        network_s = sum(v.network_s for v in done)
        return {
            "out_root": self.out_root, "settings": self.settings, "weights": self.weights,
            "done": len(done), "skipped": self.count("skipped"), "failed": self.count("failed"),
            "frames": frames, "decode_s": round(decode_s, 3), "network_s": round(network_s, 3),
            "frames_per_s": round(frames / (decode_s + network_s), 2) if frames else None,
            "videos": [asdict(v) for v in self.videos],
        }


def read_manifest(out_root: Path) -> dict | None:
    path = Path(out_root) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(read_user_text(path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"unreadable manifest ({exc}); delete it or pass --overwrite",
                        file=str(path)) from None
    if not isinstance(manifest, dict) or manifest.get("schema_version") != MANIFEST_SCHEMA:
        raise DataError(f"not an extract-features manifest of schema {MANIFEST_SCHEMA}; delete it "
                        "or pass --overwrite", file=str(path))
    if not isinstance(manifest.get("settings", {}), dict):
        raise DataError("damaged manifest: 'settings' is not an object; delete it or pass "
                        "--overwrite", file=str(path))
    for key in ("videos", "failed"):
        items = manifest.get(key, [])
        if not isinstance(items, list) or not all(
                isinstance(e, dict) and isinstance(e.get("handle"), str) for e in items):
            raise DataError(f"damaged manifest: '{key}' is not a list of entries with a string "
                            "'handle'; delete it or pass --overwrite", file=str(path))
        for e in items if key == "videos" else ():
            if not isinstance(e.get("frames"), int) or isinstance(e.get("frames"), bool):
                raise DataError(f"damaged manifest: video '{e['handle']}' has no integer "
                                "'frames'; delete it or pass --overwrite", file=str(path))
    return manifest


def _array_intact(path: Path, frames: int | None) -> bool:
    """Whether an existing output array is a complete, readable .npy (of `frames` frames when
    known): a 0-byte or truncated file from an interrupted run is not done."""
    try:
        shape, _ = read_npy_header(path)   # the data layer's reader: regular, complete, float
    except (OSError, DataError):
        return False
    return len(shape) >= 1 and shape[0] > 0 and (frames is None or shape[0] == frames)


def _check_resume(manifest: dict, settings: ExtractSettings, out_root: Path) -> None:
    """Resuming with other settings would mix two kinds of arrays in one root."""
    old = manifest.get("settings", {})
    for key, now in (("fps", settings.fps), ("weights", settings.weights),
                     ("dtype", settings.dtype)):
        if old.get(key) != now:
            raise ConfigError(f"{out_root / MANIFEST}: this root was extracted with --{key} "
                              f"{old.get(key)}, this run asks for {now}; use the same setting, "
                              "another --out, or --overwrite to redo every video")


def extract_videos(videos: list[Path], out_root: Path, settings: ExtractSettings, *,
                   device: torch.device | str = "cpu", net: LoadedWeights | None = None,
                   on_video_start: Callable[[int, str], None] | None = None,
                   on_frames: Callable[[int], None] | None = None,
                   on_video: Callable[[VideoResult], None] | None = None,
                   on_warning: Callable[[str], None] | None = None) -> ExtractSummary:
    """Extract every video into `out_root`/{features,frames}/<handle>.npy and keep
    `out_root`/manifest.json up to date after each video.

    Resumable: a video whose requested arrays all exist is skipped unless
    ``settings.overwrite``. Each array is written to a temporary file and renamed. A video that
    cannot be read is recorded as failed (in the result and the manifest) and the others go on.
    `net` defaults to ``load_network(settings.weights)``; the network is only loaded when a
    video needs it."""
    out_root = Path(out_root)
    try:
        for layout in settings.layouts:
            (out_root / layout).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DataError(f"cannot create the output directory ({exc.strerror or exc})",
                        file=str(exc.filename or out_root)) from None
    if not os.access(out_root, os.W_OK) or not all(
            os.access(out_root / layout, os.W_OK) for layout in settings.layouts):
        raise DataError("the output directory is not writable", file=str(out_root))
    manifest = None if settings.overwrite else read_manifest(out_root)
    if manifest is not None:
        _check_resume(manifest, settings, out_root)
    entries: dict[str, dict] = {e["handle"]: e for e in (manifest or {}).get("videos", [])}
    failed: dict[str, dict] = {e["handle"]: e for e in (manifest or {}).get("failed", [])}
    settings_record = {"fps": settings.fps, "weights": settings.weights, "dtype": settings.dtype}
    summary = ExtractSummary(str(out_root), {**settings_record, "layouts": list(settings.layouts),
                                             "batch_size": settings.batch_size,
                                             "device": str(device)},
                             weights=(manifest or {}).get("weights_description", ""))

    def save_manifest() -> None:
        atomic_write_json(out_root / MANIFEST, {
            "schema_version": MANIFEST_SCHEMA,
            "settings": settings_record,
            "weights_description": summary.weights,
            "sampling": "decoded frame c kept when floor(c mod h) == 0, h = native_fps / fps",
            "preprocessing": "RGB, resize to 224x224 (bilinear, antialiased, aspect not kept), "
                             "ImageNet mean/std",
            "arrays": {"features": "(T, 2048) global average pool of ResNet-50 layer4",
                       "frames": "(T, 1024, 14, 14) ResNet-50 layer3"},
            "videos": [entries[h] for h in sorted(entries)],
            "failed": [failed[h] for h in sorted(failed)],
        })

    for i, path in enumerate(videos):
        handle = path.stem
        if on_video_start is not None:
            on_video_start(i, handle)
        targets = {layout: out_root / layout / f"{handle}.npy" for layout in settings.layouts}
        existing = not settings.overwrite and all(p.is_file() for p in targets.values())
        if existing:
            known = (entries.get(handle) or {}).get("frames")
            damaged = [p for p in targets.values() if not _array_intact(p, known)]
            if damaged:
                message = (f"{damaged[0]}: existing array is empty, truncated or does not "
                           "match the manifest; extracting the video again")
                if on_warning is not None:
                    on_warning(message)
                else:
                    import warnings
                    warnings.warn(message, stacklevel=2)
                existing = False
        if existing:
            entry = entries.get(handle) or _entry_from_arrays(handle, path, out_root, settings)
            entries[handle] = entry
            result = VideoResult(handle, str(path), "skipped", frames=entry["frames"],
                                 decoded_frames=entry.get("decoded_frames") or 0,
                                 native_fps=entry.get("native_fps"))
        else:
            if net is None:
                net = load_network(settings.weights, device=device)
                summary.weights = net.description
            try:
                out = extract_video(path, net.network, fps=settings.fps, layouts=settings.layouts,
                                    device=device, batch_size=settings.batch_size,
                                    dtype=settings.dtype, on_frames=on_frames)
            except VideoError as exc:
                failed[handle] = {"handle": handle, "source": str(path), "error": exc.what}
                result = VideoResult(handle, str(path), "failed", error=str(exc))
            else:
                for layout, target in targets.items():
                    atomic_save_npy(target, out.features if layout == "features" else out.frames)
                entries[handle] = {
                    "handle": handle, "frames": out.num_frames, "fps": settings.fps,
                    "native_fps": float(out.native_fps), "decoded_frames": out.decoded_frames,
                    "source": str(path),
                    "layouts": sorted(set(entries.get(handle, {}).get("layouts", []))
                                      | set(settings.layouts)),
                }
                failed.pop(handle, None)
                result = VideoResult(handle, str(path), "done", frames=out.num_frames,
                                     decoded_frames=out.decoded_frames,
                                     native_fps=float(out.native_fps), decode_s=out.decode_s,
                                     network_s=out.network_s)
        save_manifest()   # after every video: an interrupted run keeps what it finished
        summary.videos.append(result)
        if on_video is not None:
            on_video(result)
    if not videos:
        save_manifest()
    return summary


def _entry_from_arrays(handle: str, source: Path, out_root: Path,
                       settings: ExtractSettings) -> dict:
    """A manifest entry for arrays written before the manifest was (an interrupted run)."""
    lengths = set()
    for layout in settings.layouts:
        path = out_root / layout / f"{handle}.npy"
        try:
            shape, _ = read_npy_header(path)
        except (OSError, DataError) as exc:
            reason = (exc.strerror or str(exc)) if isinstance(exc, OSError) else exc.what
            raise DataError(f"existing array unreadable ({reason}); pass --overwrite to redo it",
                            file=str(path), handle=handle) from None
        if not shape:
            raise DataError("existing array has no frames; pass --overwrite to redo it",
                            file=str(path), handle=handle)
        lengths.add(shape[0])
    if len(lengths) != 1:
        raise DataError(f"existing arrays disagree on the frame count ({sorted(lengths)}); pass "
                        "--overwrite to redo them", handle=handle, file=str(out_root))
    return {"handle": handle, "frames": lengths.pop(), "fps": settings.fps, "native_fps": None,
            "decoded_frames": None, "source": str(source), "layouts": list(settings.layouts)}
