"""`lkspec train`: flags generated from `TrainConfig` (lkspec.cli.schema), then `lkspec.train.train`.

Precedence: a resumed run's saved config < the YAML file < the named flags < `--set KEY=VALUE`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lkspec.cli.schema import command, schema_options
from lkspec.config import parse_assignment, read_yaml
from lkspec.errors import LkspecError
from lkspec.train.config import CONFIG_YAML, TrainConfig, build_config

HELP = (
    "Train a draft (MLP-Speculator, MEDUSA or EAGLE-3) on cached target features.\n\n"
    "Defaults are the LK-losses paper's recipe: AdamW (0.9, 0.95), lr 4e-4, cosine with 100 warm-up steps, "
    "grad-clip 0.5, batch 64, 10 epochs, K=6, gamma 0.8, lk_hybrid with eta 3 (MLP) / 10 (MEDUSA).\n\n"
    "OUT becomes a draft directory (the draft with the best held-out simulated tau) plus metrics.jsonl, "
    "train_config.yaml, last/ and trainer_state/. Run the same command under `torchrun --nproc_per_node N` "
    "for data parallelism.\n\n"
    "Example: lkspec train configs/train-embedded.yaml --features runs/features --out runs/mlp-lk"
)
OPTIONS = schema_options(TrainConfig)


def train_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory to create (or continue with --resume).")],
    config: Annotated[Path | None, typer.Argument(help="YAML training config (e.g. configs/train-embedded.yaml); "
                                                       "flags override its values.")] = None,
    set_: Annotated[list[str] | None, typer.Option(
        "--set", help="Any config key, dotted: --set optim.weight_decay=0.01 (repeatable; wins over "
        "everything else).")] = None,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Continue the run in --out exactly where its last checkpoint stopped (same config "
        "required).")] = False,
    init_from: Annotated[Path | None, typer.Option(
        "--init-from", help="Start from this draft directory's weights (fresh optimizer and schedule).")] = None,
    overrides: dict[str, Any] | None = None,
) -> None:
    values = dict(overrides or {})
    values.update(parse_assignment(item) for item in set_ or [])
    base = None
    if resume:
        saved = out / CONFIG_YAML
        if not saved.is_file():
            raise LkspecError(f"{out} has no {CONFIG_YAML} to resume; check --out or start a new run")
        base = read_yaml(saved)
    from lkspec.train import train  # heavy (torch.distributed, transformers): only when a run starts

    result = train(build_config(config, values, base=base), out, resume=resume, init_from=init_from)
    if result.best_tau is None:
        typer.echo(f"stopped at step {result.step}; continue with: lkspec train --out {out} --resume")
    else:
        typer.echo(f"done: step {result.step}, best simulated tau {result.best_tau:.3f}; draft in {out} "
                   f"(metrics in {out}/metrics.jsonl)")


def register(app: typer.Typer) -> None:
    """Add this stage's subcommands to the root app."""
    app.command("train", help=HELP)(command(train_cmd, OPTIONS))
