"""`lkspec train`: parse flags into a TrainConfig and call `lkspec.train.train`.

Precedence: a resumed run's saved config < the YAML file < the named flags < `--set KEY=VALUE`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lkspec.errors import LkspecError

HELP = (
    "Train a draft (MLP-Speculator or MEDUSA) on cached target features.\n\n"
    "Defaults are the LK-losses paper's recipe: AdamW (0.9, 0.95), lr 4e-4, cosine with 100 warm-up steps, "
    "grad-clip 0.5, batch 64, 10 epochs, K=6, gamma 0.8, lk_hybrid with eta 3 (MLP) / 10 (MEDUSA).\n\n"
    "OUT becomes a draft directory (the draft with the best held-out simulated tau) plus metrics.jsonl, "
    "train_config.yaml, last/ and trainer_state/. Run the same command under `torchrun --nproc_per_node N` "
    "for data parallelism.\n\n"
    "Example: lkspec train configs/train-embedded.yaml --features runs/features --out runs/mlp-lk"
)

# flag name -> dotted config key
FLAG_KEYS = {
    "features": "features", "target": "target", "arch": "draft.arch", "num_heads": "draft.num_heads",
    "inner_dim": "draft.inner_dim", "tie_weights": "draft.tie_weights", "scale_input": "draft.scale_input",
    "num_layers": "draft.num_layers", "loss": "loss.name", "eta": "loss.eta", "gamma": "loss.gamma",
    "temperature": "loss.temperature", "loss_impl": "loss.impl", "lr": "optim.lr",
    "warmup_steps": "optim.warmup_steps", "grad_clip": "optim.grad_clip", "batch_size": "data.batch_size",
    "batch_tokens": "data.batch_tokens", "micro_batch_tokens": "data.micro_batch_tokens",
    "heldout_fraction": "data.heldout_fraction", "epochs": "epochs", "max_steps": "max_steps", "seed": "seed",
    "checkpoint_every": "checkpoint_every", "log_every": "log_every", "precision": "precision",
    "parallel": "parallel", "compile": "compile", "progress": "progress",
}


def register(app: typer.Typer) -> None:
    """Add this stage's subcommands to the root app."""

    @app.command("train", help=HELP)
    def train_cmd(
        out: Annotated[Path, typer.Option("--out", "-o", help="Run directory to create (or continue with --resume).")],
        config: Annotated[Path | None, typer.Argument(help="YAML training config (e.g. configs/train-embedded.yaml);"
                                                           " flags override its values.")] = None,
        features: Annotated[str | None, typer.Option(
            "--features", "-f", help="Feature store directory (`lkspec data features`).")] = None,
        target: Annotated[str | None, typer.Option(
            "--target", "-t", help="Target (hub id, HF dir, .gguf, or smollm2-135m-instruct); default: the name "
            "recorded in the features. Only its lm_head is loaded.")] = None,
        arch: Annotated[str | None, typer.Option(
            help="Draft architecture: mlp_speculator (default) or medusa.")] = None,
        num_heads: Annotated[int | None, typer.Option(
            "--num-heads", "-k", help="K, tokens drafted per round (default 6).")] = None,
        inner_dim: Annotated[int | None, typer.Option(
            help="MLP-Speculator stage width (default: the target's hidden size).")] = None,
        tie_weights: Annotated[bool | None, typer.Option(
            "--tie-weights/--no-tie-weights", help="MLP-Speculator: share weights across stages.")] = None,
        scale_input: Annotated[bool | None, typer.Option(
            "--scale-input/--no-scale-input", help="MLP-Speculator: RMS-normalise the target state first.")] = None,
        num_layers: Annotated[int | None, typer.Option(
            help="MEDUSA: residual blocks per head (default 1).")] = None,
        loss: Annotated[str | None, typer.Option(
            help="kl, tv, lk_alpha, lk_hybrid (default) or lk_hybrid_token.")] = None,
        eta: Annotated[float | None, typer.Option(
            help="lk_hybrid eta (default 3 for mlp_speculator, 10 for medusa).")] = None,
        gamma: Annotated[float | None, typer.Option(
            help="Head k's loss weight is gamma^(k-1) (default 0.8).")] = None,
        temperature: Annotated[float | None, typer.Option(
            help="Training temperature of p and q (default 1).")] = None,
        loss_impl: Annotated[str | None, typer.Option(
            help="chunked (default, low memory) or reference.")] = None,
        lr: Annotated[float | None, typer.Option(help="Peak learning rate (default 4e-4).")] = None,
        warmup_steps: Annotated[int | None, typer.Option(help="Linear warm-up steps (default 100).")] = None,
        grad_clip: Annotated[float | None, typer.Option(help="Max gradient norm, 0 = off (default 0.5).")] = None,
        batch_size: Annotated[int | None, typer.Option(
            "--batch-size", "-b", help="Documents per optimizer step (default 64).")] = None,
        batch_tokens: Annotated[int | None, typer.Option(
            help="Token budget per step instead of --batch-size.")] = None,
        micro_batch_tokens: Annotated[int | None, typer.Option(
            help="Tokens per forward/backward; lower it when memory is short (default 2048).")] = None,
        heldout_fraction: Annotated[float | None, typer.Option(
            help="Share of documents held out for evaluation (default 0.05).")] = None,
        epochs: Annotated[int | None, typer.Option("--epochs", "-e", help="Epochs (default 10).")] = None,
        max_steps: Annotated[int | None, typer.Option(
            help="Stop after this many steps; the schedule is unchanged, so --resume can continue later.")] = None,
        seed: Annotated[int | None, typer.Option(help="Seed for draft init and data order (default 0).")] = None,
        checkpoint_every: Annotated[int | None, typer.Option(
            help="Steps between checkpoints; 0 = epoch ends only (default 200).")] = None,
        log_every: Annotated[int | None, typer.Option(
            help="Steps between metrics.jsonl step records (default 10).")] = None,
        precision: Annotated[str | None, typer.Option(
            help="auto (bf16 autocast on GPU, fp32 on CPU), fp32 or bf16.")] = None,
        parallel: Annotated[str | None, typer.Option(
            help="Under torchrun: ddp (replicate, default) or fsdp (shard).")] = None,
        compile: Annotated[bool | None, typer.Option(
            "--compile/--no-compile", help="torch.compile the draft trunk (default: on GPU only).")] = None,
        progress: Annotated[bool | None, typer.Option(
            "--progress/--no-progress", help="Show a progress bar (default on).")] = None,
        set_: Annotated[list[str] | None, typer.Option(
            "--set", help="Any config key, dotted: --set optim.weight_decay=0.01 (repeatable; wins over "
            "everything else).")] = None,
        resume: Annotated[bool, typer.Option(
            "--resume", help="Continue the run in --out exactly where its last checkpoint stopped (same config "
            "required).")] = False,
        init_from: Annotated[Path | None, typer.Option(
            "--init-from", help="Start from this draft directory's weights (fresh optimizer and schedule).")] = None,
    ) -> None:
        from lkspec.train.config import build_config, parse_assignment, read_yaml

        values = locals()
        overrides: dict[str, Any] = {key: values[name] for name, key in FLAG_KEYS.items() if values[name] is not None}
        for item in set_ or []:
            k, v = parse_assignment(item)
            overrides[k] = v
        base = None
        if resume:
            saved = out / "train_config.yaml"
            if not saved.is_file():
                raise LkspecError(f"{out} has no train_config.yaml to resume; check --out or start a new run")
            base = read_yaml(saved)
        cfg = build_config(config, overrides, base=base)
        from lkspec.train import train

        result = train(cfg, out, resume=resume, init_from=init_from)
        if result.best_tau is None:
            typer.echo(f"stopped at step {result.step}; continue with: lkspec train --out {out} --resume")
        else:
            typer.echo(f"done: step {result.step}, best simulated tau {result.best_tau:.3f}; draft in {out} "
                       f"(metrics in {out}/metrics.jsonl)")
