"""Regeneration: the target answers every prompt itself, so the draft learns the target's own distribution.

Output is the tokens dataset of the contract: a `datasets` Arrow dataset (`save_to_disk`) with columns
`prompt_id`, `input_ids` (prompt + response tokens), `loss_mask` (1 exactly on response tokens), plus
`num_prompt_tokens` and `finish_reason` ("eos" / "length"), and `lkspec-data.json` beside it (target
identity, settings, counts).

Why it is resumable *and* deterministic: prompts are tokenized through the target's chat template and
sorted by length (longest first, ties by position) into fixed batches; batch b samples with a seed derived
from (seed, b). Each finished batch is written atomically as `parts/part-NNNNNN.arrow`, so a killed run
rerun with the same settings skips the parts on disk and computes exactly the batches that are missing —
the final dataset (rows in prompt order) equals that of an uninterrupted run, with no row duplicated or
lost. A directory made for another target or other settings is refused, naming what differs.

Backends (`lkspec.data.backends`, whose names are importable from here too): `hf` (default) runs the
transformers model batched with left padding through lkspec's KV-cache loop, which can keep the states the
feature store needs (`states=`, `lkspec.data.states`); `vllm` is used for big targets on GPUs when vLLM is
installed; a prompt set that already holds the target's responses (e.g.
`nebius/Llama-3.1-8B-Instruct-Infinity-Instruct-0625`) is tokenized directly ("given").
"""

from __future__ import annotations

import functools
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field
from tqdm.auto import tqdm

from lkspec import __version__
from lkspec.config import StrictModel, flag
from lkspec.data.backends import (
    VLLM_INSTALL,
    Generated,
    VllmBackend,
    cut_at_eos,
    derive_seed,
    given_response,
    hf_generate,
)
from lkspec.data.prompts import PromptRecord, PromptSet, fingerprint
from lkspec.data.states import StateSpec, write_batch
from lkspec.data.states import finish as finish_states
from lkspec.errors import LkspecError
from lkspec.io import atomic_path, disk_full_is_one_line, read_json, write_json
from lkspec.targets import Target, TargetIdentity

__all__ = [
    "FORMAT", "META", "PARTS", "RESUME_KEYS", "VLLM_INSTALL", "Generated", "RegenConfig", "VllmBackend", "cut_at_eos",
    "derive_seed", "given_response", "hf_generate", "load_tokens", "prompt_limit", "read_meta", "regenerate",
    "resolve_sampling",
]

log = logging.getLogger(__name__)

FORMAT = "lkspec-tokens/1"
META = "lkspec-data.json"
PARTS = "parts"
# Settings that decide the dataset's content: resuming with any of them changed is refused.
RESUME_KEYS = ("backend", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "batch_size",
               "max_prompt_tokens", "prompts_fingerprint", "num_prompts")


class RegenConfig(StrictModel):
    """How the target answers. `top_k` / `top_p` left unset come from the target's generation config."""

    backend: Literal["hf", "vllm"] = Field("hf", description="Generation backend: 'hf' (the transformers model, "
                                           "batched, lkspec's KV-cache loop) or 'vllm' (needs vLLM installed; the "
                                           "HF copy then stays on CPU).", **flag())
    max_new_tokens: int = Field(256, ge=1, description="Longest response; longer ones are cut there.", **flag())
    temperature: float = Field(1.0, ge=0.0, description="Sampling temperature (0 = greedy).", **flag())
    top_k: int | None = Field(None, ge=0, description="Top-k (0 = off; default: the target's generation config, "
                              "else off).", **flag())
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Top-p (default: the target's generation config, "
                                "else 1).", **flag())
    batch_size: int = Field(16, ge=1, description="Prompts per generate call (sorted by length).",
                            **flag("--gen-batch-size"))
    seed: int = Field(0, description="Seed of the prompt shuffle and of response sampling.", **flag())
    max_prompt_tokens: int = Field(2048, ge=1, description="Skip (and count) prompts longer than this.", **flag())


def resolve_sampling(target: Target, cfg: RegenConfig) -> dict[str, Any]:
    """Temperature 1 by default; top-k / top-p as the target's generation config sets them, else off.

    transformers fills an unset top_k with 50, which would silently truncate the target's distribution,
    so "unset" is made explicit here.
    """
    gen = getattr(target.model, "generation_config", None)
    explicit = gen.to_diff_dict() if gen is not None else {}
    top_k = cfg.top_k if cfg.top_k is not None else int(explicit.get("top_k") or 0)
    top_p = cfg.top_p if cfg.top_p is not None else float(explicit.get("top_p") or 1.0)
    return {"temperature": float(cfg.temperature), "top_k": top_k, "top_p": top_p}


def prompt_limit(target: Target, cfg: RegenConfig) -> int:
    """Longest prompt kept: `max_prompt_tokens`, and room for the response within the target's context."""
    context = getattr(target.model.config, "max_position_embeddings", None)
    limit = cfg.max_prompt_tokens
    if isinstance(context, int) and context > cfg.max_new_tokens:
        limit = min(limit, context - cfg.max_new_tokens)
    return limit


# ---------------------------------------------------------------------------------------------- dataset io


def read_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not (path / META).is_file():
        raise LkspecError(f"{path} is not a tokens dataset (no {META}); create it with `lkspec data regenerate`")
    meta = read_json(path / META)
    if meta.get("format") != FORMAT:
        raise LkspecError(f"{path}/{META} has format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def load_tokens(path: str | Path, identity: TargetIdentity | None = None) -> tuple[Any, dict[str, Any]]:
    """The finished tokens dataset and its metadata; refuses unfinished runs and other targets' data."""
    import datasets

    path = Path(path)
    meta = read_meta(path)
    if identity is not None:
        identity.check(meta["target"], what=f"tokens dataset {path}")
    if not meta.get("complete"):
        raise LkspecError(f"tokens dataset {path} is unfinished; rerun `lkspec data regenerate` with the same "
                          f"settings to complete it")
    return datasets.load_from_disk(str(path)), meta


def _features() -> Any:
    from datasets import Features, List, Value

    return Features({
        "index": Value("int64"), "prompt_id": Value("string"), "input_ids": List(Value("int32")),
        "loss_mask": List(Value("int8")), "num_prompt_tokens": Value("int32"), "finish_reason": Value("string"),
    })


def _write_part(path: Path, rows: dict[str, list[Any]]) -> None:
    from datasets.arrow_writer import ArrowWriter

    with atomic_path(path) as tmp:
        writer = ArrowWriter(features=_features(), path=str(tmp))
        try:
            writer.write_batch(rows)
            writer.finalize()
        finally:
            writer.close()


def _part_name(batch: int) -> str:
    return f"part-{batch:06d}.arrow"


def _check_resume(out: Path, meta: dict[str, Any], identity: TargetIdentity, settings: dict[str, Any]) -> None:
    identity.check(meta["target"], what=f"tokens dataset {out}")
    old = meta.get("settings", {})
    diffs = [f"{k} {old.get(k)!r} != {settings.get(k)!r}" for k in RESUME_KEYS if old.get(k) != settings.get(k)]
    if diffs:
        raise LkspecError(
            f"{out} was made with other settings ({'; '.join(diffs)}); rerun with the same settings to resume, "
            f"or choose a new output directory"
        )


def _finalize(out: Path, parts: list[Path], meta: dict[str, Any], progress: bool = True) -> dict[str, Any]:
    """Concatenate the parts in prompt order and save the dataset; metadata marks it complete last."""
    import datasets
    import pyarrow.compute as pc

    full = datasets.concatenate_datasets([datasets.Dataset.from_file(str(p)) for p in parts])
    for stale in out.glob("data-*.arrow"):
        stale.unlink()
    table = full.data.table
    order = np.argsort(table.column("index").to_numpy(), kind="stable")
    bars = datasets.is_progress_bar_enabled()
    if not progress:
        datasets.disable_progress_bars()
    try:
        full.select(order).remove_columns("index").save_to_disk(str(out))
    finally:
        if bars:
            datasets.enable_progress_bars()
    resp = pc.subtract(pc.list_value_length(table.column("input_ids")), table.column("num_prompt_tokens"))
    finish = dict(zip(*(c.to_pylist() for c in pc.value_counts(table.column("finish_reason")).flatten()),
                      strict=True))
    meta["counts"].update({
        "rows": len(full),
        "prompt_tokens": int(pc.sum(table.column("num_prompt_tokens")).as_py() or 0),
        "response_tokens": int(pc.sum(resp).as_py() or 0),
        "finished_eos": int(finish.get("eos", 0)),
        "finished_length": int(finish.get("length", 0)),
    })
    meta["complete"] = True
    write_json(out / META, meta)
    shutil.rmtree(out / PARTS, ignore_errors=True)
    return meta


# ---------------------------------------------------------------------------------------------- driver


def regenerate(
    target: Target,
    prompts: PromptSet | list[PromptRecord],
    out: str | Path,
    config: RegenConfig | None = None,
    *,
    progress: bool = True,
    on_batch_done: Callable[[int], None] | None = None,
    states: StateSpec | None = None,
) -> dict[str, Any]:
    """Answer every prompt with the target into the tokens dataset at `out`; returns its metadata.

    Reruns resume; a finished directory with the same settings is returned as is. `on_batch_done(b)` is
    called after batch b is safely on disk (tests use it to interrupt a run deterministically). With `states`
    the `hf` backend also keeps the target's states for the feature store (`lkspec.data.states`).
    """
    cfg = config or RegenConfig()
    records = prompts.records if isinstance(prompts, PromptSet) else list(prompts)
    if not records:
        raise LkspecError("the prompt set is empty; check the prompt source and filters")
    given = [r.response is not None for r in records]
    if any(given) and not all(given):
        raise LkspecError("some prompts carry responses and some do not; use one kind of source per dataset")
    backend = "given" if all(given) else cfg.backend
    prompt_fp = fingerprint(records)
    sampling = resolve_sampling(target, cfg) if backend != "given" else {"temperature": None, "top_k": None,
                                                                         "top_p": None}
    settings = {
        "backend": backend, "max_new_tokens": cfg.max_new_tokens, **sampling, "seed": cfg.seed,
        "batch_size": cfg.batch_size, "max_prompt_tokens": cfg.max_prompt_tokens,
        "prompts_fingerprint": prompt_fp, "num_prompts": len(records),
    }
    out = Path(out)
    if (out / META).is_file():
        meta = read_meta(out)
        _check_resume(out, meta, target.identity, settings)
        if meta.get("complete"):
            shutil.rmtree(out / PARTS, ignore_errors=True)
            log.info("tokens dataset %s is already complete (%d rows)", out, meta["counts"]["rows"])
            return meta
    elif out.exists() and any(out.iterdir()):
        raise LkspecError(f"{out} exists and is not a tokens dataset; choose a new output directory")
    else:
        gen = getattr(target.model, "generation_config", None)
        meta = {
            "format": FORMAT, "lkspec_version": __version__, "target": target.identity.model_dump(),
            "settings": settings,
            "prompts": prompts.describe() if isinstance(prompts, PromptSet) else {"count": len(records)},
            "target_generation_config": gen.to_diff_dict() if gen is not None else {},
            "counts": {}, "complete": False,
        }
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / META, meta)

    kept = states if backend == "hf" else None  # only lkspec's own decoding loop can hand its states over
    if backend == "vllm":
        generate: Callable[..., list[Generated]] = VllmBackend(target)
    elif kept is not None:
        generate = functools.partial(hf_generate, keep_states=True, aux_layers=kept.aux_layers)
    else:
        generate = hf_generate

    prompt_ids = [target.render_chat(r.messages) for r in tqdm(
        records, desc="chat template", unit="prompt", disable=not progress or len(records) < 2000)]
    limit = prompt_limit(target, cfg)
    keep = [i for i, p in enumerate(prompt_ids) if len(p) <= limit]
    meta["counts"].update({"prompts": len(records), "skipped_long_prompts": len(records) - len(keep)})
    if not keep:
        raise LkspecError(f"every prompt is longer than {limit} tokens; raise --max-prompt-tokens")
    if len(keep) < len(records):
        log.warning("skipping %d prompts longer than %d tokens", len(records) - len(keep), limit)
    order = sorted(keep, key=lambda i: (-len(prompt_ids[i]), i))
    batches = [order[s : s + cfg.batch_size] for s in range(0, len(order), cfg.batch_size)]
    parts_dir = out / PARTS
    parts_dir.mkdir(exist_ok=True)
    for stray in parts_dir.glob(".*.tmp"):
        stray.unlink()
    done = {b for b in range(len(batches)) if (parts_dir / _part_name(b)).is_file()}
    if done:
        log.info("resuming %s: %d of %d batches already done", out, len(done), len(batches))

    bar = tqdm(total=len(keep), initial=sum(len(batches[b]) for b in done), desc=f"regenerate ({backend})",
               unit="prompt", disable=not progress)
    new_tokens, start = 0, time.perf_counter()
    for b, idx in enumerate(batches):
        if b in done:
            continue
        if backend == "given":
            results = [given_response(target, records[i], prompt_ids[i], cfg.max_new_tokens) for i in idx]
        else:
            results = generate(target, [prompt_ids[i] for i in idx], sampling, cfg.max_new_tokens,
                               derive_seed(cfg.seed, b))
        with disk_full_is_one_line(f"writing batch {b} to {parts_dir}", "the finished batches are kept"):
            if kept is not None:  # before the part: a batch counts as done only with its states
                write_batch(out, b, idx, [g.hidden for g in results],  # type: ignore[misc]
                            [g.aux for g in results] if kept.aux_layers else None, kept)  # type: ignore[misc]
            _write_part(parts_dir / _part_name(b), {
                "index": idx,
                "prompt_id": [records[i].id for i in idx],
                "input_ids": [prompt_ids[i] + g.response for i, g in zip(idx, results, strict=True)],
                "loss_mask": [[0] * len(prompt_ids[i]) + [1] * len(g.response)
                              for i, g in zip(idx, results, strict=True)],
                "num_prompt_tokens": [len(prompt_ids[i]) for i in idx],
                "finish_reason": [g.finish_reason for g in results],
            })
        new_tokens += sum(len(g.response) for g in results)
        bar.update(len(idx))
        bar.set_postfix_str(f"{new_tokens / max(time.perf_counter() - start, 1e-9):.1f} tok/s")
        if on_batch_done is not None:
            on_batch_done(b)
    bar.close()
    with disk_full_is_one_line(f"saving the dataset to {out}", "all batches are kept in parts/"):
        if kept is not None:
            finish_states(out, len(batches), keep, kept)
        meta = _finalize(out, [parts_dir / _part_name(b) for b in range(len(batches))], meta, progress)
    c = meta["counts"]
    log.info("tokens dataset %s: %d rows, %d response tokens (%d ended at EOS, %d at the limit)", out, c["rows"],
             c["response_tokens"], c["finished_eos"], c["finished_length"])
    return meta
