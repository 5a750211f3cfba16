"""The on-disk feature store: the target's post-norm hidden states along each training document.

Teacher logits are never stored (V floats per token); they are recomputed from these H-wide states
with the frozen lm_head during training. A store is a directory:

    index.json                  format, target identity, dtype, hidden size, source, and the shard list
    shard-00000.safetensors     documents packed back to back:
        hidden      [Ntok, H]   storage dtype (bf16 / fp16 / fp32)
        input_ids   [Ntok]      int32
        loss_mask   [Ntok]      bool (True on response tokens)
        doc_offsets [n + 1]     int64, document d is rows doc_offsets[d] : doc_offsets[d+1]
        rows        [n]         int64, each document's row in the tokens dataset

Each shard is written atomically and only then appended to index.json (also atomically), so the index
is the single source of truth: a crash or a full disk mid-shard loses only that shard, and a rerun
continues from the rows that are not yet in the index.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from lkspec.errors import LkspecError
from lkspec.io import read_json, save_tensors, write_json
from lkspec.targets import TargetIdentity

FORMAT = "lkspec-features/1"
INDEX = "index.json"
STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class Doc:
    """One training document: tokens, which of them are trained on, and the target states along it."""

    row: int
    input_ids: torch.Tensor  # [L] int64
    loss_mask: torch.Tensor  # [L] bool
    hidden: torch.Tensor  # [L, H] storage dtype

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def storage_dtype(name: str) -> torch.dtype:
    try:
        return STORAGE_DTYPES[name]
    except KeyError:
        raise LkspecError(f"unknown feature dtype {name!r}; choose one of {', '.join(STORAGE_DTYPES)}") from None


class FeatureStore:
    """Read access to a feature directory (shards are opened lazily, one at a time)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not (self.path / INDEX).is_file():
            raise LkspecError(
                f"{self.path} is not a feature directory (no {INDEX}); create it with `lkspec data features`"
            )
        self.index: dict[str, Any] = read_json(self.path / INDEX)
        if self.index.get("format") != FORMAT:
            raise LkspecError(f"{self.path}/{INDEX} has format {self.index.get('format')!r}, expected {FORMAT!r}")

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
        info = self.shards[i]
        with safe_open(str(self.path / info["file"]), framework="pt") as f:
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        off = t["doc_offsets"].tolist()
        return [
            Doc(
                row=int(t["rows"][d]),
                input_ids=t["input_ids"][off[d] : off[d + 1]].long(),
                loss_mask=t["loss_mask"][off[d] : off[d + 1]].bool(),
                hidden=t["hidden"][off[d] : off[d + 1]],
            )
            for d in range(len(off) - 1)
        ]

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


class FeatureWriter:
    """Append-only writer; reopening an existing directory resumes it (after checking it matches)."""

    def __init__(self, path: str | Path, identity: TargetIdentity, *, dtype: str = "bfloat16",
                 meta: dict[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.dtype = storage_dtype(dtype)
        self.path.mkdir(parents=True, exist_ok=True)
        if (self.path / INDEX).is_file():
            store = FeatureStore(self.path)
            store.check_target(identity)
            if store.index["dtype"] != dtype:
                raise LkspecError(
                    f"{self.path} holds {store.index['dtype']} features, not {dtype}; pass --dtype "
                    f"{store.index['dtype']} to resume or choose a new output directory"
                )
            self.index = store.index
        else:
            self.index = {"format": FORMAT, "target": identity.model_dump(), "dtype": dtype,
                          "hidden_size": identity.hidden_size, "meta": meta or {}, "shards": []}
            write_json(self.path / INDEX, self.index)
        self._remove_orphans()

    def _remove_orphans(self) -> None:
        """Shard files not in the index (a crash between the shard and the index write) are dropped."""
        listed = {s["file"] for s in self.index["shards"]}
        for f in self.path.glob("shard-*.safetensors"):
            if f.name not in listed:
                f.unlink()
        for f in self.path.glob(".shard-*.tmp"):
            f.unlink()

    def done_rows(self) -> set[int]:
        return {int(r) for s in self.index["shards"] for r in s.get("rows", [])}

    def write_shard(self, docs: list[Doc]) -> None:
        if not docs:
            return
        H = self.index["hidden_size"]
        for d in docs:
            if d.hidden.shape != (len(d), H):
                raise LkspecError(f"document {d.row}: hidden {tuple(d.hidden.shape)} is not [{len(d)}, {H}]")
        lengths = torch.tensor([len(d) for d in docs], dtype=torch.int64)
        tensors = {
            "hidden": torch.cat([d.hidden for d in docs]).to(self.dtype).cpu(),
            "input_ids": torch.cat([d.input_ids for d in docs]).to(torch.int32).cpu(),
            "loss_mask": torch.cat([d.loss_mask for d in docs]).bool().cpu(),
            "doc_offsets": torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
            "rows": torch.tensor([d.row for d in docs], dtype=torch.int64),
        }
        name = f"shard-{len(self.index['shards']):05d}.safetensors"
        save_tensors(self.path / name, tensors)
        self.index["shards"].append({
            "file": name,
            "num_docs": len(docs),
            "num_tokens": int(lengths.sum()),
            "num_loss_tokens": int(tensors["loss_mask"].sum()),
            "rows": [d.row for d in docs],
        })
        write_json(self.path / INDEX, self.index)
