"""Shared fixtures: small dataset roots written in tmp_path."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

# The project's shared/ folder lies beside the repository (as in CI); ALIGNPROG_SHARED overrides.
SHARED_DATA = Path(os.environ.get("ALIGNPROG_SHARED",
                                  Path(__file__).resolve().parents[2] / "shared")) / "data"


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


@pytest.fixture
def tiny_root(tmp_path: Path) -> Path:
    ann, lengths = tiny_annotations()
    vocab = {0: "background", 1: "a", 2: "b", 3: "c", 4: "d", 5: "e"}
    return write_root(tmp_path / "tiny", ann, lengths, vocab=vocab)
