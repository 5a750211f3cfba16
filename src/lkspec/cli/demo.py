"""`lkspec demo` (KL vs LK on the embedded target) and `lkspec run CONFIG` (the same chain from a recipe file)."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from lkspec.config import parse_assignment

Sets = Annotated[list[str] | None, typer.Option(
    "--set", help="Override any config key, dotted: --set train.epochs=2 --set eval.limit=10 (repeatable).")]
Fresh = Annotated[bool, typer.Option(
    "--fresh", help="Delete what lkspec wrote in the output folder (data, runs, eval, export, report.md, "
    "metrics.png, pipeline.json) first; other files stay (default: reuse finished stages).")]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress bars (stage headers and the table still print).")]


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
    app.command("run")(run)


def _overrides(sets: list[str] | None) -> dict[str, object]:
    return dict(parse_assignment(s) for s in sets or [])


def _prepare_out(out: Path, fresh: bool) -> None:
    from lkspec.pipeline import clear_outputs

    if fresh and out.exists():
        clear_outputs(out)


def _finish(res: object, out: Path, t0: float, title: str) -> None:
    from lkspec.report import summary_table, write_report

    command = "lkspec " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    path = write_report(res, command=command, total_s=time.perf_counter() - t0, title=title)  # type: ignore[arg-type]
    typer.echo(f"\nreport: {path}   plots: {out}/metrics.png, {out}/eval/*.png   drafts: {out}/export/")
    typer.echo(f"total {(time.perf_counter() - t0) / 60:.1f} min\n")
    typer.echo(summary_table(res))  # type: ignore[arg-type]


def demo(
    out: Annotated[Path, typer.Option("--out", help="Output folder (data, runs, eval, export, report.md).")] = Path(
        "lkspec-demo"),
    quick: Annotated[bool, typer.Option(
        "--quick", help="Smoke-test size (about 5 minutes on 2 CPU cores): 40 prompts, 1 epoch, 3 prompts per "
        "benchmark. Its numbers mean nothing; it proves the chain works.")] = False,
    scale: Annotated[float, typer.Option(
        "--scale", help="Multiply the evaluation prompts per benchmark and the training prompts (2 = 40 "
        "evaluation prompts per benchmark and tighter CIs; the benchmarks have at most 224 training prompts past "
        "the first 40 of each, fewer from 3 on; ShareGPT has thousands).")] = 1.0,
    arch: Annotated[str, typer.Option(
        "--arch", help="mlp (MLP-Speculator, eta 3), medusa (MEDUSA, eta 10), eagle3 (EAGLE-3, eta 3; lk_hybrid "
        "only, trained longer: add KL with --set 'losses=[kl,lk_hybrid]') or all (mlp and medusa).")] = "mlp",
    all_archs: Annotated[bool, typer.Option("--all", help="Same as --arch all.")] = False,
    target: Annotated[str, typer.Option(
        "--target", help="Target model (default: the embedded SmolLM2-135M-Instruct).")] = "smollm2-135m-instruct",
    sets: Sets = None,
    fresh: Fresh = False,
    quiet: Quiet = False,
) -> None:
    """Train drafts worth serving on the embedded target and compare KL with LK, end to end and offline: the target
    answers the benchmarks' prompts past the evaluated ones (T=1 and T=0) and ShareGPT prompts (T=0), its states
    are cached, drafts start from the target and train with kl and lk_hybrid (same data, seed and steps), exact tau
    (K=6, T=0/1, sampled and greedy rules) on MT-bench, HumanEval and GSM8K beside the n-gram lookup, vLLM export,
    report.md."""
    from lkspec.demo import demo_config
    from lkspec.pipeline import run_pipeline

    cfg = demo_config(quick=quick, scale=scale, arch="all" if all_archs else arch, target=target,
                      overrides=_overrides(sets))
    _prepare_out(out, fresh)
    t0 = time.perf_counter()
    res = run_pipeline(cfg, out, progress=not quiet, announce=typer.echo)
    _finish(res, out, t0, "lkspec demo" + (" --quick" if quick else ""))


def run(
    config: Annotated[Path, typer.Argument(help="Pipeline config YAML (e.g. configs/llama31-8b-mlp-lk.yaml).")],
    out: Annotated[Path | None, typer.Option("--out", help="Output folder (default: runs/<config name>).")] = None,
    sets: Sets = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Validate the config and print the plan, then run every stage in miniature on a "
        "stand-in target (8 prompts, 2 training steps, 2 prompts per benchmark) in a temporary folder.")] = False,
    stand_in: Annotated[str, typer.Option(
        "--stand-in", help="Target used by --dry-run instead of the config's (small, offline).")
    ] = "smollm2-135m-instruct",
    fresh: Fresh = False,
    quiet: Quiet = False,
) -> None:
    """Run a whole recipe: prompts -> regenerate -> features -> train (one run per loss) -> eval -> export."""
    from lkspec.pipeline import load_pipeline_config, run_pipeline

    cfg = load_pipeline_config(config, _overrides(sets))
    out = out or Path("runs") / cfg.name
    if dry_run:
        from lkspec.recipe import dry_run as do_dry_run

        do_dry_run(cfg, out, stand_in=stand_in, echo=typer.echo, progress=not quiet)
        return
    _prepare_out(out, fresh)
    t0 = time.perf_counter()
    res = run_pipeline(cfg, out, progress=not quiet, announce=typer.echo)
    _finish(res, out, t0, cfg.name)
