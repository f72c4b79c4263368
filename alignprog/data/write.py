"""Writing a dataset root (``alignprog data synth``): the same layout every loader reads."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from alignprog.config import DataConfig
from alignprog.data.splits import random_split, write_splits
from alignprog.errors import DataError
from alignprog.fileio import (atomic_save_npy, atomic_write_json, atomic_write_text,
                              replace_dir)


# Written into every `data synth` output: --overwrite replaces only a folder that has it.
DATASET_MARKER = ".alignprog-dataset"


def write_synthetic_root(cfg: DataConfig, out_dir: Path, *, layouts: Iterable[str],
                         dtype: str = "float32", overwrite: bool = False,
                         progress: Callable[[int, int], None] | None = None) -> int:
    """Generate the synthetic dataset of ``cfg.synthetic`` and write it as a dataset root.

    Writes ``dataset.json``, ``id2action.txt``, ``splits.json`` (``cfg.split`` fractions and
    seed) and ``<layout>/<handle>.npy``. Everything goes to a temporary sibling folder that is
    renamed into place at the end, so an interrupted run leaves no half-written dataset.
    Returns the number of videos. ``progress(done, total)`` is called after each video.
    """
    from alignprog.data.synthetic import generate

    out_dir = Path(out_dir)
    layouts = list(dict.fromkeys(layouts))
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError("output exists and is not a directory; choose another --out",
                        file=str(out_dir))
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not overwrite:
            raise DataError("output exists and is not empty (pass --overwrite to replace it)",
                            file=str(out_dir))
        if not (out_dir / DATASET_MARKER).is_file():
            raise DataError(f"refusing to overwrite {out_dir}: not written by alignprog (no "
                            f"{DATASET_MARKER}); delete it yourself or choose another --out",
                            file=str(out_dir))
    if cfg.synthetic.timelines == "egoprocel":
        from alignprog.data.timelines import require_features
        require_features(layouts)
    synth = generate(cfg.synthetic)
    handles = [(task, h) for task, rec in synth.annotations.items() for h in rec["handles"]]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        atomic_write_json(tmp / DATASET_MARKER, {"format": "alignprog-dataset"})
        atomic_write_json(tmp / "dataset.json", synth.annotations)
        atomic_write_text(tmp / "id2action.txt",
                          "".join(f"{i} {name}\n" for i, name in sorted(synth.id2action.items())))
        task_handles = {task: list(rec["handles"]) for task, rec in synth.annotations.items()}
        write_splits(random_split(task_handles, train=cfg.split.train, val=cfg.split.val,
                                  test=cfg.split.test, seed=cfg.split.seed), tmp / "splits.json")
        for done, (_task, handle) in enumerate(handles, 1):
            for layout in layouts:
                array = synth.features(handle) if layout == "features" else synth.frames(handle)
                atomic_save_npy(tmp / layout / f"{handle}.npy", array.astype(np.dtype(dtype)))
            if progress is not None:
                progress(done, len(handles))
        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return len(handles)
