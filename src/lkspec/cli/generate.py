"""`lkspec generate`: lossless speculative decoding with a draft, streamed, with tau and speed-up."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lkspec.errors import LkspecError

Opt = typer.Option


def register(app: typer.Typer) -> None:
    """Add this stage's subcommands to the root app."""
    app.command("generate")(generate_command)


def generate_command(
    draft: Annotated[Path, typer.Argument(help="Draft directory (a training run dir or an exported draft).")],
    prompt: Annotated[list[str] | None, Opt(
        "--prompt", "-p", help="User message, rendered with the target's chat template; repeat for several.")] = None,
    benchmark: Annotated[str | None, Opt(
        "--benchmark", "-b", help="Take prompts from a benchmark instead (mtbench, humaneval, gsm8k).")] = None,
    limit: Annotated[int, Opt(help="With --benchmark: how many of its prompts.")] = 3,
    target: Annotated[str, Opt(
        help="Target model: hub id, HF dir, .gguf or the embedded name.")] = "smollm2-135m-instruct",
    k: Annotated[int | None, Opt("--k", "-k", help="Tokens drafted per round (K); default: the draft's heads.")] = None,
    temperature: Annotated[float, Opt("--temperature", "-t", help="Sampling temperature; 0 = greedy.")] = 1.0,
    top_k: Annotated[int, Opt(help="Top-k filter applied identically to p and q (0 = off).")] = 0,
    top_p: Annotated[float, Opt(help="Top-p filter applied identically to p and q (1 = off).")] = 1.0,
    greedy_draft: Annotated[bool, Opt(
        "--greedy-draft", help="vLLM's rule at T > 0: drafts are argmax q and q counts as one-hot (still "
                               "lossless, lower acceptance).")] = False,
    max_new_tokens: Annotated[int, Opt(help="Stop after this many new tokens (or at EOS).")] = 256,
    seed: Annotated[int, Opt(help="Seed of the draft and acceptance draws (prompt i uses seed + i).")] = 0,
    stream: Annotated[bool, Opt("--stream/--no-stream", help="Print text as it is generated.")] = True,
    compare: Annotated[bool, Opt(
        "--compare/--no-compare", help="Also time plain target generation (HF generate) of the same prompt and "
                                       "report the speed-up.")] = True,
    device: Annotated[str | None, Opt(help="torch device (default: cuda if available, else cpu).")] = None,
) -> None:
    """Generate with lossless speculative decoding; report tau, per-position acceptance and tokens/s."""
    from lkspec.specdec import run_generate

    if not prompt and not benchmark:
        raise LkspecError("nothing to generate; pass --prompt TEXT or --benchmark NAME")
    run_generate(
        target, draft, prompts=list(prompt or []), benchmark=benchmark, limit=limit, k=k, temperature=temperature,
        top_k=top_k, top_p=top_p, rule="greedy" if greedy_draft else "sampled", max_new_tokens=max_new_tokens,
        seed=seed, stream=stream, compare=compare, device=device, echo=typer.echo,
    )
