"""`lkspec export`: write a draft in the layout vLLM loads, with a model card and provenance."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

DraftOpt = Annotated[Path, typer.Option(
    "--draft", help="Draft directory: a training run (`lkspec train` output), an lkspec checkpoint, or an outside "
    "checkpoint (IBM fms, FasterDecoding MEDUSA, vLLM-native).")]
OutOpt = Annotated[Path, typer.Option(
    "--out", help="Output directory (built atomically; refused if it exists unless --overwrite).")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Tensor dtype of the export: bf16, fp16 or fp32.")]
FormatOpt = Annotated[str, typer.Option(
    "--format", help="vllm: vLLM's own layout (MLP-Speculator, MEDUSA, or EAGLE-3's native LlamaForCausalLMEagle3); "
    "speculators: vllm-project/speculators' EAGLE-3 layout; arctic: the ArcticInference plugin's MLP-Speculator "
    "layout (architectures ArcticMLPSpeculatorPreTrainedModel + base_model_archs).")]
HeadsOpt = Annotated[int | None, typer.Option(
    "--num-speculative-tokens", "-k", help="Heads to export (default: all K of the draft). Fewer keeps the first "
    "n heads computing exactly what they did; more than the draft has is an error.")]
BaseOpt = Annotated[str | None, typer.Option(
    "--base-model", help="base_model_name_or_path to record (default: the draft's recorded target; pass the hub id "
    "your servers load when the target was a local directory).")]
ArchOpt = Annotated[list[str] | None, typer.Option(
    "--base-model-arch", help="Target architecture for --format arctic's base_model_archs, e.g. LlamaForCausalLM "
    "(default: known targets, or the config.json of a local --base-model directory). Repeatable.")]
EvalOpt = Annotated[Path | None, typer.Option(
    "--eval", help="Results file of `lkspec eval --out`: adds the tau table (T = 0 / T = 1 per benchmark, with "
    "95% CIs) to the model card.")]
EvalDraftOpt = Annotated[str | None, typer.Option(
    "--eval-draft", help="Draft label whose --eval rows to use (default: rows whose draft_path is --draft, or the "
    "only draft in the file).")]
RepoIdOpt = Annotated[str | None, typer.Option(
    "--repo-id", "--model-id", help="The hub repository you will upload the export to (OWNER/NAME): the card's "
    "usage snippets and metadata name it (default: '.', the folder holding the card; never a local absolute "
    "path).")]
OverwriteOpt = Annotated[bool, typer.Option(
    "--overwrite", help="Replace --out if it is a previous lkspec export (anything else is refused).")]


def export(
    draft: DraftOpt,
    out: OutOpt,
    dtype: DtypeOpt = "bf16",
    fmt: FormatOpt = "vllm",
    num_speculative_tokens: HeadsOpt = None,
    base_model: BaseOpt = None,
    base_model_arch: ArchOpt = None,
    eval_results: EvalOpt = None,
    eval_draft: EvalDraftOpt = None,
    repo_id: RepoIdOpt = None,
    overwrite: OverwriteOpt = False,
) -> None:
    """Export a draft for vLLM: config.json + model.safetensors + README.md model card + provenance.json."""
    from lkspec.export import export_draft

    res = export_draft(
        draft, out, dtype=dtype, fmt=fmt, num_speculative_tokens=num_speculative_tokens, base_model=base_model,
        base_model_archs=base_model_arch or None, eval_results=eval_results, eval_draft=eval_draft,
        repo_id=repo_id, overwrite=overwrite,
    )
    method = res.config["model_type"] if fmt == "vllm" else "arctic"
    typer.echo(f"wrote {res.out} ({res.config['architectures'][0]}, {res.num_heads} heads, {dtype}); reloads "
               f"identically; max relative logit change from {dtype} rounding "
               f"{res.roundtrip['max_rel_logit_gap_vs_source']:.2g}")
    typer.echo(f'vLLM: speculative_config={{"method": "{method}", "model": "{res.out.resolve()}", '
               f'"num_speculative_tokens": {res.num_heads}}}')


def register(app: typer.Typer) -> None:
    """Add this stage's subcommands to the root app."""
    app.command("export")(export)
