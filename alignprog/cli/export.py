"""`alignprog export`: a run's trained model as a safetensors export directory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from alignprog.cli.common import console, dtype_choice, fail, guarded

EPILOG = ("Examples:\n\n  alignprog export runs/lav-20250101-120000 --out exports/lav\n\n"
          "  alignprog export runs/my-run --out exports/my-run-bf16 --checkpoint last "
          "--dtype bf16 --overwrite\n\n"
          "  alignprog export runs/my-run --out exports/step-500 --checkpoint step-00000500 --json")


@guarded
def export(
    run_dir: Annotated[Path, typer.Argument(help="The run directory (runs/NAME).",
                                            show_default=False)],
    out: Annotated[Path, typer.Option(
        "--out", help="Directory to write model.safetensors, config.json and README.md to.",
        show_default=False)],
    checkpoint: Annotated[str, typer.Option(
        help="best (falls back to the latest), last, or a checkpoint directory (a path, or a "
        "name under the run's checkpoints/, e.g. step-00000500).")] = "best",
    dtype: Annotated[str, typer.Option(
        help="Storage dtype of the floating-point weights: fp32 is exact, bf16/fp16 halve the "
        "file (alignprog.load upcasts them to fp32).", **dtype_choice("fp32", "bf16", "fp16"))
    ] = "fp32",
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace an existing export in --out (a folder that is not an "
        "alignprog export is never replaced).")] = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print the written paths and the config as JSON.")] = False,
) -> None:
    """Export a run's trained encoder and progress head to safetensors.

    Tensors are named as the model's state_dict, under encoder.* and progress_head.*; the
    file's metadata holds format_version, dtype and the model config (JSON), so the file alone
    rebuilds the model: alignprog.load(DIR) in Python, or alignprog predict DIR VIDEO.npy.
    Nothing in the run directory is unpickled.
    """
    from alignprog.export import CARD_FILE, CONFIG_FILE, export_run, read_export_info

    try:
        path = export_run(run_dir, checkpoint=checkpoint, out_dir=out, dtype=dtype,
                          overwrite=overwrite)
    except (ValueError, KeyError, TypeError, OSError, RuntimeError) as exc:
        # A meta that no longer validates, a damaged file: one line, not a traceback (as
        # eval-progress does).
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        fail(f"{run_dir}: cannot export the checkpoint ({first})")
    info = read_export_info(path)
    if as_json:
        typer.echo(json.dumps({"model": str(path), "config": str(path.parent / CONFIG_FILE),
                               "card": str(path.parent / CARD_FILE), "dtype": info.dtype,
                               "format_version": info.format_version,
                               "bytes": path.stat().st_size, "config_json": info.config},
                              indent=2))
        return
    src = info.config.get("source", {})
    console.print(f"exported {escape(str(src.get('run')))} ({escape(str(src.get('checkpoint')))}"
                  f", step {src.get('step')}) as {info.dtype}: {escape(str(path))} "
                  f"({path.stat().st_size / 1e6:.2f} MB)", highlight=False, soft_wrap=True)
