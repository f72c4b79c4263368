"""Crash-safe file writing: every file is written to a temporary sibling and renamed into place,
so that an interrupted run never leaves a half-written file under the final name."""

from __future__ import annotations

import errno
import json
import os
import stat
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, IO

import numpy as np


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file 0600; give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


MAX_TEXT_BYTES = 1 << 30


def read_user_text(path: Path) -> str:
    """A text file a user named (config, annotation, split, vocabulary, manifest), as UTF-8.

    A FIFO or device would block or never end, a folder is no file: each raises OSError with a
    one-line ``strerror``, like a missing file. UnicodeDecodeError propagates."""
    mode = os.stat(path).st_mode
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(errno.EISDIR, "a folder, not a file", str(path))
    if not stat.S_ISREG(mode):
        raise OSError(errno.EINVAL, "not a regular file (FIFO, device or socket)", str(path))
    if os.path.getsize(path) > MAX_TEXT_BYTES:
        raise OSError(errno.EFBIG, f"larger than {MAX_TEXT_BYTES >> 20} MiB", str(path))
    return Path(path).read_text(encoding="utf-8")


def fsync_file(path: Path) -> None:
    """Flush a written file to disk (before it is renamed into place)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_dir(tmp: Path, dest: Path) -> None:
    """Move the finished folder `tmp` to `dest`, replacing any folder there.

    Two renames: the old folder stays whole (under a hidden name beside it) until the new one is
    in place, and is put back if the second rename fails; it is deleted only afterwards."""
    tmp, dest = Path(tmp), Path(dest)
    if not dest.exists():
        os.rename(tmp, dest)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
    os.rename(dest, old / dest.name)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(old / dest.name, dest)
        shutil.rmtree(old, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_write(path, lambda fh: fh.write(data))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_npy(path: Path, array: np.ndarray) -> None:
    _atomic_write(path, lambda fh: np.save(fh, array, allow_pickle=False))


# ----------------------------------------------------------------------------------------------
# Reading untrusted JSON

JSON_MAX_DEPTH = 200


def _json_depth_exceeds(value: Any, limit: int) -> bool:
    """Whether `value` nests lists/objects deeper than `limit` (iterative: no recursion)."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > limit:
                return True
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children
                         if isinstance(child, (dict, list)))
    return False


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-finite number {name} is not allowed")


def load_json_text(text: str, fail: Callable[[str], BaseException], *,
                   max_depth: int = JSON_MAX_DEPTH, allow_nan: bool = False) -> Any:
    """`json.loads(text)` for files a user hands in: every failure is `raise fail(reason)`.

    `reason` is one short line (no traceback material): a syntax error with its line and
    column, nesting deeper than `max_depth` (which would otherwise be a RecursionError), an
    integer beyond Python's digit limit, or NaN/Infinity (unless `allow_nan`)."""
    try:
        kwargs = {} if allow_nan else {"parse_constant": _reject_constant}
        data = json.loads(text, **kwargs)
    except json.JSONDecodeError as exc:
        raise fail(f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise fail(f"nested deeper than {max_depth} levels") from None
    except ValueError as exc:
        msg = str(exc)
        if "integer string conversion" in msg or "digits" in msg:
            limit = getattr(sys, "get_int_max_str_digits", lambda: 4300)()
            raise fail(f"a number has more than {limit} digits") from None
        raise fail(msg.splitlines()[0] if msg else "invalid JSON value") from None
    if _json_depth_exceeds(data, max_depth):
        raise fail(f"nested deeper than {max_depth} levels")
    return data
