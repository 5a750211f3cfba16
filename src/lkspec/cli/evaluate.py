"""`lkspec eval`: exact acceptance length tau by coupling replay (see lkspec.evaluate)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lkspec.errors import LkspecError

Opt = typer.Option


def register(app: typer.Typer) -> None:
    """Add this stage's subcommands to the root app."""
    app.command("eval")(eval_command)


def split_values(values: list[str] | None) -> list[str]:
    """Repeated flags and comma-separated lists both work: `-t 0 -t 1` == `-t 0,1`."""
    out: list[str] = []
    for v in values or []:
        out.extend(x.strip() for x in v.split(","))
    return out


def _numbers(values: list[str], flag: str, kind: type) -> list:
    try:
        return [kind(v) for v in values if v]
    except ValueError:
        raise LkspecError(f"{flag} takes {kind.__name__}s (e.g. {flag} 0,1), got {','.join(values)}") from None


def eval_command(
    drafts: Annotated[list[Path], typer.Argument(
        help="Draft directories (a training run dir or an exported draft). Several are replayed on the same "
             "target samples and compared with the first (paired CI of the difference).")],
    target: Annotated[str, Opt(
        help="Target model: hub id, HF dir, .gguf or the embedded name; the one the drafts were trained for.")
    ] = "smollm2-135m-instruct",
    label: Annotated[list[str] | None, Opt(
        help="Name of each draft in the tables, one per draft in order; default: the directory name.")] = None,
    k: Annotated[int | None, Opt(
        "--k", "-k", help="Tokens drafted per round (K); default: the drafts' head count; must be <= it.")] = None,
    temperature: Annotated[list[str] | None, Opt(
        "--temperature", "-t", help="Temperature(s) of target and draft; 0 = greedy. Repeat or comma-separate; "
                                    "default 0,1.")] = None,
    rule: Annotated[list[str] | None, Opt(
        help="Acceptance rule(s): 'sampled' (drafts sampled from q, accepted w.p. min(1, p/q)) and/or 'greedy' "
             "(argmax drafts: vLLM's rule). Default: both.")] = None,
    benchmark: Annotated[list[str] | None, Opt(
        "--benchmark", "-b", help="Benchmark(s): mtbench, humaneval, gsm8k (offline), gsm8k_full (needs the hub). "
                                  "Default: the three offline ones.")] = None,
    limit: Annotated[int | None, Opt(help="Use only the first N prompts of each benchmark.")] = None,
    max_new_tokens: Annotated[int, Opt(help="Length cap of each target response (tokens).")] = 256,
    seed: Annotated[list[str] | None, Opt(
        help="Seed(s) of the target samples at T > 0; several are pooled per prompt. Default: 0.")] = None,
    top_k: Annotated[int, Opt(help="Top-k filter applied identically to p and q (0 = off).")] = 0,
    top_p: Annotated[float, Opt(help="Top-p filter applied identically to p and q (1 = off).")] = 1.0,
    batch_size: Annotated[int, Opt(help="Prompts per batch when sampling the target.")] = 16,
    bootstrap: Annotated[int, Opt(help="Bootstrap resamples (over prompts) for the 95% CIs.")] = 2000,
    out: Annotated[Path, Opt("--out", "-o", help="Results JSON (format lkspec-eval/1).")] = Path("results.json"),
    table: Annotated[Path | None, Opt(help="Markdown tables; default: --out with suffix .md.")] = None,
    plot: Annotated[Path | None, Opt(help="PNG of per-position acceptance; default: --out with suffix .png.")] = None,
    no_cache: Annotated[bool, Opt(
        "--no-cache", help="Regenerate target samples instead of reusing $LKSPEC_CACHE/eval-samples.")] = False,
    device: Annotated[str | None, Opt(help="torch device (default: cuda if available, else cpu).")] = None,
) -> None:
    """Measure tau exactly (coupling replay): sample the target once, replay every draft along the samples.

    Writes the results JSON, markdown tables (rows = drafts x rules, columns = temperature x benchmark, tau
    with a 95% bootstrap CI; paired differences; per-position acceptance; costs) and a PNG plot.
    """
    from lkspec.evaluate import eval_settings, run_eval

    kwargs: dict[str, object] = {
        "max_new_tokens": max_new_tokens, "top_k": top_k, "top_p": top_p, "batch_size": batch_size,
        "bootstrap": bootstrap, "use_cache": not no_cache, "k": k, "limit": limit,
    }
    if temperature:
        kwargs["temperatures"] = _numbers(split_values(temperature), "--temperature", float)
    if rule:
        kwargs["rules"] = [r for r in split_values(rule) if r]
    if benchmark is not None:
        kwargs["benchmarks"] = split_values(benchmark)
    if seed:
        kwargs["seeds"] = _numbers(split_values(seed), "--seed", int)
    settings = eval_settings(**kwargs)
    report = run_eval(target, drafts, settings, labels=label or None, out=out, table=table, plot=plot,
                      device=device)
    typer.echo(report.markdown())
    typer.echo(f"wrote {out}, {table or out.with_suffix('.md')}, {plot or out.with_suffix('.png')}")
