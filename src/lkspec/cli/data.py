"""`lkspec data`: prompts -> regenerate -> features (or `all` of them). Flags only; the work is in lkspec.data."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from lkspec.data import DEFAULT_SHARD_TOKENS

data_app = typer.Typer(
    help="Build training data: prompts, target-regenerated responses (tokens dataset), hidden-state features.",
    no_args_is_help=True,
)

# Shared flags (typing.Annotated so every command documents them the same way).
Source = Annotated[str, typer.Option(
    "--prompts", help="Prompt source: 'sharegpt' (bundled, offline), a .jsonl file, a Hugging Face dataset id "
    "(org/name or hf:org/name, needs a hub) or a local dataset directory.")]
HfConfig = Annotated[str | None, typer.Option(
    "--hf-config", help="Hugging Face dataset config (e.g. 0625 for BAAI/Infinity-Instruct, the default there).")]
Split = Annotated[str, typer.Option("--split", help="Hugging Face dataset split.")]
PromptField = Annotated[str | None, typer.Option(
    "--prompt-field", help="Field holding the prompt text, dotted or indexed (e.g. 'conversation[0].content'); "
    "default: auto-detect messages/conversations/prompt/instruction/question.")]
MessagesField = Annotated[str | None, typer.Option(
    "--messages-field", help="Field holding a chat (list of {role, content} or {from, value}); its system turns and "
    "first user turn become the prompt.")]
ResponseField = Annotated[str | None, typer.Option(
    "--response-field", help="Field holding a response the TARGET itself wrote; the dataset is then built from these "
    "responses without generating (set automatically for nebius/*-Infinity-Instruct-0625).")]
IdField = Annotated[str | None, typer.Option("--id-field", help="Field holding a row id (default: 'id' if present).")]
IgnoreResponses = Annotated[bool, typer.Option(
    "--ignore-responses", help="Regenerate even when the source carries responses.")]
Strict = Annotated[bool, typer.Option(
    "--strict", help="Stop at the first malformed JSONL row (naming file and line) instead of skipping and counting.")]
NoDedupe = Annotated[bool, typer.Option("--no-dedupe", help="Keep duplicate prompts.")]
MinChars = Annotated[int, typer.Option("--min-chars", help="Drop prompts shorter than this many characters.")]
MaxChars = Annotated[int | None, typer.Option("--max-chars", help="Drop prompts longer than this many characters.")]
NoShuffle = Annotated[bool, typer.Option("--no-shuffle", help="Keep the source order instead of a seeded shuffle.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed of the prompt shuffle and of response sampling.")]
Limit = Annotated[int | None, typer.Option("--limit", help="Keep at most this many prompts (after the shuffle).")]

Target = Annotated[str, typer.Option(
    "--target", help="Target model: HF hub id, HF directory, .gguf file or 'smollm2-135m-instruct' (embedded).")]
Device = Annotated[str | None, typer.Option("--device", help="Torch device for the target (default: cuda if "
                                            "available, else cpu).")]
Backend = Annotated[str, typer.Option("--backend", help="Generation backend: 'hf' (batched transformers generate) "
                                      "or 'vllm' (needs vLLM installed; the HF copy then stays on CPU).")]
MaxNew = Annotated[int, typer.Option("--max-new-tokens", help="Longest response; longer ones are cut there.")]
Temperature = Annotated[float, typer.Option("--temperature", help="Sampling temperature (0 = greedy).")]
TopK = Annotated[int | None, typer.Option("--top-k", help="Top-k (0 = off; default: the target's generation "
                                          "config, else off).")]
TopP = Annotated[float | None, typer.Option("--top-p", help="Top-p (default: the target's generation config, "
                                            "else 1).")]
GenBatch = Annotated[int, typer.Option("--gen-batch-size", help="Prompts per generate call (sorted by length).")]
MaxPrompt = Annotated[int, typer.Option("--max-prompt-tokens", help="Skip (and count) prompts longer than this.")]

FeatDtype = Annotated[str, typer.Option("--dtype", help="Storage dtype of the hidden states: bfloat16, float16 or "
                                        "float32 (16-bit halves the disk).")]
FeatBatch = Annotated[int, typer.Option("--batch-size", help="Documents per teacher-forced forward pass.")]
ShardTokens = Annotated[int, typer.Option("--shard-tokens", help="Tokens per shard file (a shard is the unit of "
                                          "resume and of shuffling).")]
MaxTokens = Annotated[int | None, typer.Option("--max-tokens", help="Token budget: stop after about this many "
                                               "tokens (rows in dataset order).")]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress bars.")]


def _prompt_config(**kw: Any) -> Any:
    from lkspec.config import parse
    from lkspec.data.prompts import PromptConfig

    return parse(PromptConfig, {
        "source": kw["prompts"], "hf_config": kw["hf_config"], "split": kw["split"],
        "prompt_field": kw["prompt_field"], "messages_field": kw["messages_field"],
        "response_field": kw["response_field"], "id_field": kw["id_field"],
        "use_responses": not kw["ignore_responses"], "strict": kw["strict"], "dedupe": not kw["no_dedupe"],
        "min_chars": kw["min_chars"], "max_chars": kw["max_chars"], "shuffle": not kw["no_shuffle"],
        "seed": kw["seed"], "limit": kw["limit"],
    }, source="prompt options")


def _regen_config(**kw: Any) -> Any:
    from lkspec.config import parse
    from lkspec.data.regenerate import RegenConfig

    return parse(RegenConfig, {
        "backend": kw["backend"], "max_new_tokens": kw["max_new_tokens"], "temperature": kw["temperature"],
        "top_k": kw["top_k"], "top_p": kw["top_p"], "batch_size": kw["gen_batch_size"], "seed": kw["seed"],
        "max_prompt_tokens": kw["max_prompt_tokens"],
    }, source="generation options")


def _load_target(spec: str, device: str | None, backend: str = "hf") -> Any:
    from lkspec.targets import load_target

    if backend == "vllm":
        import importlib.util

        from lkspec.data.regenerate import VLLM_INSTALL
        from lkspec.errors import LkspecError

        if importlib.util.find_spec("vllm") is None:
            raise LkspecError(VLLM_INSTALL)
        return load_target(spec, device="cpu")  # tokenizer, chat template and identity only
    return load_target(spec, device=device)


@data_app.command("prompts")
def prompts_cmd(
    prompts: Source = "sharegpt", hf_config: HfConfig = None, split: Split = "train", prompt_field: PromptField = None,
    messages_field: MessagesField = None, response_field: ResponseField = None, id_field: IdField = None,
    ignore_responses: IgnoreResponses = False, strict: Strict = False, no_dedupe: NoDedupe = False,
    min_chars: MinChars = 1, max_chars: MaxChars = None, no_shuffle: NoShuffle = False, seed: Seed = 0,
    limit: Limit = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write the prompt set here as JSONL "
                                             "({id, messages, source[, response]}).")] = None,
    show: Annotated[int, typer.Option("--show", help="Print this many prompts.")] = 3,
) -> None:
    """Load, clean and inspect a prompt set; optionally export it to JSONL."""
    from lkspec.data.prompts import load_prompts, write_prompts_jsonl

    ps = load_prompts(_prompt_config(**locals()))
    typer.echo(f"{len(ps.records)} prompts from {ps.config.source} ({json.dumps(ps.stats)})")
    for rec in ps.records[:show]:
        text = rec.messages[-1]["content"].replace("\n", " ")
        typer.echo(f"  {rec.id}: {text[:100]}{'…' if len(text) > 100 else ''}")
    if out is not None:
        write_prompts_jsonl(ps, out)
        typer.echo(f"wrote {out}")


@data_app.command("regenerate")
def regenerate_cmd(
    out: Annotated[Path, typer.Option("--out", help="Output tokens dataset directory (rerun to resume).")],
    target: Target = "smollm2-135m-instruct", device: Device = None, backend: Backend = "hf",
    max_new_tokens: MaxNew = 256, temperature: Temperature = 1.0, top_k: TopK = None, top_p: TopP = None,
    gen_batch_size: GenBatch = 16, max_prompt_tokens: MaxPrompt = 2048,
    prompts: Source = "sharegpt", hf_config: HfConfig = None, split: Split = "train", prompt_field: PromptField = None,
    messages_field: MessagesField = None, response_field: ResponseField = None, id_field: IdField = None,
    ignore_responses: IgnoreResponses = False, strict: Strict = False, no_dedupe: NoDedupe = False,
    min_chars: MinChars = 1, max_chars: MaxChars = None, no_shuffle: NoShuffle = False, seed: Seed = 0,
    limit: Limit = None, quiet: Quiet = False,
) -> None:
    """Have the target answer every prompt; write the tokens dataset (input_ids, loss_mask, prompt_id)."""
    from lkspec.data.prompts import load_prompts
    from lkspec.data.regenerate import regenerate

    pcfg, rcfg = _prompt_config(**locals()), _regen_config(**locals())
    ps = load_prompts(pcfg)
    meta = regenerate(_load_target(target, device, backend), ps, out, rcfg, progress=not quiet)
    typer.echo(f"tokens dataset {out}: {json.dumps(meta['counts'])}")


@data_app.command("features")
def features_cmd(
    tokens: Annotated[Path, typer.Option("--tokens", help="Tokens dataset directory (from `lkspec data "
                                         "regenerate`).")],
    out: Annotated[Path, typer.Option("--out", help="Output feature directory (rerun to resume).")],
    target: Target = "smollm2-135m-instruct", device: Device = None, dtype: FeatDtype = "bfloat16",
    batch_size: FeatBatch = 8, shard_tokens: ShardTokens = DEFAULT_SHARD_TOKENS, max_tokens: MaxTokens = None,
    quiet: Quiet = False,
) -> None:
    """Teacher-forced target pass over a tokens dataset -> post-norm hidden states in safetensors shards."""
    from lkspec.data.features import extract_features

    store = extract_features(_load_target(target, device), tokens, out, dtype=dtype, batch_size=batch_size,
                             shard_tokens=shard_tokens, max_tokens=max_tokens, progress=not quiet)
    typer.echo(f"features {out}: {store.num_docs} docs, {store.num_tokens} tokens, {len(store.shards)} shards")


@data_app.command("all")
def all_cmd(
    out: Annotated[Path, typer.Option("--out", help="Output directory: prompts.jsonl, tokens/ and features/ go "
                                      "there; rerun to resume (finished stages are skipped).")] = Path("lkspec-data"),
    target: Target = "smollm2-135m-instruct", device: Device = None, backend: Backend = "hf",
    max_new_tokens: MaxNew = 256, temperature: Temperature = 1.0, top_k: TopK = None, top_p: TopP = None,
    gen_batch_size: GenBatch = 16, max_prompt_tokens: MaxPrompt = 2048,
    prompts: Source = "sharegpt", hf_config: HfConfig = None, split: Split = "train", prompt_field: PromptField = None,
    messages_field: MessagesField = None, response_field: ResponseField = None, id_field: IdField = None,
    ignore_responses: IgnoreResponses = False, strict: Strict = False, no_dedupe: NoDedupe = False,
    min_chars: MinChars = 1, max_chars: MaxChars = None, no_shuffle: NoShuffle = False, seed: Seed = 0,
    limit: Limit = None,
    dtype: FeatDtype = "bfloat16", batch_size: FeatBatch = 8, shard_tokens: ShardTokens = DEFAULT_SHARD_TOKENS,
    max_tokens: MaxTokens = None, quiet: Quiet = False,
) -> None:
    """prompts -> regenerate -> features in one go; each stage is skipped when already complete."""
    from lkspec.data.pipeline import run_all

    pcfg, rcfg = _prompt_config(**locals()), _regen_config(**locals())
    def get_target(stage: str) -> Any:
        return _load_target(target, device, backend if stage == "regenerate" else "hf")

    paths = run_all(get_target, pcfg, rcfg, out, dtype=dtype,
                    batch_size=batch_size, shard_tokens=shard_tokens, max_tokens=max_tokens, progress=not quiet)
    for name, path in paths.items():
        typer.echo(f"{name}: {path}")


def register(app: typer.Typer) -> None:
    """Add this stage's subcommands to the root app."""
    app.add_typer(data_app, name="data")
