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

`extract_features` fills a store with a teacher-forced target pass over a tokens dataset (the output of
regeneration); `OnlineFeatures` offers the same reading interface computed on the fly, for targets that
fit beside the draft; `open_features` picks one from a path.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from lkspec.errors import LkspecError
from lkspec.io import read_json, save_tensors, write_json
from lkspec.targets import Target, TargetIdentity

log = logging.getLogger(__name__)

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


class DocSource:
    """The reading interface shared by the on-disk store and the online mode (both keep an `index` dict)."""

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


class FeatureStore(DocSource):
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
        entry = {
            "file": name,
            "num_docs": len(docs),
            "num_tokens": int(lengths.sum()),
            "num_loss_tokens": int(tensors["loss_mask"].sum()),
            "rows": [d.row for d in docs],
        }
        try:
            write_json(self.path / INDEX, {**self.index, "shards": [*self.index["shards"], entry]})
        except BaseException:
            (self.path / name).unlink(missing_ok=True)  # not in the index: it must not outlive the failure
            raise
        self.index["shards"].append(entry)


# ---------------------------------------------------------------------------------------------- extraction
#
# One plan decides everything: which rows of the tokens dataset are used (a prefix, up to the token
# budget), how they are batched (sorted by length, longest first, `batch_size` per forward pass) and where
# shards end (after the batch that brings a shard to `shard_tokens`). Disk extraction writes shard i of
# the plan as shard-i; the online mode computes shard i on demand. So a killed extraction that is rerun
# recomputes exactly the missing shards from the same batches, and the online mode yields the same docs.


def row_lengths(ds: Any) -> list[int]:
    """Tokens per row, read from Arrow without materialising the token lists."""
    import pyarrow.compute as pc

    table = ds.data.table if getattr(ds, "_indices", None) is None else ds.flatten_indices().data.table
    return pc.list_value_length(table.column("input_ids")).to_pylist()


def plan_shards(lengths: list[int], *, batch_size: int = 8, shard_tokens: int = 32768,
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


def forward_docs(target: Target, ds: Any, rows: list[int], dtype: torch.dtype | None = None) -> list[Doc]:
    """One right-padded teacher-forced pass; the mask keeps padding out of every real position."""
    batch = ds[rows]
    lengths = [len(ids) for ids in batch["input_ids"]]
    width = max(lengths)
    ids = torch.full((len(rows), width), target.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, seq in enumerate(batch["input_ids"]):
        ids[i, : len(seq)] = torch.tensor(seq)
        mask[i, : len(seq)] = 1
    hidden = target.hidden_states(ids, mask)
    return [
        Doc(row=r, input_ids=ids[i, :n].clone(), loss_mask=torch.tensor(batch["loss_mask"][i], dtype=torch.bool),
            hidden=hidden[i, :n].to(dtype or hidden.dtype).clone())
        for i, (r, n) in enumerate(zip(rows, lengths, strict=True))
    ]


def estimate_bytes(num_tokens: int, hidden_size: int, dtype: str) -> int:
    """Shard bytes: the hidden states dominate; ids (int32) and mask (bool) add 5 bytes per token."""
    return num_tokens * (hidden_size * storage_dtype(dtype).itemsize + 5)


def _tokens_source(tokens_dir: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """What the features were made from; the trainer records it, resume compares `key`."""
    settings = meta.get("settings", {})
    counts = meta.get("counts", {})
    key = hashlib.sha256(json.dumps([settings, counts], sort_keys=True).encode()).hexdigest()[:16]
    return {"tokens": str(tokens_dir.resolve()), "key": key, "settings": settings, "counts": counts,
            "prompts": meta.get("prompts", {}).get("config", {})}


def extract_features(
    target: Target,
    tokens_dir: str | Path,
    out: str | Path,
    *,
    dtype: str = "bfloat16",
    batch_size: int = 8,
    shard_tokens: int = 32768,
    max_tokens: int | None = None,
    progress: bool = True,
    on_shard_done: Callable[[int], None] | None = None,
) -> FeatureStore:
    """Teacher-forced target pass over a tokens dataset into a feature store; reruns resume."""
    from lkspec.data.regenerate import load_tokens

    tokens_dir, out = Path(tokens_dir), Path(out)
    ds, meta = load_tokens(tokens_dir, target.identity)
    storage_dtype(dtype)
    source = _tokens_source(tokens_dir, meta)
    extract = {"batch_size": batch_size, "shard_tokens": shard_tokens, "max_tokens": max_tokens}
    if (out / INDEX).is_file():
        old = FeatureStore(out).meta.get("key")
        if old is not None and old != source["key"]:
            raise LkspecError(f"{out} holds features of another tokens dataset (key {old} != {source['key']}); "
                              f"choose a new output directory")
    writer = FeatureWriter(out, target.identity, dtype=dtype, meta={**source, "extract": extract})
    writer.index["meta"]["extract"] = extract
    lengths = row_lengths(ds)
    plan = plan_shards(lengths, batch_size=batch_size, shard_tokens=shard_tokens, max_tokens=max_tokens)
    done = writer.done_rows()
    total = sum(lengths[r] for sh in plan for b in sh for r in b)
    todo = total - sum(lengths[r] for sh in plan for b in sh for r in b if r in done)
    need = estimate_bytes(todo, target.hidden_size, dtype)
    free = shutil.disk_usage(out).free
    log.info("features: %d tokens to extract (%d done) x hidden %d x %s -> about %.2f GiB in %s (%.1f GiB free)",
             todo, total - todo, target.hidden_size, dtype, need / 2**30, out, free / 2**30)
    if need > free:
        log.warning("the estimate exceeds the free disk space; pass --max-tokens or free space "
                    "(completed shards survive a full disk, so a rerun resumes)")
    if todo == 0:
        log.info("features in %s are already complete (%d docs, %d tokens)", out, len(done), total)
        return FeatureStore(out)
    bar = tqdm(total=total, initial=total - todo, desc="features", unit="tok", unit_scale=True,
               disable=not progress)
    for s, shard in enumerate(plan):
        batches = [[r for r in b if r not in done] for b in shard]
        batches = [b for b in batches if b]
        if not batches:
            continue
        docs: list[Doc] = []
        for rows in batches:
            docs.extend(forward_docs(target, ds, rows, writer.dtype))
            bar.update(sum(lengths[r] for r in rows))
        try:
            writer.write_shard(docs)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
            bar.close()
            raise LkspecError(
                f"disk full while writing shard {len(writer.index['shards'])} to {out}: the partial shard was "
                f"discarded and the {len(writer.index['shards'])} earlier shards are intact; free space and rerun "
                f"the same command to resume"
            ) from None
        if on_shard_done is not None:
            on_shard_done(s)
    bar.close()
    store = FeatureStore(out)
    log.info("features in %s: %d docs, %d tokens in %d shards", out, store.num_docs, store.num_tokens,
             len(store.shards))
    return store


class OnlineFeatures(DocSource):
    """The feature store's reading interface, computed on the fly from a tokens dataset (no disk).

    For targets that fit beside the draft: shard i is the shard extraction would write as shard-i (same
    rows, batches and order), computed when `load_shard(i)` is called. Hidden states stay on the target's
    device, in the target's dtype unless `dtype` names a storage dtype (then they equal a store's exactly).
    """

    def __init__(self, target: Target, tokens_dir: str | Path, *, dtype: str | None = None, batch_size: int = 8,
                 shard_tokens: int = 32768, max_tokens: int | None = None) -> None:
        from lkspec.data.regenerate import load_tokens

        self.target = target
        self.path = Path(tokens_dir)
        self.ds, meta = load_tokens(self.path, target.identity)
        self._cast = storage_dtype(dtype) if dtype is not None else None
        lengths = row_lengths(self.ds)
        self.plan = plan_shards(lengths, batch_size=batch_size, shard_tokens=shard_tokens, max_tokens=max_tokens)
        loss = self._loss_counts(lengths)
        dtype_name = dtype or next((k for k, v in STORAGE_DTYPES.items() if v == target.dtype), str(target.dtype))
        self.index = {
            "format": "lkspec-features-online/1", "target": target.identity.model_dump(), "dtype": dtype_name,
            "hidden_size": target.hidden_size,
            "meta": {**_tokens_source(self.path, meta),
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
            docs.extend(forward_docs(self.target, self.ds, rows, self._cast))
        return docs


def open_features(spec: str | Path, target: Target | None = None, **online: Any) -> DocSource:
    """A feature directory -> `FeatureStore`; a tokens dataset directory (with a target) -> `OnlineFeatures`."""
    path = Path(str(spec).removeprefix("online:"))
    if (path / INDEX).is_file() and not str(spec).startswith("online:"):
        store = FeatureStore(path)
        if target is not None:
            store.check_target(target.identity)
        return store
    from lkspec.data.regenerate import META

    if (path / META).is_file():
        if target is None:
            raise LkspecError(f"{path} is a tokens dataset: online features need the target (pass --target)")
        return OnlineFeatures(target, path, **online)
    raise LkspecError(f"{path} is neither a feature directory ({INDEX}) nor a tokens dataset ({META}); "
                      f"create one with `lkspec data features` or `lkspec data regenerate`")
