"""Several feature sources read as one: e.g. target-sampled responses at T = 1 and T = 0 side by side.

Rows are renumbered (each part's rows shifted past the previous parts'), so row-keyed choices downstream —
the held-out split, the epoch order — see one set of distinct documents. Every part must belong to the
same target; a shard of the combined source is a shard of one part.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from lkspec.data.source import Doc, ShardedDocs
from lkspec.errors import LkspecError
from lkspec.targets import TargetIdentity


class CombinedSource(ShardedDocs):
    """`DocSource` over `parts` (FeatureStore / OnlineFeatures), in order."""

    def __init__(self, parts: Sequence[ShardedDocs]) -> None:
        if not parts:
            raise LkspecError("no feature source given; pass at least one")
        self.parts = list(parts)
        first = self.parts[0].identity
        for p in self.parts[1:]:
            first.check(p.identity, what=f"features in {p.path}")
        self.path = self.parts[0].path
        self.offsets: list[int] = []
        self._shard_of: list[tuple[int, int]] = []  # combined shard -> (part, shard in part)
        shards: list[dict[str, Any]] = []
        offset = 0
        for i, p in enumerate(self.parts):
            self.offsets.append(offset)
            rows = [r for s in p.shards for r in s.get("rows", [])]
            for j, s in enumerate(p.shards):
                shards.append({**s, "rows": [r + offset for r in s.get("rows", [])], "part": i})
                self._shard_of.append((i, j))
            offset += (max(rows) + 1) if rows else 0
        self.index = {"format": "lkspec-features-combined/1", "target": first.model_dump(),
                      "dtype": self.parts[0].index["dtype"], "hidden_size": self.parts[0].hidden_size,
                      "meta": {"parts": [{"path": str(p.path), **p.meta} for p in self.parts]}, "shards": shards}
        if all(p.aux_layers == self.parts[0].aux_layers for p in self.parts):
            self.index["aux_layers"] = self.parts[0].aux_layers

    @property
    def paths(self) -> list[Path]:
        return [p.path for p in self.parts]

    def check_target(self, identity: TargetIdentity) -> None:
        for p in self.parts:
            p.check_target(identity)

    def check_aux_layers(self, layers: list[int] | tuple[int, ...], what: str) -> None:
        for p in self.parts:
            p.check_aux_layers(layers, what)

    def load_shard(self, i: int) -> list[Doc]:
        part, j = self._shard_of[i]
        return [replace(d, row=d.row + self.offsets[part]) for d in self.parts[part].load_shard(j)]

    def iter_doc_masks(self) -> Iterator[tuple[int, torch.Tensor]]:
        for part, off in zip(self.parts, self.offsets, strict=True):
            for row, mask in part.iter_doc_masks():
                yield row + off, mask
