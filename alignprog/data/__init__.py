"""Dataset roots and the synthetic default -> padded single-task batches.

The names below are imported on first use (PEP 562): importing any module of this package, say
`alignprog.data.splits`, must not pull in torch through the batching module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> the module of this package that defines it
_EXPORTS = {
    "RepairLog": "annotations", "VideoAnnotation": "annotations",
    "Batch": "batching", "TaskBatchSampler": "batching", "make_loader": "batching",
    "make_loaders": "batching",
    "Dataset": "dataset", "Video": "dataset", "load_dataset": "dataset", "scan_arrays": "dataset",
    "Splits": "splits",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from alignprog.data.annotations import RepairLog, VideoAnnotation
    from alignprog.data.batching import Batch, TaskBatchSampler, make_loader, make_loaders
    from alignprog.data.dataset import Dataset, Video, load_dataset, scan_arrays
    from alignprog.data.splits import Splits


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'alignprog.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"alignprog.data.{module}"), name)
    globals()[name] = value   # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
