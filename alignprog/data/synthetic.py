"""The embedded synthetic procedural-activity dataset, used when no dataset is named.

Targets are EgoProceL's statistics (docs/data.md#egoprocel-statistics, #synthetic-dataset),
scaled down to a small default (4 tasks x 20 videos of roughly 100-400 frames at "1 fps").
`generate` draws only the annotations; a video's arrays are rendered on demand from generators
keyed by (seed, task, video, stream), never global RNG state, so they are the same whatever the
order or number of calls.

Latent model (LATENT_DIM dims) of frame t in segment k with label a:
    foreground:  z_t = m_a + PROGRESS_SCALE * p_t * d_a + s_k + FG_NOISE * e_t,  p_t in [0, 1]
    background:  z_t = m_0                               + s_k + BG_NOISE * e_t
with p_t the relative position inside the segment (so the visual state moves monotonically through
every action), s_k a per-segment offset (no two executions look alike), then a per-video camera
offset. `features` = gain_v * relu(W z + b + noise) with W fixed by cfg.seed only, so values look
like pooled ReLU activations; `frames` renders the same latent through per-latent spatial patterns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from alignprog.config import SyntheticConfig
from alignprog.errors import DataError

LATENT_DIM = 32
VOCAB_SIZE = (4, 8)  # distinct actions per task, inclusive (EgoProceL: 4-17; kept small)
# A few ids are shared across tasks (chop_vegetables occurs in six EgoProceL tasks).
SHARED_ACTIONS = ("wash_hands", "wipe_counter", "fetch_tool")
P_SHARED = 0.35  # chance that a task uses a given shared action
VERBS = ("pour", "cut", "mix", "stir", "fold", "attach", "open", "close", "peel", "spread",
         "screw", "insert", "remove", "place", "heat", "press")
P_OPTIONAL, P_SKIP = 0.3, 0.4  # share of steps that are optional; chance an optional one is skipped
SWAP_RANGE = (0.05, 0.2)  # per-task chance of swapping adjacent steps (EgoProceL: 0-0.3)
REPEAT_RANGE = (0.1, 0.45)  # per-action chance of each extra occurrence (geometric)
MAX_OCCURRENCES = 8  # EgoProceL-like: 1-4 occurrences, heavy tail up to ~8
P_DIRECT = 0.06  # per fg->fg gap; about 3% of all label transitions (as EgoProceL)
BG_RANGE = (0.35, 0.65)  # per-task background fraction (EgoProceL: 0.2-0.85; narrowed)
BG_JITTER = 0.05  # per-video spread of the background fraction around the task's
FIRST_BG, LAST_BG = 0.14, 0.09  # EgoProceL's median first / last background share of a video
# Foreground durations in frames: log-normal (as EgoProceL's). The per-video speed and per-segment
# factors make the same action's length vary strongly between videos (CV ~0.8), so counting
# frames alone does not tell progress.
FG_MEDIAN, TASK_SIGMA, ACTION_SIGMA = 12.0, 0.2, 0.4
SPEED_SIGMA, SEGMENT_SIGMA = 0.4, 0.8
MIN_FG = 2
# Drawn video lengths are squashed smoothly into this range (frames) by rescaling the whole video,
# i.e. by adjusting its speed factor: keeps the default videos at roughly 100-400 frames.
LENGTH_RANGE = (60.0, 500.0)
# Appearance, in latent units (per-dimension stds).
MEAN_SCALE = 0.7  # std of the per-action latent means
PROGRESS_SCALE = 6.0  # length of the monotonic state change through an action
# Share of each action's progress direction common to all actions (hands approach, objects end
# up finished), so part of progress reads the same way in every action.
PROGRESS_SHARED = 0.7
FG_SEGMENT, BG_SEGMENT = 0.4, 0.8  # per-segment offset std: background is more varied...
FG_NOISE, BG_NOISE = 0.6, 0.9  # ...and noisier per frame
CAMERA, GAIN_SIGMA = 0.5, 0.25  # per-video latent offset std; log-std of the per-video gain
FEATURE_NOISE = 0.3  # per-dimension noise before the ReLU
FRAME_CHUNK = 64  # frames rendered at once by `frames`, bounding the (chunk, C, L) temporary

_ALL = 2**32 - 1  # key slot meaning "not a particular task / video"


def _rng(seed: int, task: int, video: int, stream: int) -> np.random.Generator:
    # seed % 2**64 maps negative seeds to distinct non-negative entropy (SeedSequence needs >= 0).
    return np.random.default_rng(np.random.SeedSequence([seed % 2**64, task, video, stream]))


@dataclass(frozen=True)
class _Video:
    task_index: int
    video_index: int
    labels: np.ndarray  # (K,) int action ids, 0 = background
    lengths: np.ndarray  # (K,) canonical segment lengths, all >= 1

    @property
    def num_frames(self) -> int:
        return int(self.lengths.sum())


@dataclass(frozen=True)
class _Look:
    """Everything shared by all videos of one seed: appearance and the two renderers."""

    means: np.ndarray  # (A, L) per-action latent mean, row 0 = background
    dirs: np.ndarray  # (A, L) per-action unit direction of progress
    proj: np.ndarray  # (dim, L) feature projection
    bias: np.ndarray  # (dim,)
    chan: np.ndarray  # (C, L) frame channel projection
    chan_bias: np.ndarray  # (C,)
    patterns: np.ndarray  # (L, S*S) spatial pattern of each latent


@dataclass(frozen=True)
class SyntheticDataset:
    """Annotations drawn by `generate`; `features` and `frames` render one video on demand."""

    config: SyntheticConfig
    annotations: dict  # EgoProceL-format JSON object, tasks in index order
    id2action: dict[int, str]  # 0 -> "background"
    lengths: dict[str, int]  # handle -> number of frames T
    _videos: dict[str, _Video] = field(repr=False, compare=False)
    _look: _Look = field(repr=False, compare=False)

    def _video(self, handle: str) -> _Video:
        try:
            return self._videos[handle]
        except KeyError:
            raise DataError("no such video in the synthetic dataset", handle=handle) from None

    def _latent(self, video: _Video) -> tuple[np.ndarray, float]:
        """(T, L) latent of every frame and the video's gain; shared by `features` and `frames`."""
        look, T = self._look, video.num_frames
        rng = _rng(self.config.seed, video.task_index, video.video_index, 1)
        K = len(video.labels)
        starts = np.cumsum(video.lengths) - video.lengths  # (K,)
        seg = np.repeat(np.arange(K), video.lengths)  # (T,) segment of each frame
        rel = (np.arange(T) - starts[seg]) / np.maximum(video.lengths[seg] - 1, 1)  # (T,) in [0, 1]
        lab = video.labels[seg]  # (T,)
        fg = lab != 0  # (T,)
        z = look.means[lab] + (PROGRESS_SCALE * rel * fg)[:, None] * look.dirs[lab]  # (T, L)
        seg_std = np.where(video.labels != 0, FG_SEGMENT, BG_SEGMENT)  # (K,)
        z += (seg_std[:, None] * rng.standard_normal((K, LATENT_DIM)))[seg]  # (T, L)
        z += np.where(fg, FG_NOISE, BG_NOISE)[:, None] * rng.standard_normal((T, LATENT_DIM))
        z += CAMERA * rng.standard_normal(LATENT_DIM)  # camera offset, same for the whole video
        return z.astype(np.float32), float(rng.lognormal(0.0, GAIN_SIGMA))

    def features(self, handle: str) -> np.ndarray:
        """(T, config.dim) float32, non-negative."""
        video = self._video(handle)
        z, gain = self._latent(video)  # (T, L)
        rng = _rng(self.config.seed, video.task_index, video.video_index, 2)
        h = z @ self._look.proj.T + self._look.bias  # (T, dim)
        h += FEATURE_NOISE * rng.standard_normal(h.shape, dtype=np.float32)
        return gain * np.maximum(h, 0.0)

    def frames(self, handle: str) -> np.ndarray:
        """(T, C, S, S) float32, non-negative; C = config.frame_channels, S = config.frame_size."""
        video = self._video(handle)
        z, gain = self._latent(video)  # (T, L)
        look, cfg = self._look, self.config
        C, S, T = cfg.frame_channels, cfg.frame_size, video.num_frames
        rng = _rng(cfg.seed, video.task_index, video.video_index, 3)
        noise = FEATURE_NOISE * rng.standard_normal((T, C), dtype=np.float32)  # per frame+channel
        out = np.empty((T, C, S * S), dtype=np.float32)
        for t0 in range(0, T, FRAME_CHUNK):
            zc = z[t0:t0 + FRAME_CHUNK]  # (t, L)
            a = zc[:, None, :] * look.chan  # (t, C, L)
            x = a.reshape(-1, LATENT_DIM) @ look.patterns  # (t*C, S*S)
            x = x.reshape(len(zc), C, S * S)  # (t, C, S*S)
            x += (look.chan_bias + noise[t0:t0 + FRAME_CHUNK])[..., None]
            out[t0:t0 + FRAME_CHUNK] = gain * np.maximum(x, 0.0)
        return out.reshape(T, C, S, S)


def _make_look(cfg: SyntheticConfig, num_actions: int) -> _Look:
    # One stream per part, and rows drawn in id / dimension order, so that e.g. more tasks or a
    # larger `dim` extend these arrays without changing what existing actions and dims look like.
    streams = [_rng(cfg.seed, _ALL, _ALL, k) for k in range(4)]
    L, S = LATENT_DIM, cfg.frame_size
    unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    means = MEAN_SCALE * streams[0].standard_normal((num_actions, L))  # (A, L)
    common = unit(streams[1].standard_normal(L))  # (L,)
    own = unit(streams[1].standard_normal((num_actions, L)))  # (A, L)
    dirs = unit(PROGRESS_SHARED * common + np.sqrt(1 - PROGRESS_SHARED**2) * own)  # (A, L)
    # 1/sqrt(L) keeps pre-activations ~unit scale; the negative bias makes them sparse like ReLU.
    wb = streams[2].standard_normal((cfg.dim, L + 1))  # (dim, L+1)
    proj, bias = wb[:, :L] / np.sqrt(L), 0.3 * wb[:, L] - 0.3
    cb = streams[3].standard_normal((cfg.frame_channels, L + 1))  # (C, L+1)
    chan, chan_bias = cb[:, :L] / np.sqrt(L), 0.3 * cb[:, L] - 0.3
    # Each latent owns a smooth separable spatial pattern: cosines of 0-2 cycles per axis.
    grid = (np.arange(S) + 0.5) / S  # (S,)
    freq, phase = streams[3].integers(0, 3, (2, L)), streams[3].uniform(0, 2 * np.pi, (2, L))
    wave = np.cos(2 * np.pi * freq[..., None] * grid + phase[..., None])  # (2, L, S)
    patterns = wave[0][:, :, None] * wave[1][:, None, :]  # (L, S, S)
    patterns /= np.sqrt((patterns**2).mean(axis=(1, 2), keepdims=True)) + 1e-6
    f32 = lambda x: np.ascontiguousarray(x, dtype=np.float32)  # noqa: E731
    return _Look(f32(means), f32(dirs), f32(proj), f32(bias), f32(chan), f32(chan_bias),
                 f32(patterns.reshape(L, S * S)))


def _squash(total: float) -> float:
    """Map a length smoothly into LENGTH_RANGE (tanh in log space; near-identity mid-range)."""
    lo, hi = np.log(LENGTH_RANGE)
    mid, half = (lo + hi) / 2, (hi - lo) / 2
    return float(np.exp(mid + half * np.tanh((np.log(total) - mid) / half)))


def _draw_video(rng: np.random.Generator, order: list[int], optional: np.ndarray, p_swap: float,
                p_repeat: dict[int, float], median: dict[int, float], bg_fraction: float
                ) -> tuple[np.ndarray, np.ndarray]:
    """(labels, lengths) of one video: canonical segments, background first and last."""
    steps = [a for a, opt in zip(order, optional) if not (opt and rng.random() < P_SKIP)]
    if len(steps) < 2:
        steps = list(order)
    i = 0
    while i < len(steps) - 1:  # adjacent swaps, never overlapping, so order stays near canonical
        if rng.random() < p_swap:
            steps[i], steps[i + 1] = steps[i + 1], steps[i]
            i += 1
        i += 1
    seq = list(steps)
    for a in steps:  # repeats: extra occurrences later in the video (like chop_vegetables)
        extra = min(int(rng.geometric(1.0 - p_repeat[a])) - 1, MAX_OCCURRENCES - 1)
        for _ in range(extra):
            seq.insert(int(rng.integers(seq.index(a) + 1, len(seq) + 1)), a)
    labels = np.array(seq)  # (n,)
    n = len(labels)
    speed = rng.lognormal(0.0, SPEED_SIGMA)
    base = np.array([median[a] for a in seq])  # (n,)
    fg = base * speed * rng.lognormal(0.0, SEGMENT_SIGMA, n)  # (n,)
    # Gaps between consecutive actions: background unless a (rare) direct transition; equal
    # labels are never adjacent (as in EgoProceL).
    direct = (rng.random(n - 1) < P_DIRECT) & (labels[1:] != labels[:-1])  # (n-1,)
    f = np.clip(bg_fraction + BG_JITTER * rng.standard_normal(), 0.2, 0.8)
    fg *= _squash(fg.sum() / (1.0 - f)) * (1.0 - f) / fg.sum()
    fg = np.maximum(MIN_FG, np.round(fg))
    total = fg.sum() / (1.0 - f)
    bg = total - fg.sum()
    ends = np.array([FIRST_BG, LAST_BG]) * total * rng.lognormal(0.0, 0.3, 2)  # (2,)
    m = int((~direct).sum())
    if m == 0:  # every gap is direct: the ends take all the background
        ends *= bg / ends.sum()
    elif ends.sum() > 0.7 * bg:  # keep at least 30% of the background between actions
        ends *= 0.7 * bg / ends.sum()
    inner = (bg - ends.sum()) * rng.dirichlet(np.full(m, 2.0)) if m else np.zeros(0)  # (m,)
    gaps = np.zeros(n - 1)
    gaps[~direct] = inner
    # Interleave: bg, a1, gap1, a2, ..., a_n, bg; direct gaps vanish.
    out_labels, out_lengths = [0], [ends[0]]
    for k in range(n):
        out_labels.append(int(labels[k]))
        out_lengths.append(fg[k])
        if k < n - 1 and not direct[k]:
            out_labels += [0]
            out_lengths += [gaps[k]]
    out_labels.append(0)
    out_lengths.append(ends[1])
    lengths = np.maximum(1, np.round(out_lengths)).astype(np.int64)  # (K,)
    return np.array(out_labels, dtype=np.int64), lengths


def generate(cfg: SyntheticConfig) -> SyntheticDataset:
    """The dataset of `cfg`: drawn procedures, or the real EgoProceL timelines
    (`cfg.timelines`, `alignprog.data.timelines`)."""
    if cfg.timelines == "egoprocel":
        from alignprog.data.timelines import generate as generate_timelines
        return generate_timelines(cfg)
    return _generate(cfg)


def _generate(cfg: SyntheticConfig) -> SyntheticDataset:
    """Draw the annotations of every video; arrays are rendered later by the dataset's methods."""
    id2action: dict[int, str] = {0: "background"}
    shared_ids: dict[str, int] = {}
    annotations: dict[str, dict] = {}
    videos: dict[str, _Video] = {}

    def new_id(name: str) -> int:
        id2action[len(id2action)] = name
        return len(id2action) - 1

    for t in range(cfg.tasks):
        rng = _rng(cfg.seed, t, _ALL, 0)
        size = int(rng.integers(VOCAB_SIZE[0], VOCAB_SIZE[1] + 1))
        shared = [s for s in SHARED_ACTIONS if rng.random() < P_SHARED][: size - 2]
        verbs = rng.choice(VERBS, size - len(shared), replace=False)
        order = [new_id(f"t{t}_{v}") for v in verbs]
        for s in shared:  # a shared step takes a random place in this task's canonical order
            if s not in shared_ids:
                shared_ids[s] = new_id(s)
            order.insert(int(rng.integers(0, len(order) + 1)), shared_ids[s])
        optional = rng.random(size) < P_OPTIONAL  # (size,)
        p_swap = rng.uniform(*SWAP_RANGE)
        p_repeat = {a: rng.uniform(*REPEAT_RANGE) for a in order}
        task_median = FG_MEDIAN * rng.lognormal(0.0, TASK_SIGMA)
        median = {a: task_median * rng.lognormal(0.0, ACTION_SIGMA) for a in order}
        bg_fraction = rng.uniform(*BG_RANGE)

        name = f"synth_t{t}"
        record: dict[str, list] = {"handles": [], "hdl_actions": [], "hdl_start_times": [],
                                   "hdl_end_times": []}
        for v in range(cfg.videos_per_task):
            labels, lengths = _draw_video(_rng(cfg.seed, t, v, 0), order, optional, p_swap,
                                          p_repeat, median, bg_fraction)
            handle = f"{name}_v{v:02d}"
            starts = np.cumsum(lengths) - lengths  # (K,)
            T = int(lengths.sum())
            # JSON form (docs/data.md#annotation-json): shared boundaries, end[k] == start[k+1],
            # last end == T-1.
            record["handles"].append(handle)
            record["hdl_actions"].append([str(a) for a in labels])
            record["hdl_start_times"].append([int(s) for s in starts])
            record["hdl_end_times"].append([int(s) for s in starts[1:]] + [T - 1])
            videos[handle] = _Video(t, v, labels, lengths)
        annotations[name] = record

    return SyntheticDataset(
        config=cfg,
        annotations=annotations,
        id2action=id2action,
        lengths={h: v.num_frames for h, v in videos.items()},
        _videos=videos,
        _look=_make_look(cfg, len(id2action)),
    )
