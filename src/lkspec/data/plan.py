"""The extraction plan: which rows of a tokens dataset become which shards, and the forward pass per batch.

One plan decides everything: which rows are used (a prefix, up to the token budget), how they are batched
(sorted by length, longest first, `batch_size` per forward pass) and where shards end (after the batch
that brings a shard to `shard_tokens`). Disk extraction writes shard i of the plan as shard-i; the online
mode computes shard i on demand. So a killed extraction that is rerun recomputes exactly the missing
shards from the same batches, and the online mode yields the same docs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from lkspec.data import DEFAULT_SHARD_TOKENS
from lkspec.data.source import Doc, storage_dtype
from lkspec.errors import LkspecError
from lkspec.targets import Target


def row_lengths(ds: Any) -> list[int]:
    """Tokens per row, read from Arrow without materialising the token lists."""
    import pyarrow.compute as pc

    table = ds.data.table if getattr(ds, "_indices", None) is None else ds.flatten_indices().data.table
    return pc.list_value_length(table.column("input_ids")).to_pylist()


def plan_shards(lengths: list[int], *, batch_size: int = 8, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                max_tokens: int | None = None) -> list[list[list[int]]]:
    """shards -> batches -> row numbers, deterministic in its arguments."""
    if batch_size < 1 or shard_tokens < 1:
        raise LkspecError("batch_size and shard_tokens must be >= 1")
    rows, total = [], 0
    for r, n in enumerate(lengths):
        if max_tokens is not None and total >= max_tokens:
            break
        rows.append(r)
        total += n
    rows.sort(key=lambda r: (-lengths[r], r))
    shards: list[list[list[int]]] = [[]]
    filled = 0
    for s in range(0, len(rows), batch_size):
        batch = rows[s : s + batch_size]
        shards[-1].append(batch)
        filled += sum(lengths[r] for r in batch)
        if filled >= shard_tokens:
            shards.append([])
            filled = 0
    return [sh for sh in shards if sh]


def forward_docs(target: Target, ds: Any, rows: list[int], dtype: torch.dtype | None = None,
                 aux_layers: Sequence[int] = ()) -> list[Doc]:
    """One right-padded teacher-forced pass; the mask keeps padding out of every real position."""
    batch = ds[rows]
    lengths = [len(ids) for ids in batch["input_ids"]]
    width = max(lengths)
    ids = torch.full((len(rows), width), target.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, seq in enumerate(batch["input_ids"]):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    hidden, aux = target.states(ids, mask, aux_layers)
    docs = []
    for i, (r, n) in enumerate(zip(rows, lengths, strict=True)):
        h = hidden[i, :n].to(dtype or hidden.dtype).clone()
        docs.append(Doc(row=r, input_ids=ids[i, :n].clone(),
                        loss_mask=torch.tensor(batch["loss_mask"][i], dtype=torch.bool), hidden=h,
                        target_lse=full_logsumexp(target, h),
                        aux=None if aux is None else aux[i, :n].to(dtype or aux.dtype).clone()))
    return docs


@torch.no_grad()
def full_logsumexp(target: Target, hidden: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """logsumexp of the target's logits over its whole vocabulary at T = 1, per row ([L] fp32, on the CPU)."""
    return torch.cat([torch.logsumexp(target.logits_from_hidden(hidden[s : s + chunk]), -1).cpu()
                      for s in range(0, hidden.shape[0], chunk)]) if hidden.shape[0] else torch.zeros(0)


def estimate_bytes(num_tokens: int, hidden_size: int, dtype: str, num_aux: int = 0) -> int:
    """Shard bytes: the hidden states (and aux states, `num_aux` more of the same width) dominate; ids (int32),
    mask (bool) and the teacher's logsumexp (fp32) add 9 bytes per token."""
    return num_tokens * ((1 + num_aux) * hidden_size * storage_dtype(dtype).itemsize + 9)


def tokens_source(tokens_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """What the features were made from; the trainer records it, resume compares `key`."""
    settings = meta.get("settings", {})
    counts = meta.get("counts", {})
    key = hashlib.sha256(json.dumps([settings, counts], sort_keys=True).encode()).hexdigest()[:16]
    return {"tokens": str(tokens_dir.resolve()), "key": key, "settings": settings, "counts": counts,
            "prompts": meta.get("prompts", {}).get("config", {})}
