"""metrics_step.csv and metrics_epoch.csv beside a run's metrics.jsonl (`train.csv_metrics`).

One row per logged step and per epoch, for spreadsheets and plotting tools. Nested values are
flattened to dotted columns (`val_progress_mae.head`); the columns are every key the kind's
records have had, in the order they first came (a record with a new key, e.g. the head stage's
`stage`, rewrites the file with one more column). Resuming rebuilds both files from
metrics.jsonl, cut at the resumed step like it.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

from alignprog.fileio import atomic_write_text

KINDS = ("step", "epoch")


def csv_path(run_dir: Path, kind: str) -> Path:
    return Path(run_dir) / f"metrics_{kind}.csv"


def flatten(record: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys; lists as JSON text; None as an empty cell; NaN as 'nan'."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out |= flatten(value, name + ".")
        elif isinstance(value, (list, tuple)):
            out[name] = json.dumps(value)
        elif value is None:
            out[name] = ""
        elif isinstance(value, float) and math.isnan(value):
            out[name] = "nan"
        else:
            out[name] = value
    return out


def _rows(columns: list[str], rows: Iterable[Mapping[str, Any]], header: bool) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", restval="",
                            lineterminator="\n")
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def append(run_dir: Path, kind: str, record: Mapping[str, Any]) -> None:
    """One row for `record` (a step or epoch record); other kinds are not written."""
    if kind not in KINDS:
        return
    path = csv_path(run_dir, kind)
    row = flatten(record)
    if not path.is_file() or path.stat().st_size == 0:
        atomic_write_text(path, _rows(list(row), [row], header=True))
        return
    with open(path, encoding="utf-8", newline="") as fh:
        reader = csv.DictReader(fh)
        columns = list(reader.fieldnames or [])
        new = [k for k in row if k not in columns]
        old_rows = list(reader) if new else []
    if new:   # a column more: the whole file again, the old rows with empty cells there
        atomic_write_text(path, _rows(columns + new, old_rows + [row], header=True))
        return
    with open(path, "a", encoding="utf-8", newline="") as fh:
        fh.write(_rows(columns, [row], header=False))
        fh.flush()


def rebuild(run_dir: Path, records: Iterable[Mapping[str, Any]]) -> None:
    """Both files anew from metrics.jsonl's records (on resume); a kind without records has
    no file."""
    by_kind: dict[str, list[dict[str, Any]]] = {kind: [] for kind in KINDS}
    for record in records:
        kind = record.get("kind")
        if kind in by_kind:
            by_kind[kind].append(flatten({k: v for k, v in record.items() if k != "kind"}))
    for kind, rows in by_kind.items():
        path = csv_path(run_dir, kind)
        if rows:
            columns = list(dict.fromkeys(k for row in rows for k in row))
            atomic_write_text(path, _rows(columns, rows, header=True))
        elif path.is_file():
            path.unlink()
