"""The `alignprog` command line: one module per subcommand; the only package using typer/rich."""

from __future__ import annotations

import typer

from alignprog import __version__
from alignprog.cli import config as config_cmd
from alignprog.cli import data as data_cmd
from alignprog.cli import eval_progress as eval_progress_cmd
from alignprog.cli import export as export_cmd
from alignprog.cli import extract_features as extract_features_cmd
from alignprog.cli import predict as predict_cmd
from alignprog.cli import sample_inspect as sample_inspect_cmd
from alignprog.cli import train as train_cmd

app = typer.Typer(
    name="alignprog",
    help="Train and evaluate self-supervised video-alignment models (TCC, GTCC, LAV, VAVA) with "
    "a learnable action-progress head. Runs on an embedded synthetic dataset when no dataset is "
    "named.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
app.command("train", epilog="Examples:\n\n  alignprog train --method lav\n\n  alignprog train "
            "--method gtcc --dataset data/ego --device cuda --epochs 50 --encoder resnet50\n\n"
            "  alignprog train --name my-run --resume")(train_cmd.train)
app.add_typer(data_cmd.app, name="data")
app.add_typer(config_cmd.app, name="config")
app.command("sample-inspect", epilog=sample_inspect_cmd.EPILOG)(sample_inspect_cmd.sample_inspect)
app.command("eval-progress", epilog=eval_progress_cmd.EPILOG)(eval_progress_cmd.eval_progress)
app.command("export", epilog=export_cmd.EPILOG)(export_cmd.export)
app.command("predict", epilog=predict_cmd.EPILOG)(predict_cmd.predict)
app.command("extract-features", epilog=extract_features_cmd.EPILOG)(
    extract_features_cmd.extract_features)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"alignprog {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """alignprog command line."""


def main() -> None:
    app()
