"""Reading video arrays from ``.npy`` files: the one reader of the dataset loader and of predict.

Two steps, so that a caller can refuse a file from its header before reading any data:

* `read_npy_header`: shape and dtype from the header alone. Only a regular file is opened (a
  FIFO would block forever), the file must hold every byte its header declares, Python objects
  are refused (nothing is ever unpickled), the dtype must be float16 or float32 in either byte
  order, and an optional bound on the frame count is checked.
* `load_float32`: the data as a float32 copy (never the memory map), refused when it holds
  NaN/Inf, naming the first bad frame.

Every problem is a one-line `DataError` naming the file.
"""

from __future__ import annotations

import math
import os
import stat
from pathlib import Path
from typing import Callable

import numpy as np

from alignprog.errors import DataError

ARRAY_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))


def read_npy_header(path: Path, *, max_frames: int | None = None,
                    setting: str = "max_frames", raise_with: str | None = None
                    ) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a float16/32 ``.npy`` file (either byte order) from its header.

    The file must hold all the data the header declares. With `max_frames`, a file of more
    frames (its first dimension) is refused; `setting` names the bound in the message and
    `raise_with` says how to raise it (default: `setting`). A missing file raises
    FileNotFoundError, so that each caller says "missing" in its own words."""
    where = str(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise DataError(f"cannot read ({exc.strerror or exc})", file=where) from None
    if not stat.S_ISREG(mode):  # a FIFO would block open() forever; a device/dir is nonsense
        raise DataError("not a regular file (FIFO, device, socket or folder); refusing to open it",
                        file=where)
    try:
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                      else np.lib.format.read_array_header_2_0)
            shape, _fortran, dtype = reader(fh)
            offset = fh.tell()
    except FileNotFoundError:
        raise
    except (OSError, ValueError, SyntaxError) as exc:
        raise DataError(f"not a readable .npy array ({exc})".replace("\n", " "),
                        file=where) from None
    if dtype.hasobject:
        raise DataError("holds Python objects; only float16/float32 arrays are read "
                        "(never unpickled)", file=where)
    if any(s < 0 for s in shape):
        raise DataError(f"invalid shape {tuple(shape)} in the .npy header", file=where)
    expected = offset + math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    actual = os.path.getsize(path)
    if actual < expected:
        raise DataError(f"truncated array: header says {shape} {dtype} ({expected} bytes with "
                        f"header) but the file has {actual} bytes", file=where)
    if dtype.newbyteorder("=") not in ARRAY_DTYPES:  # big-endian is read as well
        raise DataError(f"dtype {dtype}: arrays must be float16 or float32", file=where)
    if max_frames is not None and shape and shape[0] > max_frames:
        raise DataError(f"{shape[0]} frames, more than {setting} = {max_frames} (raise it with "
                        f"{raise_with or setting} if the video is real)", file=where)
    return tuple(int(s) for s in shape), dtype


def open_npy(path: Path) -> np.ndarray:
    """The array of a ``.npy`` file, memory-mapped (only the frames read are paged in) and never
    unpickled. Check the file with `read_npy_header` first."""
    return np.load(path, mmap_mode="r", allow_pickle=False)


def load_float32(read: Callable[[], np.ndarray], *, file: str | None = None,
                 task: str | None = None, handle: str | None = None) -> np.ndarray:
    """``read()``'s array (T, ...) as a float32 copy, never a memory map, checked for NaN/Inf.

    `read` opens the array (e.g. ``lambda: open_npy(path)``), so that a failure to open it and a
    failure to read its data are both one `DataError` located by `file`, `task` and `handle`."""
    where = dict(file=file, task=task, handle=handle)
    try:
        array = np.array(read(), dtype=np.float32)  # a copy, never the memmap
    except (OSError, ValueError, EOFError) as exc:
        raise DataError(f"truncated or unreadable array ({exc})", **where) from None
    if not np.isfinite(array).all():
        rows = array.reshape(array.shape[0] if array.ndim else 1, -1)            # (T, F)
        first = int(np.flatnonzero(~np.isfinite(rows).all(axis=1))[0])
        raise DataError(f"contains NaN/Inf values (first at frame {first})", **where)
    return array
