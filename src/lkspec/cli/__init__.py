"""`lkspec` command line. Each stage registers its own subcommands; this module only wires them up.

Every user-fixable problem is an `LkspecError`, printed as one line (no traceback), exit status 2.
"""

from __future__ import annotations

import importlib
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


INTERRUPTED = ("interrupted: everything already written is kept; rerun the same command to resume where it "
               "stopped (lkspec train: add --resume)")


def _click_exceptions() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(ClickException, Abort) classes of every click the CLI may run on: typer >= 0.25 bundles its own copy
    (`typer._click`), older typers use the `click` package, and the two do not share classes."""
    usage: list[type] = []
    abort: list[type] = []
    for name in ("typer._click.exceptions", "typer.exceptions", "click.exceptions"):
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        usage += [c for c in (getattr(mod, "ClickException", None),) if isinstance(c, type)]
        abort += [c for c in (getattr(mod, "Abort", None),) if isinstance(c, type)]
    return tuple(usage), tuple(abort)


def _interrupted() -> None:
    typer.secho("\n" + INTERRUPTED, err=True)  # on its own line, also when a progress bar was mid-line


def _one_line(exc: Exception) -> str:
    msg = " ".join(str(exc.format_message()).split()).rstrip(".")  # type: ignore[attr-defined]
    ctx = getattr(exc, "ctx", None)
    where = getattr(ctx, "command_path", None)
    return f"error: {msg}" + (f"; see `{where} --help`" if where else "")


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _register_all()
    usage_errors, aborts = _click_exceptions()
    try:
        code = app(args=argv, standalone_mode=False)
    except LkspecError as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        _interrupted()
        sys.exit(130)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:  # click usage errors arrive here in non-standalone mode
        from lkspec.io import as_disk_full  # here, not at the top: `lkspec --help` need not import torch for it

        if (full := as_disk_full(exc)) is not None:
            typer.secho(f"error: {full}", fg=typer.colors.RED, err=True)
            sys.exit(2)
        if isinstance(exc, usage_errors):
            typer.secho(_one_line(exc), fg=typer.colors.RED, err=True)
            sys.exit(getattr(exc, "exit_code", 2) or 2)
        if isinstance(exc, aborts):  # click turns Ctrl-C into Abort
            _interrupted()
            sys.exit(130)
        raise
    if isinstance(code, int) and code:  # non-standalone click returns an Exit's code instead of exiting
        if code == 130:
            _interrupted()
        sys.exit(code)
