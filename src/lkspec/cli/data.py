"""`lkspec data`: prompts -> regenerate -> features (or `all` of them). Flags only; the work is in lkspec.data.

The stage options are generated from `PromptConfig`, `RegenConfig` and `FeatureOptions` (lkspec.cli.schema);
`--seed` sets both the prompt shuffle's and the sampling's seed, as it always has.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from lkspec.cli.schema import command, merged, prefixed, schema_options
from lkspec.config import parse
from lkspec.data.features import FeatureOptions, extract_features
from lkspec.data.pipeline import run_all
from lkspec.data.prompts import PromptConfig, load_prompts, write_prompts_jsonl
from lkspec.data.regenerate import VLLM_INSTALL, RegenConfig, regenerate
from lkspec.errors import LkspecError
from lkspec.targets import EMBEDDED_NAME, Target, load_target

data_app = typer.Typer(
    help="Build training data: prompts, target-regenerated responses (tokens dataset), hidden-state features.",
    no_args_is_help=True,
)

PROMPTS = prefixed(schema_options(PromptConfig), "prompts.")
REGEN = prefixed(schema_options(RegenConfig), "regenerate.")
FEATURES = prefixed(schema_options(FeatureOptions), "features.")

TargetOpt = Annotated[str, typer.Option(
    "--target", help="Target model: HF hub id, HF directory, .gguf file or 'smollm2-135m-instruct' (embedded).")]
Device = Annotated[str | None, typer.Option("--device", help="Torch device for the target (default: cuda if "
                                            "available, else cpu).")]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress bars.")]


def _section(model: type, overrides: dict[str, Any], prefix: str, what: str) -> Any:
    values = {k.removeprefix(prefix): v for k, v in overrides.items() if k.startswith(prefix)}
    return parse(model, values, source=what)


def _load_target(spec: str, device: str | None, backend: str = "hf") -> Target:
    if backend == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise LkspecError(VLLM_INSTALL)
        return load_target(spec, device="cpu")  # tokenizer, chat template and identity only
    return load_target(spec, device=device)


def prompts_cmd(
    out: Annotated[Path | None, typer.Option("--out", help="Write the prompt set here as JSONL "
                                             "({id, messages, source[, response]}).")] = None,
    show: Annotated[int, typer.Option("--show", help="Print this many prompts.")] = 3,
    overrides: dict[str, Any] | None = None,
) -> None:
    """Load, clean and inspect a prompt set; optionally export it to JSONL."""
    ps = load_prompts(_section(PromptConfig, overrides or {}, "prompts.", "prompt options"), progress=True)
    typer.echo(f"{len(ps.records)} prompts from {ps.config.source} ({json.dumps(ps.stats)})")
    for rec in ps.records[:show]:
        text = rec.messages[-1]["content"].replace("\n", " ")
        typer.echo(f"  {rec.id}: {text[:100]}{'…' if len(text) > 100 else ''}")
    if out is not None:
        write_prompts_jsonl(ps, out)
        typer.echo(f"wrote {out}")


def regenerate_cmd(
    out: Annotated[Path, typer.Option("--out", help="Output tokens dataset directory (rerun to resume).")],
    target: TargetOpt = EMBEDDED_NAME, device: Device = None, quiet: Quiet = False,
    overrides: dict[str, Any] | None = None,
) -> None:
    """Have the target answer every prompt; write the tokens dataset (input_ids, loss_mask, prompt_id)."""
    pcfg = _section(PromptConfig, overrides or {}, "prompts.", "prompt options")
    rcfg = _section(RegenConfig, overrides or {}, "regenerate.", "generation options")
    ps = load_prompts(pcfg, progress=not quiet)
    meta = regenerate(_load_target(target, device, rcfg.backend), ps, out, rcfg, progress=not quiet)
    typer.echo(f"tokens dataset {out}: {json.dumps(meta['counts'])}")


def features_cmd(
    tokens: Annotated[Path, typer.Option("--tokens", help="Tokens dataset directory (from `lkspec data "
                                         "regenerate`).")],
    out: Annotated[Path, typer.Option("--out", help="Output feature directory (rerun to resume).")],
    target: TargetOpt = EMBEDDED_NAME, device: Device = None, quiet: Quiet = False,
    overrides: dict[str, Any] | None = None,
) -> None:
    """Teacher-forced target pass over a tokens dataset -> post-norm hidden states in safetensors shards."""
    fcfg = _section(FeatureOptions, overrides or {}, "features.", "feature options")
    store = extract_features(_load_target(target, device), tokens, out, progress=not quiet, **fcfg.extract_kwargs())
    typer.echo(f"features {out}: {store.num_docs} docs, {store.num_tokens} tokens, {len(store.shards)} shards")


def all_cmd(
    out: Annotated[Path, typer.Option("--out", help="Output directory: prompts.jsonl, tokens/ and features/ go "
                                      "there; rerun to resume (finished stages are skipped).")] = Path("lkspec-data"),
    target: TargetOpt = EMBEDDED_NAME, device: Device = None, quiet: Quiet = False,
    overrides: dict[str, Any] | None = None,
) -> None:
    """prompts -> regenerate -> features in one go; each stage is skipped when already complete."""
    pcfg = _section(PromptConfig, overrides or {}, "prompts.", "prompt options")
    rcfg = _section(RegenConfig, overrides or {}, "regenerate.", "generation options")
    fcfg = _section(FeatureOptions, overrides or {}, "features.", "feature options")

    def get_target(stage: str) -> Target:
        return _load_target(target, device, rcfg.backend if stage == "regenerate" else "hf")

    paths = run_all(get_target, pcfg, rcfg, out, progress=not quiet, **fcfg.extract_kwargs())
    for name, path in paths.items():
        typer.echo(f"{name}: {path}")


def register(app: typer.Typer) -> None:
    """Add this stage's subcommands to the root app."""
    data_app.command("prompts")(command(prompts_cmd, PROMPTS))
    data_app.command("regenerate")(command(regenerate_cmd, merged(REGEN, PROMPTS)))
    data_app.command("features")(command(features_cmd, FEATURES))
    data_app.command("all")(command(all_cmd, merged(REGEN, PROMPTS, FEATURES)))
    app.add_typer(data_app, name="data")
