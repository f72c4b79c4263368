"""Dataset roots and the synthetic default -> padded single-task batches."""

from alignprog.data.annotations import RepairLog, VideoAnnotation
from alignprog.data.batching import Batch, TaskBatchSampler, make_loader, make_loaders
from alignprog.data.dataset import Dataset, Video, load_dataset, scan_arrays
from alignprog.data.splits import Splits

__all__ = ["Batch", "Dataset", "RepairLog", "Splits", "TaskBatchSampler", "Video",
           "VideoAnnotation", "load_dataset", "make_loader", "make_loaders", "scan_arrays"]
