"""Online features: the feature store's reading interface, computed on the fly from a tokens dataset.

For targets that fit beside the draft, writing hidden states to disk only to read them back costs disk
and time for nothing. Shard i here is the shard extraction would write as shard-i (same rows, batches and
order, from one `plan_shards`), computed when it is read, so training on either yields the same docs.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from lkspec.data import DEFAULT_SHARD_TOKENS
from lkspec.data.plan import forward_docs, plan_shards, row_lengths, tokens_source
from lkspec.data.regenerate import load_tokens
from lkspec.data.source import STORAGE_DTYPES, Doc, ShardedDocs, storage_dtype
from lkspec.targets import Target, check_aux_layers

FORMAT = "lkspec-features-online/1"


class OnlineFeatures(ShardedDocs):
    """A `DocSource` over a tokens dataset: hidden states are the target's, computed per shard on demand.

    They stay on the target's device, in the target's dtype unless `dtype` names a storage dtype (then they
    equal a store's exactly).
    """

    def __init__(self, target: Target, tokens_dir: str | Path, *, dtype: str | None = None, batch_size: int = 8,
                 shard_tokens: int = DEFAULT_SHARD_TOKENS, max_tokens: int | None = None,
                 aux_layers: list[int] | None = None) -> None:
        self.target = target
        self.path = Path(tokens_dir)
        self.ds, meta = load_tokens(self.path, target.identity)
        self._cast = storage_dtype(dtype) if dtype is not None else None
        self._aux = list(aux_layers or [])
        check_aux_layers(self._aux, target.config)
        lengths = row_lengths(self.ds)
        self.plan = plan_shards(lengths, batch_size=batch_size, shard_tokens=shard_tokens, max_tokens=max_tokens)
        loss = self._loss_counts(lengths)
        dtype_name = dtype or next((k for k, v in STORAGE_DTYPES.items() if v == target.dtype), str(target.dtype))
        self.index = {
            "format": FORMAT, "target": target.identity.model_dump(), "dtype": dtype_name,
            "hidden_size": target.hidden_size, "aux_layers": self._aux,
            "meta": {**tokens_source(self.path, meta),
                     "extract": {"batch_size": batch_size, "shard_tokens": shard_tokens, "max_tokens": max_tokens,
                                 "online": True}},
            "shards": [
                {"file": None, "num_docs": sum(len(b) for b in sh),
                 "num_tokens": sum(lengths[r] for b in sh for r in b),
                 "num_loss_tokens": sum(loss[r] for b in sh for r in b),
                 "rows": [r for b in sh for r in b]}
                for sh in self.plan
            ],
        }

    def _loss_counts(self, lengths: list[int]) -> list[int]:
        if "num_prompt_tokens" in self.ds.column_names:
            return [n - p for n, p in zip(lengths, self.ds["num_prompt_tokens"], strict=True)]
        return [int(sum(m)) for m in self.ds["loss_mask"]]

    def load_shard(self, i: int) -> list[Doc]:
        docs: list[Doc] = []
        for rows in self.plan[i]:
            docs.extend(forward_docs(self.target, self.ds, rows, self._cast, self._aux))
        return docs

    def iter_doc_masks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """Straight from the dataset's `loss_mask` column: the target never runs."""
        masks = self.ds.select_columns(["loss_mask"])
        for shard in self.plan:
            rows = [r for b in shard for r in b]
            for r, m in zip(rows, masks[rows]["loss_mask"], strict=True):
                yield r, torch.tensor(m, dtype=torch.bool)
