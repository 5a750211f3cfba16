"""`lkspec generate`: lossless speculative decoding, streamed, with tau and speed-up (flags from GenerateSettings)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lkspec.cli.schema import command, schema_options
from lkspec.config import layered, parse
from lkspec.generate import GenerateSettings, run_generate

Opt = typer.Option
OPTIONS = schema_options(GenerateSettings)


def generate_command(
    draft: Annotated[Path | None, typer.Argument(
        help="Draft directory (a training run dir or an exported draft); omit it with --proposer ngram.")] = None,
    prompt: Annotated[list[str] | None, Opt(
        "--prompt", "-p", help="User message, rendered with the target's chat template; repeat for several.")] = None,
    benchmark: Annotated[str | None, Opt(
        "--benchmark", "-b", help="Take prompts from a benchmark instead (mtbench, humaneval, gsm8k).")] = None,
    limit: Annotated[int, Opt(help="With --benchmark: how many of its prompts.")] = 3,
    target: Annotated[str, Opt(
        help="Target model: hub id, HF dir, .gguf or the embedded name.")] = "smollm2-135m-instruct",
    stream: Annotated[bool, Opt("--stream/--no-stream", help="Print text as it is generated.")] = True,
    compare: Annotated[bool, Opt(
        "--compare/--no-compare", help="Also time plain target generation (HF generate) of the same prompt and "
                                       "report the speed-up.")] = True,
    device: Annotated[str | None, Opt(help="torch device (default: cuda if available, else cpu).")] = None,
    overrides: dict[str, Any] | None = None,
) -> None:
    """Generate with lossless speculative decoding; report tau, per-position acceptance and tokens/s."""
    settings = parse(GenerateSettings, layered(None, overrides), "generation settings")
    run_generate(target, draft, settings, prompts=list(prompt or []), benchmark=benchmark, limit=limit,
                 stream=stream, compare=compare, device=device, echo=typer.echo)


def register(app: typer.Typer) -> None:
    """Add this stage's subcommands to the root app."""
    app.command("generate")(command(generate_command, OPTIONS))
