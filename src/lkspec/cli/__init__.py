"""`lkspec` command line. Each stage registers its own subcommands; this module only wires them up.

Every user-fixable problem is an `LkspecError`, printed as one line (no traceback), exit status 2.
"""

from __future__ import annotations

import logging
import os
import sys

import typer

from lkspec import __version__
from lkspec.errors import LkspecError

app = typer.Typer(
    name="lkspec",
    help="Train speculative-decoding drafts (MLP-Speculator, MEDUSA) with LK losses; measure exact tau; "
    "export for vLLM.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lkspec {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug logging."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    from rich.logging import RichHandler

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(show_path=False, rich_tracebacks=False)],
    )
    for noisy in ("httpx", "urllib3", "datasets", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _register_all() -> None:
    from lkspec.cli import data, demo, evaluate, export, generate, train

    for module in (data, train, evaluate, generate, export, demo):
        module.register(app)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _register_all()
    try:
        app(args=argv, standalone_mode=False)
    except LkspecError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.secho("interrupted; rerun the same command to resume where it stopped", err=True)
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        if isinstance(exc, click.exceptions.Abort):
            sys.exit(1)
        raise
