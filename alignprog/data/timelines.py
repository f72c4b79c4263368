"""Synthetic features on the real EgoProceL timelines: data to develop progress learning on.

`data.synthetic.timelines: egoprocel` (`alignprog data synth --timelines egoprocel`). The
timelines are the real ones: every video of the EgoProceL annotation file that ships with the
package (resources/egoprocel.json), its segments mapped to 1 fps feature frames as the loader
maps them with `--fps-preset egoprocel` (docs/data.md#frame-units-and-fps-presets). So the
action orders, repeats, durations (median actions of a few frames) and the long background are
EgoProceL's. The CMU tasks are left out unless `data.synthetic.cmu` (their annotation lists are
not paired with their videos; they are then paired by position).

Only the appearance is ours, and it hides progress on purpose. Frame t of segment k (label a,
relative position p in [0, 1]) in video v has the latent (LATENT_DIM dims)

    foreground:  z = m_a + s_k + rho_k * U_a g_v(p ** gamma_v) + drift_v(t) + noise
    background:  z = m_0 + s_k + ECHO * (w_prev m_prev + w_next m_next) + drift_v(t) + noise

with m_a the action's mean, s_k a per-segment offset, gamma_v a per-video pace warp, g_v a
nonlinear code of progress with per-video phases (sines of several frequencies), rho_k a
per-segment strength, drift_v a slow random walk over the whole video, and background that
echoes the neighbouring actions (weights fading with the distance to them). The features are
`gain_v * relu(W [z; clutter] + b + noise)`, where the clutter dims are AR(1) noise that
carries nothing. Progress is thus visible only through a nonlinear, noisy, video-specific map.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alignprog.config import DataConfig, FpsConfig, SyntheticConfig
from alignprog.data.annotations import RepairLog, canonicalise, parse_task_record
from alignprog.data.dataset import read_annotation_json, read_vocabulary, source_fps_of
from alignprog.errors import DataError

LATENT_DIM = 32
CLUTTER_DIM = 16           # latent dims of pure AR(1) noise
CLUTTER_AR = 0.9           # their frame-to-frame correlation
MEAN_SCALE = 1.0           # std of the per-action means
SEGMENT_STD = 0.4          # per-segment offset
CODE_FREQS = (0.5, 1.0, 2.0)  # half a period first: one part of the code is monotonic
CODE_WEIGHTS = (1.0, 0.6, 0.4)  # ... and the largest
CODE_SHARED = 0.9          # share of each action's code map common to all actions
PROGRESS_SCALE = 2.5       # amplitude of the progress code
PHASE_STD = 0.2            # per-video phase jitter of the code (radians)
PACE_SIGMA = 0.3           # log-std of the per-video pace warp gamma
STRENGTH_SIGMA = 0.25      # log-std of the per-segment code strength rho
DRIFT_STD = 0.02           # per-frame step of the drift random walk
ECHO, ECHO_FRAMES = 0.6, 4.0   # how much background echoes its neighbours, and over how long
NOISE = 0.6                # per-frame latent noise
FEATURE_NOISE = 0.3        # per-dimension noise before the ReLU
GAIN_SIGMA = 0.25          # log-std of the per-video feature gain
RESOURCES = Path(__file__).resolve().parent / "resources"   # package data
RESOURCE = "egoprocel.json"
VOCABULARY = "egoprocel-id2action.txt"


def _rng(seed: int, video: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed % 2**64, 7, video, stream]))


@dataclass(frozen=True)
class _Video:
    index: int
    labels: np.ndarray   # (K,) int label ids, 0 = background
    lengths: np.ndarray  # (K,) segment lengths >= 1

    @property
    def num_frames(self) -> int:
        return int(self.lengths.sum())


def real_timelines(cmu: bool = False) -> dict[str, list[tuple[str, list[str], np.ndarray]]]:
    """Task -> [(handle, labels, lengths)]: the canonical 1 fps segments of every EgoProceL
    video (labels as the file's id strings, "0" background)."""
    data = read_annotation_json(RESOURCES / RESOURCE)
    cfg = DataConfig(fps=FpsConfig(preset="egoprocel"))
    out: dict[str, list[tuple[str, list[str], np.ndarray]]] = {}
    background = frozenset(cfg.background_labels)
    for task in sorted(data):
        is_cmu = task.endswith(".cmu")
        if is_cmu and not cmu:
            continue
        videos = []
        fps = source_fps_of(task, cfg)
        for raw in parse_task_record(task, data[task], file=RESOURCE, strict=not is_cmu,
                                     warnings=[]):
            n = int(np.floor(raw.ends[-1] * cfg.fps.feature / fps + 1e-9)) + 1
            ann = canonicalise(raw, n, background=background, feature_fps=cfg.fps.feature,
                               source_fps=fps, log=RepairLog())
            videos.append((raw.handle, list(ann.labels), np.asarray(ann.lengths)))
        out[task] = videos
    return out


@dataclass(frozen=True)
class TimelineDataset:
    """The same interface as `synthetic.SyntheticDataset`: annotations (EgoProceL JSON in 1 fps
    feature frames), id2action, lengths, and `features(handle)` rendered on demand."""

    config: SyntheticConfig
    annotations: dict
    id2action: dict[int, str]
    lengths: dict[str, int]
    _videos: dict[str, _Video] = field(repr=False, compare=False)
    _look: dict = field(repr=False, compare=False)

    def _video(self, handle: str) -> _Video:
        try:
            return self._videos[handle]
        except KeyError:
            raise DataError("no such video in the EgoProceL-timeline data",
                            handle=handle) from None

    def latent(self, handle: str) -> np.ndarray:
        """(T, LATENT_DIM + CLUTTER_DIM) latent of every frame (see the module docstring)."""
        v, look = self._video(handle), self._look
        seed = self.config.seed
        rng = _rng(seed, v.index, 1)
        T, K = v.num_frames, len(v.labels)
        starts = np.cumsum(v.lengths) - v.lengths                               # (K,)
        seg = np.repeat(np.arange(K), v.lengths)                                # (T,)
        t = np.arange(T)
        rel = (t - starts[seg]) / np.maximum(v.lengths[seg] - 1, 1)             # (T,) in [0, 1]
        lab = v.labels[seg]                                                      # (T,)
        fg = lab != 0
        means = look["means"]                                                    # (A, L)
        z = means[lab] + (SEGMENT_STD * rng.standard_normal((K, LATENT_DIM)))[seg]
        # progress: a nonlinear code of the warped position, with this video's phases
        gamma = rng.lognormal(0.0, PACE_SIGMA)
        phases = PHASE_STD * rng.standard_normal(len(CODE_FREQS))               # (F,)
        q = rel ** gamma                                                          # (T,)
        code = np.sin(np.pi * np.outer(q, CODE_FREQS) + phases) * CODE_WEIGHTS  # (T, F)
        strength = rng.lognormal(0.0, STRENGTH_SIGMA, K)[seg]                    # (T,)
        prog = np.einsum("tf,tlf->tl", code, look["codes"][lab])                 # (T, L)
        z += (PROGRESS_SCALE * strength * fg)[:, None] * prog
        # background echoes its neighbouring actions, fading with the distance to them
        k_idx = np.arange(K)
        fg_k = v.labels != 0                                                      # (K,)
        last = np.maximum.accumulate(np.where(fg_k, k_idx, -1))                   # fg <= k
        first = np.minimum.accumulate(np.where(fg_k, k_idx, K)[::-1])[::-1]       # fg >= k
        prev_i = np.concatenate([[-1], last[:-1]])                                # fg < k
        next_i = np.concatenate([first[1:], [K]])                                 # fg > k
        prev_lab = np.where(prev_i >= 0, v.labels[prev_i.clip(0)], 0)            # (K,)
        next_lab = np.where(next_i < K, v.labels[next_i.clip(max=K - 1)], 0)     # (K,)
        ends = starts + v.lengths - 1
        w_prev = np.exp(-(t - starts[seg] + 1) / ECHO_FRAMES) * (prev_lab[seg] != 0)
        w_next = np.exp(-(ends[seg] - t + 1) / ECHO_FRAMES) * (next_lab[seg] != 0)
        echo = w_prev[:, None] * means[prev_lab[seg]] + w_next[:, None] * means[next_lab[seg]]
        z += (ECHO * ~fg)[:, None] * echo
        # slow drift of the whole video, and per-frame noise
        z += np.cumsum(DRIFT_STD * rng.standard_normal((T, LATENT_DIM)), axis=0)
        z += NOISE * rng.standard_normal((T, LATENT_DIM))
        # AR(1) along time, stationary from the first frame: y_t = a y_(t-1) + sqrt(1-a^2) e_t
        from scipy.signal import lfilter
        init = rng.standard_normal(CLUTTER_DIM)
        step = rng.standard_normal((T, CLUTTER_DIM))
        clutter = lfilter([np.sqrt(1 - CLUTTER_AR ** 2)], [1.0, -CLUTTER_AR], step, axis=0,
                          zi=(CLUTTER_AR * init)[None, :])[0]                      # (T, C)
        return np.concatenate([z, clutter], axis=1).astype(np.float32)

    def features(self, handle: str) -> np.ndarray:
        """(T, config.dim) float32, non-negative."""
        v = self._video(handle)
        z = self.latent(handle)
        rng = _rng(self.config.seed, v.index, 2)
        h = z @ self._look["proj"].T + self._look["bias"]                        # (T, dim)
        h += FEATURE_NOISE * rng.standard_normal(h.shape).astype(np.float32)
        return (rng.lognormal(0.0, GAIN_SIGMA) * np.maximum(h, 0.0)).astype(np.float32)

    def frames(self, handle: str) -> np.ndarray:
        raise DataError(FEATURES_ONLY, handle=handle)


FEATURES_ONLY = ("the EgoProceL-timeline data has the features layout only "
                 "(data.layout=features, --layout features)")


def require_features(layouts) -> None:
    """Refuse, before anything is generated, a layout other than features."""
    if any(layout != "features" for layout in layouts):
        raise DataError(FEATURES_ONLY)


def generate(cfg: SyntheticConfig) -> TimelineDataset:
    """The real EgoProceL timelines with this seed's appearance (`tasks`, `videos_per_task` do
    not apply: every video of every task is used)."""
    vocab = {int(k): name for k, name in read_vocabulary(RESOURCES / VOCABULARY).items()}
    timelines = real_timelines(cmu=cfg.cmu)
    num_labels = max(vocab) + 1
    look_rng = np.random.default_rng(np.random.SeedSequence([cfg.seed % 2**64, 7, 2**32 - 1]))
    width = LATENT_DIM + CLUTTER_DIM
    freqs = len(CODE_FREQS)
    shared = look_rng.standard_normal((1, LATENT_DIM, freqs))
    own = look_rng.standard_normal((num_labels, LATENT_DIM, freqs))
    look = {"means": MEAN_SCALE * look_rng.standard_normal((num_labels, LATENT_DIM)),
            "codes": (CODE_SHARED * shared + np.sqrt(1 - CODE_SHARED ** 2) * own)
            / np.sqrt(freqs),
            "proj": (look_rng.standard_normal((cfg.dim, width)) / np.sqrt(width)
                     ).astype(np.float32),
            "bias": (0.3 * look_rng.standard_normal(cfg.dim)).astype(np.float32)}
    annotations, lengths, videos = {}, {}, {}
    for task, items in timelines.items():
        rec = {"handles": [], "hdl_actions": [], "hdl_start_times": [], "hdl_end_times": []}
        for handle, labels, seg_lengths in items:
            starts = np.cumsum(seg_lengths) - seg_lengths
            rec["handles"].append(handle)
            rec["hdl_actions"].append(list(labels))
            rec["hdl_start_times"].append([int(s) for s in starts])
            rec["hdl_end_times"].append([int(s + n - 1) for s, n in zip(starts, seg_lengths)])
            ids = np.array([int(lab) if lab.isdigit() else 0 for lab in labels], dtype=np.int64)
            videos[handle] = _Video(len(videos), ids, np.asarray(seg_lengths, dtype=np.int64))
            lengths[handle] = int(np.sum(seg_lengths))
        annotations[task] = rec
    return TimelineDataset(cfg, annotations, vocab, lengths, videos, look)
