"""Shared test helpers (`from helpers import ...`): the tiny training config and model, small
dataset roots written in tmp_path, hand-made annotations, float64 loop references."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from alignprog.config import DataConfig, ModelConfig, ProgressConfig, SyntheticConfig
from alignprog.data import Dataset, VideoAnnotation, load_dataset
from alignprog.models import AlignmentModel, build_model

# The real EgoProceL annotation file and its vocabulary, shipped with the package
# (alignprog/data/resources/README.md).
TEST_DATA = Path(__file__).resolve().parents[1] / "alignprog" / "data" / "resources"


# The tiny model and synthetic data of the training tests: a fit takes seconds on a CPU.
TINY = {
    "data.synthetic.tasks": 2, "data.synthetic.videos_per_task": 6, "data.synthetic.dim": 16,
    "model.conv_channels": 32, "model.output_dim": 16, "model.head_layers": [16, 8, 16],
    "model.attn_layers": [16, 8], "model.drop_layers": [16, 8],
    "progress.learnable.hidden_dim": 8, "train.log_every": 1, "train.device": "cpu",
}


# TINY as CLI flags: --set KEY=VALUE for each
SETS_TINY = [a for k, v in TINY.items() for a in ("--set", f"{k}={json.dumps(v)}")]


def tiny_section(section: str) -> dict:
    """TINY's keys of one config section, without the section prefix."""
    return {k.split(".", 1)[1]: v for k, v in TINY.items() if k.startswith(section + ".")}


def tiny_run(root: Path, steps: int):
    """`root/r`: a run of the TINY config trained `steps` steps; (its path, the fit result,
    the config)."""
    from alignprog.config import load_config
    from alignprog.training import RunDir
    from alignprog.training.loop import fit

    cfg = load_config(overrides=TINY | {"train.steps": steps})
    return root / "r", fit(cfg, run=RunDir.create(root, "r")), cfg


def tiny_synthetic() -> Dataset:
    """The synthetic dataset of the TINY config: 2 tasks x 6 videos of 16-wide features."""
    synthetic = {k.split(".", 1)[1]: v for k, v in tiny_section("data").items()
                 if k.startswith("synthetic.")}
    return load_dataset(DataConfig(synthetic=SyntheticConfig(**synthetic)))


def tiny_model(num_tasks: int = 2) -> AlignmentModel:
    """An untrained model of the TINY widths on 16-wide features (seed torch first)."""
    return build_model(ModelConfig(**tiny_section("model")), ProgressConfig(),
                       input_shape=(TINY["data.synthetic.dim"],), num_tasks=num_tasks)


def stderr_of(result) -> str:
    """A CliRunner result's stderr (older Click runners mix it into the output)."""
    try:
        return result.stderr
    except (ValueError, AttributeError):
        return result.output


BG = frozenset({"0", "SIL", "background"})


def annotation(segments: list[tuple[str, int]], task: str = "t", handle: str = "v"
               ) -> VideoAnnotation:
    """Canonical segments from (label, length) runs; '0' is background."""
    starts, ends, pos = [], [], 0
    for _, n in segments:
        starts.append(pos)
        pos += n
        ends.append(pos - 1)
    return VideoAnnotation(task, handle, pos, tuple(lab for lab, _ in segments), tuple(starts),
                           tuple(ends), BG)


def loop_intra_contrast(u, window: int, margin: float, compat: str) -> float:
    """C(U) of docs/algorithms.md#intra-video-regulariser in loop form, float64; u: (T, D) rows
    (tensor, array or lists). Push sum_ab (1 - y) w max(0, margin - d); in-window y w margin
    ("reference", docs/reference-bugs.md#lav-regulariser-constant-pull) or the paper's pull
    y w d ("fixed"); w = (a - b)^2 + 1, y = [|a - b| < window]."""
    rows = u.tolist() if hasattr(u, "tolist") else [list(map(float, r)) for r in u]
    total = 0.0
    for a in range(len(rows)):
        for b in range(len(rows)):
            d = math.sqrt(sum((p - q) ** 2 for p, q in zip(rows[a], rows[b])))
            w = (a - b) ** 2 + 1
            if abs(a - b) < window:
                total += w * (margin if compat == "reference" else d)
            else:
                total += w * max(0.0, margin - d)
    return total


def clip(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """torch.clamp as the reference's PyTorch differentiated it: gradient 1 inside the bounds
    and on them (PyTorch 2.14's torch.clamp gives 0 on them)."""
    return torch.where((x >= lo) & (x <= hi), x, x.detach().clamp(lo, hi))


def reference_gmm_fit(p: torch.Tensor, k: int, steps: int = 8
                      ) -> tuple[float, torch.Tensor, torch.Tensor]:
    """GTCC's GMM fit (docs/algorithms.md#gtcc-mixture-fit) of one vector p (M,), written
    out: the parameters, the components, the symmetric KL and torch.optim.LBFGS (lr 0.5,
    max_iter 4, history 10, strong Wolfe), in p's dtype. Returns (final J, G (k, M), pi (k,))."""
    dtype, m_len = p.dtype, len(p)
    means = torch.tensor([1 + i * (m_len - 2) / k for i in range(k)], dtype=dtype,
                         requires_grad=True)
    variances = torch.full((k,), float(m_len), dtype=dtype, requires_grad=True)
    logits = torch.ones(k, dtype=dtype, requires_grad=True)
    opt = torch.optim.LBFGS([means, variances, logits], lr=0.5, max_iter=4, history_size=10,
                            line_search_fn="strong_wolfe")
    m = torch.arange(m_len, dtype=dtype)

    def parts() -> tuple[torch.Tensor, torch.Tensor]:
        mu, var = clip(means, 0, m_len - 1), clip(variances, 0.5, float("inf"))
        g = torch.exp(-(m[None, :] - mu[:, None]) ** 2 / (2 * var[:, None]))
        return g / g.sum(-1, keepdim=True), torch.softmax(logits, 0)

    def objective() -> torch.Tensor:
        g, pi = parts()
        q = pi @ g
        return ((p * (torch.log(p + 1e-30) - torch.log(q + 1e-30))).sum()
                + (q * (torch.log(q + 1e-30) - torch.log(p + 1e-30))).sum())

    def closure():
        opt.zero_grad()
        j = objective()
        j.backward()
        return j

    for _ in range(steps):
        opt.step(closure)
    with torch.no_grad():
        return (float(objective()), *parts())


def write_root(root: Path, annotations: dict, lengths: dict[str, int], *, dim: int = 8,
               dtype=np.float32, vocab: dict[int, str] | None = None, seed: int = 0) -> Path:
    """A dataset root with random features of the given lengths."""
    rng = np.random.default_rng(seed)
    (root / "features").mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(annotations))
    if vocab is not None:
        (root / "id2action.txt").write_text("".join(f"{i} {n}\n" for i, n in vocab.items()))
    for handle, n in lengths.items():
        np.save(root / "features" / f"{handle}.npy", rng.normal(size=(n, dim)).astype(dtype))
    return root


def tiny_annotations() -> tuple[dict, dict[str, int]]:
    """2 tasks x 3 videos with shared-boundary segments; lengths = last end + 1."""
    ann, lengths = {}, {}
    for t, (task, acts) in enumerate([("cook", ["1", "2", "3"]), ("build", ["4", "5"])]):
        rec = {"handles": [], "hdl_actions": [], "hdl_start_times": [], "hdl_end_times": []}
        for v in range(3):
            handle = f"{task}_{v}"
            labels, starts, ends, pos = [], [], [], 0
            for k, a in enumerate(acts):
                for lab, n in (("0", 3 + v), (a, 4 + 2 * k + v)):
                    labels.append(lab)
                    starts.append(pos)
                    pos += n
                    ends.append(pos)
            labels.append("0")
            starts.append(pos)
            ends.append(pos + 3)
            rec["handles"].append(handle)
            rec["hdl_actions"].append(labels)
            rec["hdl_start_times"].append(starts)
            rec["hdl_end_times"].append(ends)
            lengths[handle] = ends[-1] + 1
        ann[task] = rec
    return ann, lengths
