"""What the trainer reads documents from: one protocol for the on-disk store and the online mode.

The trainer never asks where hidden states come from. A `FeatureStore` reads them from shards on disk,
`OnlineFeatures` computes them from a tokens dataset as they are read; both satisfy `DocSource`, and both
can say what each document trains on (`iter_doc_masks`) without producing a single hidden state, which
is all that planning an epoch needs. `ShardedDocs` holds what the two share: a shard list and the counts
and identity derived from it.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from lkspec.errors import LkspecError
from lkspec.targets import TargetIdentity

STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Doc:
    """One training document: tokens, which of them are trained on, and the target states along it."""

    row: int
    input_ids: torch.Tensor  # [L] int64
    loss_mask: torch.Tensor  # [L] bool
    hidden: torch.Tensor  # [L, H] storage dtype
    # [L] fp32 logsumexp of the target's full logits (T = 1) from `hidden` as stored: lets a truncated draft's
    # training project only its kept rows of the lm_head
    target_lse: torch.Tensor | None = None
    # [L, A*H] storage dtype: the input states of the index's `aux_layers` concatenated (what EAGLE-3 reads); None
    # when the features carry only the final state
    aux: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


LOCATION_KEYS = ("path", "tokens")  # index entries that say where something was, not what it is


def _content(obj: Any) -> Any:
    """The index without the locations it records (a moved output folder holds the same documents)."""
    if isinstance(obj, dict):
        return {k: _content(v) for k, v in obj.items() if not (k in LOCATION_KEYS and isinstance(v, str))}
    if isinstance(obj, list):
        return [_content(v) for v in obj]
    return obj


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:20]


def data_identity(src: DocSource) -> dict[str, str]:
    """Where the documents are and what they are: the absolute path and a digest of the index (which lists
    every shard's rows and token counts and the target, but not where the index says its inputs were), so a
    resumed run can refuse any other documents and accept the same ones moved elsewhere."""
    return {"path": str(Path(src.path).resolve()), "fingerprint": _digest(_content(src.index))}


def recorded_parts(data: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The parts of a draft's recorded training data (its `data` block): a combined source lists them under
    `source.parts`, a single store is one part."""
    source = (data or {}).get("source") or {}
    if not isinstance(source, dict):
        return []
    parts = source.get("parts") if isinstance(source.get("parts"), list) else [source]
    return [p for p in parts if isinstance(p, dict)]


def same_documents(src: DocSource, fingerprint: str) -> bool:
    """Whether `fingerprint` (recorded by data_identity) names these documents; digests recorded before the
    locations were left out (which a moved folder changed) are accepted too."""
    return fingerprint in (data_identity(src)["fingerprint"], _digest(src.index))


def storage_dtype(name: str) -> torch.dtype:
    try:
        return STORAGE_DTYPES[name]
    except KeyError:
        raise LkspecError(f"unknown feature dtype {name!r}; choose one of {', '.join(STORAGE_DTYPES)}") from None


class DocSource(Protocol):
    """Everything the trainer and the pipeline read from their training documents."""

    path: Path  # the feature directory or tokens dataset, named in messages and recorded with the draft
    index: dict[str, Any]  # format, target identity, dtype, hidden size, meta and the shard list

    @property
    def identity(self) -> TargetIdentity: ...

    @property
    def meta(self) -> dict[str, Any]:
        """What the documents were made from (tokens dataset, settings); the trainer records it."""
        ...

    @property
    def num_docs(self) -> int: ...

    @property
    def num_tokens(self) -> int: ...

    @property
    def num_loss_tokens(self) -> int: ...

    def check_target(self, identity: TargetIdentity) -> None:
        """Raise a one-line error unless the documents were made for this target."""
        ...

    def iter_docs(self, *, seed: int | None = None, shard_ids: list[int] | None = None) -> Iterator[Doc]:
        """Documents shard by shard; with `seed`, shards and documents within a shard are shuffled."""
        ...

    def iter_doc_masks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """(row, loss_mask) of every document in `iter_docs(seed=None)` order, without hidden states."""
        ...


class ShardedDocs:
    """The index-derived half of a `DocSource`; subclasses set `path` and `index` and load shards."""

    index: dict[str, Any]
    path: Path

    @property
    def identity(self) -> TargetIdentity:
        return TargetIdentity.model_validate(self.index["target"])

    @property
    def hidden_size(self) -> int:
        return int(self.index["hidden_size"])

    @property
    def dtype(self) -> torch.dtype:
        return storage_dtype(self.index["dtype"])

    @property
    def aux_layers(self) -> list[int]:
        """The target layers whose input states each document carries as `aux` (empty: none)."""
        return list(self.index.get("aux_layers") or [])

    def check_aux_layers(self, layers: list[int] | tuple[int, ...], what: str) -> None:
        """One line when the documents lack the aux states `what` reads."""
        if list(layers) and list(layers) != self.aux_layers:
            have = f"aux layers {self.aux_layers}" if self.aux_layers else "no aux layers"
            raise LkspecError(f"{what} reads target layers {list(layers)} but the features in {self.path} carry "
                              f"{have}; extract features with --aux-layers {','.join(map(str, layers))} "
                              f"(or train online from the tokens dataset)")

    @property
    def meta(self) -> dict[str, Any]:
        return dict(self.index.get("meta", {}))

    @property
    def shards(self) -> list[dict[str, Any]]:
        return list(self.index["shards"])

    @property
    def num_docs(self) -> int:
        return sum(int(s["num_docs"]) for s in self.shards)

    @property
    def num_tokens(self) -> int:
        return sum(int(s["num_tokens"]) for s in self.shards)

    @property
    def num_loss_tokens(self) -> int:
        return sum(int(s.get("num_loss_tokens", 0)) for s in self.shards)

    def check_target(self, identity: TargetIdentity) -> None:
        identity.check(self.identity, what=f"features in {self.path}")

    def load_shard(self, i: int) -> list[Doc]:
        raise NotImplementedError

    def iter_doc_masks(self) -> Iterator[tuple[int, torch.Tensor]]:
        raise NotImplementedError

    def iter_docs(self, *, seed: int | None = None, shard_ids: list[int] | None = None) -> Iterator[Doc]:
        """Documents shard by shard; with `seed`, shards and documents within a shard are shuffled."""
        order = list(range(len(self.shards))) if shard_ids is None else list(shard_ids)
        rng = random.Random(seed)
        if seed is not None:
            rng.shuffle(order)
        for i in order:
            docs = self.load_shard(i)
            if seed is not None:
                rng.shuffle(docs)
            yield from docs
