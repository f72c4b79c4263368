"""`alignprog config show` and `alignprog config validate`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from alignprog.cli.common import ConfigOpt, SetOpt, console, fail, guarded, resolve_config

app = typer.Typer(help="Show and validate configs.", no_args_is_help=True,
                  rich_markup_mode="rich")


@app.command(epilog="Examples:\n\n  alignprog config show\n\n"
             "  alignprog config show --config my.yaml --set train.epochs=3 > resolved.yaml")
@guarded
def show(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved config as YAML: the defaults, then --config, then --set.

    The output is what `alignprog train --print-config` prints for the same --config and --set,
    and it loads back as a config file (--config) unchanged.
    """
    from alignprog.config import dump_config

    typer.echo(dump_config(resolve_config(config, set_, {})), nl=False)


@app.command(epilog="Examples:\n\n  alignprog config validate my.yaml\n\n"
             "  alignprog config validate runs/my-run/config.yaml")
@guarded
def validate(
    file: Annotated[Path, typer.Argument(help="The YAML or JSON config file to check.",
                                         show_default=False)],
) -> None:
    """Check a config file with the validation every command applies to --config.

    Prints "FILE: valid" and exits 0, or prints what is wrong (unknown keys with the closest
    valid key, bad values with the setting they belong to) and exits 1.
    """
    from alignprog.config import load_config
    from alignprog.errors import ConfigError

    try:
        load_config(file)
    except ConfigError as exc:
        fail(str(exc), 1)
    console.print(f"{escape(str(file))}: valid", highlight=False, soft_wrap=True)
