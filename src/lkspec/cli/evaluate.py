"""`lkspec eval`: exact acceptance length tau by coupling replay (see lkspec.evaluate).

The settings' flags are generated from `EvalSettings` (lkspec.cli.schema); list settings take repeated
flags or comma-separated values (`-t 0 -t 1` == `-t 0,1`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lkspec.cli.schema import command, schema_options
from lkspec.config import layered
from lkspec.evaluate.run import EvalSettings, eval_settings

Opt = typer.Option
OPTIONS = schema_options(EvalSettings)


def eval_command(
    drafts: Annotated[list[Path], typer.Argument(
        help="Draft directories (a training run dir or an exported draft). Several are replayed on the same "
             "target samples and compared with the first (paired CI of the difference).")],
    target: Annotated[str, Opt(
        help="Target model: hub id, HF dir, .gguf or the embedded name; the one the drafts were trained for.")
    ] = "smollm2-135m-instruct",
    label: Annotated[list[str] | None, Opt(
        help="Name of each draft in the tables, one per draft in order; default: the directory name.")] = None,
    out: Annotated[Path, Opt("--out", "-o", help="Results JSON (format lkspec-eval/1).")] = Path("results.json"),
    table: Annotated[Path | None, Opt(help="Markdown tables; default: --out with suffix .md.")] = None,
    plot: Annotated[Path | None, Opt(help="PNG of per-position acceptance; default: --out with suffix .png.")] = None,
    device: Annotated[str | None, Opt(help="torch device (default: cuda if available, else cpu).")] = None,
    overrides: dict[str, Any] | None = None,
) -> None:
    """Measure tau exactly (coupling replay): sample the target once, replay every draft along the samples.

    Writes the results JSON, markdown tables (rows = drafts x rules, columns = temperature x benchmark, tau
    with a 95% bootstrap CI; paired differences; per-position acceptance; costs) and a PNG plot.
    """
    from lkspec.evaluate import run_eval  # loads the target: heavy imports only when the command runs

    settings = eval_settings(**layered(None, overrides))
    report = run_eval(target, drafts, settings, labels=label or None, out=out, table=table, plot=plot,
                      device=device)
    typer.echo(report.markdown())
    typer.echo(f"wrote {out}, {table or out.with_suffix('.md')}, {plot or out.with_suffix('.png')}")


def register(app: typer.Typer) -> None:
    """Add this stage's subcommands to the root app."""
    app.command("eval")(command(eval_command, OPTIONS))
