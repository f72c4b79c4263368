"""Shared CLI plumbing: consoles, config resolution, `--help` defaults read from the config, and
error -> exit code mapping.

Light on purpose: every subcommand module imports this one, and `alignprog --help` imports every
subcommand module, so nothing here (or at the top of a subcommand module) may import torch,
numpy or the data layer; commands import those inside their function.
"""

from __future__ import annotations

import functools
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Callable, Mapping, Optional, Sequence, get_args

import typer
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.segment import Segments
from rich.table import Table

from alignprog.config import Config, DataConfig, FpsConfig, load_config, parse_overrides
from alignprog.errors import AlignprogError

console = Console()                   # results: stdout
err_console = Console(stderr=True)    # diagnostics: stderr


def print_table(table: Table, *, out: Console | None = None) -> None:
    """Print `table` on `out` (default: the stdout console) without ever cutting a cell to ``…``.

    Every column folds instead of truncating, so a narrow terminal wraps a long name or number
    inside its cell. When the output is not a terminal (piped, redirected, a test runner) the
    table is rendered at its natural width, however narrow COLUMNS is, so each cell stays on
    one line and reads (and greps) whole."""
    out = console if out is None else out
    for column in table.columns:
        column.overflow, column.no_wrap = "fold", False
    if out.is_terminal:
        out.print(table)
        return
    wide = out.options.update_width(1_000_000)
    natural = Measurement.get(out, wide, table).maximum
    if natural <= out.width:
        out.print(table)
        return
    lines = out.render(table, out.options.update(width=natural))
    out.print(Segments(lines), crop=False)


ConfigOpt = Annotated[Optional[Path], typer.Option(
    "--config", "-c", help="YAML or JSON config file (see `alignprog/config.py` for every key).",
    show_default=False)]


class ConfigDefault(str):
    """The default an option shows in `--help`, read from a config field: the text, plus the
    dotted `key` and the `value` it was read from (so a test can check every one)."""

    key: str
    value: Any


def show_number(value: float | int) -> str:
    """A number as short as it reads: 20, 0.5, 3e-4, 1e6."""
    if isinstance(value, int):
        return str(value)
    plain = f"{value:g}"
    mantissa, exponent = f"{value:e}".split("e")
    sci = f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return sci if len(sci) < len(plain) else plain


def default_of(model: type, key: str, names: Mapping[Any, str] | None = None) -> ConfigDefault:
    """The `--help` default of the option that sets `key` (dotted, e.g. "train.lr") of the config
    model `model`: the field's own default, so that the help can never disagree with it.
    `names` maps a value to the text shown instead (a bool flag's "joint", say)."""
    *sections, leaf = key.split(".")
    for section in sections:
        model = model.model_fields[section].annotation
    value = model.model_fields[leaf].get_default(call_default_factory=True)
    if names is not None:
        text = names[value]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        text = show_number(value)
    else:
        text = str(value)
    shown = ConfigDefault(text)
    shown.key, shown.value = key, value
    return shown


def config_choices(name: str, model: type, field: str, *, exclude: tuple[str, ...] = (),
                   extra: tuple[str, ...] = ()) -> type[Enum]:
    """The choices of an option: the Literal values of a config field (the config is the one
    list), less `exclude`, plus `extra`, as the str Enum Typer wants."""
    values = [v for v in get_args(model.model_fields[field].annotation) if v not in exclude]
    return Enum(name, [(v, v) for v in (*values, *extra)], type=str)


FpsPreset = config_choices("FpsPreset", FpsConfig, "preset")
# features, frames, or both (one pass writes both).
Layout = config_choices("Layout", DataConfig, "layout", extra=("both",))


# One vocabulary of values across the commands: each command offers the subset it supports.
SPLITS = ("train", "val", "test")
DTYPES = ("fp32", "bf16", "fp16")
# numpy's names, the spelling `data synth --dtype` once took: still accepted, never shown.
DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def choice(option: str, values: Sequence[str],
           aliases: Mapping[str, str] | None = None) -> dict[str, Any]:
    """`typer.Option` keywords of a choice among `values`: `--help` shows <a|b|c>, the value is
    read case-insensitively (and `aliases` too, unshown), and anything else is a one-line error
    with exit code 2, not Typer's boxed usage error."""
    values = tuple(values)
    aliases = {k: v for k, v in (aliases or {}).items() if v in values}

    def parse(value: str) -> str:
        key = str(value).strip().lower()
        key = aliases.get(key, key)
        if key not in values:
            fail(f"{option} must be one of {', '.join(values)}, got '{value}'", 2)
        return key

    def complete(incomplete: str) -> list[str]:
        return [v for v in values if v.startswith(incomplete)]

    return {"parser": parse, "metavar": f"<{'|'.join(values)}>", "autocompletion": complete}


def dtype_choice(*supported: str) -> dict[str, Any]:
    """`--dtype` among `supported` (in DTYPES' order), the numpy spellings accepted too."""
    return choice("--dtype", [d for d in DTYPES if d in supported], DTYPE_ALIASES)


def split_choice() -> dict[str, Any]:
    return choice("--split", SPLITS)


def one_path(option: str, value: Path | None, positional: Path | None,
             name: str) -> Path | None:
    """The path given as `option` or as the positional NAME that it replaces (still accepted);
    two different paths are a one-line error."""
    if value is not None and positional is not None and value != positional:
        fail(f"{option} {value} and the positional {name} {positional} name different paths: "
             f"give {option} alone", 2)
    return value if value is not None else positional


# Dataset options shared by the commands that read a dataset root.
AnnotationsOpt = Annotated[Optional[Path], typer.Option(
    "--annotations", help="Annotation JSON to use instead of ROOT/dataset.json.",
    show_default=False)]
LenientOpt = Annotated[bool, typer.Option(
    "--lenient", help="Pair unequal handle/annotation lists by position with a warning instead "
    "of failing (needed for the EgoProceL CMU tasks).")]
FpsPresetOpt = Annotated[Optional[FpsPreset], typer.Option(
    "--fps-preset", help="Frame units of the annotations: none (annotation frames are feature "
    "frames) or egoprocel (source fps per EgoProceL source, features at data.fps.feature, "
    f"{default_of(Config, 'data.fps.feature')} fps by default).",
    show_default=default_of(Config, "data.fps.preset"))]

SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override any setting by its dotted key, e.g. --set data.split.seed=3 "
    "(repeatable; applied after --config, before the other flags).", show_default=False)]


def resolve_config(config: Path | None, sets: list[str] | None, flags: dict[str, Any]) -> Config:
    """Defaults < config file < --set < explicit flags (those not None), then validation."""
    overrides = parse_overrides(sets or [])
    overrides.update({k: v for k, v in flags.items() if v is not None})
    return load_config(config, overrides)


def report(kind: str, message: object) -> None:
    """One diagnostic line on stderr; the message is plain text (paths may hold '[...]')."""
    style = "bold red" if kind == "error" else "yellow"
    err_console.print(f"[{style}]{kind}:[/] {escape(str(message))}", highlight=False,
                      soft_wrap=True)


def fail(message: str, code: int = 1) -> None:
    report("error", message)
    raise typer.Exit(code)


def write_figure(path: Path, png: bytes) -> None:
    """Write a PNG atomically and say so on stderr; a one-line error if it cannot be written."""
    from alignprog.fileio import atomic_write_bytes
    try:
        atomic_write_bytes(path, png)
    except OSError as exc:
        fail(f"{path}: cannot write the figure ({exc.strerror or exc})")
    err_console.print(f"figure written to {escape(str(path))}", highlight=False)


OUT_OF_MEMORY_HINT = ("lower data.batch_size or shorten the longest videos (`alignprog train` "
                      "estimates what fits before it starts: train.memory_check)")


def _out_of_memory(exc: BaseException) -> str | None:
    """A one-line report of an allocation failure (numpy's MemoryError or torch's CUDA/CPU
    OutOfMemoryError), None for any other error."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        first = (str(exc).strip().splitlines() or ["no details"])[0]
        return f"out of memory ({first[:200]}); {OUT_OF_MEMORY_HINT}"
    return None


def guarded(fn: Callable) -> Callable:
    """Report AlignprogError and running out of memory as one line on stderr with an exit code,
    never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AlignprogError as exc:
            fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except (MemoryError, RuntimeError) as exc:
            message = _out_of_memory(exc)
            if message is None:
                raise
            fail(message, 1)

    return wrapper
