"""The on-disk feature store: the target's post-norm hidden states along each training document.

Teacher logits are never stored (V floats per token); they are recomputed from these H-wide states
with the frozen lm_head during training. A store is a directory:

    index.json                  format, target identity, dtype, hidden size, source, and the shard list
    shard-00000.safetensors     documents packed back to back:
        hidden      [Ntok, H]   storage dtype (bf16 / fp16 / fp32)
        aux         [Ntok, A*H] the input states of the index's `aux_layers` (EAGLE-3's fused layers), same
                                dtype; only in stores extracted with --aux-layers
        target_lse  [Ntok]      fp32 logsumexp of the target's full logits from the stored hidden (T = 1;
                                optional: stores written before it lack it and train as before)
        input_ids   [Ntok]      int32
        loss_mask   [Ntok]      bool (True on response tokens)
        doc_offsets [n + 1]     int64, document d is rows doc_offsets[d] : doc_offsets[d+1]
        rows        [n]         int64, each document's row in the tokens dataset

Each shard is written atomically and only then appended to index.json (also atomically), so the index
is the single source of truth: a crash or a full disk mid-shard loses only that shard, and a rerun
continues from the rows that are not yet in the index.

`extract_features` fills a store with a teacher-forced target pass over a tokens dataset (the output of
regeneration) along the plan of `lkspec.data.plan`, or, where regeneration kept the target's states
(`lkspec.data.states`), from those without a pass; `OnlineFeatures` (`lkspec.data.online`) offers the
same `DocSource` reading interface computed on the fly, for targets that fit beside the draft;
`open_features` picks one from a path. The names of those modules are importable from here too.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from tqdm.auto import tqdm

from lkspec.config import StrictModel, flag
from lkspec.data import DEFAULT_SHARD_TOKENS
from lkspec.data.online import OnlineFeatures
from lkspec.data.plan import estimate_bytes, forward_docs, full_logsumexp, plan_shards, row_lengths, tokens_source
from lkspec.data.regenerate import META, load_tokens
from lkspec.data.source import STORAGE_DTYPES, Doc, DocSource, ShardedDocs, storage_dtype
from lkspec.data.states import KeptStates, StateSpec
from lkspec.errors import LkspecError
from lkspec.io import disk_full_is_one_line, open_safetensors, read_json, save_tensors, write_json
from lkspec.targets import Target, TargetIdentity, check_aux_layers

__all__ = [
    "DEFAULT_SHARD_TOKENS", "FORMAT", "INDEX", "STORAGE_DTYPES", "Doc", "DocSource", "FeatureStore", "FeatureWriter",
    "OnlineFeatures", "estimate_bytes", "extract_features", "forward_docs", "open_features", "plan_shards",
    "row_lengths", "storage_dtype",
]

log = logging.getLogger(__name__)

FORMAT = "lkspec-features/1"
INDEX = "index.json"


class FeatureOptions(StrictModel):
    """How features are extracted (and, in a pipeline, whether they are cached at all)."""

    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Storage dtype of the hidden states: bfloat16, float16 or float32 (16-bit halves "
        "the disk).", **flag())
    batch_size: int = Field(8, ge=1, description="Documents per teacher-forced forward pass.", **flag())
    shard_tokens: int = Field(DEFAULT_SHARD_TOKENS, ge=1, description="Tokens per shard file (a shard is the unit "
                              "of resume and of shuffling).", **flag())
    max_tokens: int | None = Field(None, ge=1, description="Token budget: stop after about this many tokens (rows "
                                   "in dataset order).", **flag())
    online: bool = Field(False, description="compute hidden states on the fly instead of caching them on disk")
    aux_layers: list[int] = Field(default_factory=list, description="Also store the input states of these target "
                                  "layers (comma-separated hidden_states indices; EAGLE-3 reads three).",
                                  **flag("--aux-layers"))

    def extract_kwargs(self) -> dict[str, Any]:
        return self.model_dump(exclude={"online"})


class FeatureStore(ShardedDocs):
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
    def damaged_fix(self) -> str:
        return (f"rerun the `lkspec data features` command that made {self.path}: it re-extracts damaged "
                f"shards and keeps the rest")

    def load_shard(self, i: int) -> list[Doc]:
        info = self.shards[i]
        with open_safetensors(self.path / info["file"], self.damaged_fix) as f:
            t = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        off = t["doc_offsets"].tolist()
        return [
            Doc(
                row=int(t["rows"][d]),
                input_ids=t["input_ids"][off[d] : off[d + 1]].long(),
                loss_mask=t["loss_mask"][off[d] : off[d + 1]].bool(),
                hidden=t["hidden"][off[d] : off[d + 1]],
                target_lse=t["target_lse"][off[d] : off[d + 1]] if "target_lse" in t else None,
                aux=t["aux"][off[d] : off[d + 1]] if "aux" in t else None,
            )
            for d in range(len(off) - 1)
        ]

    def iter_doc_masks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """Reads only `rows`, `doc_offsets` and `loss_mask` of each shard (safetensors loads lazily)."""
        for info in self.shards:
            with open_safetensors(self.path / info["file"], self.damaged_fix) as f:
                rows, off, mask = f.get_tensor("rows"), f.get_tensor("doc_offsets"), f.get_tensor("loss_mask")
            o = off.tolist()
            for d in range(len(o) - 1):
                yield int(rows[d]), mask[o[d] : o[d + 1]]


class FeatureWriter:
    """Append-only writer; reopening an existing directory resumes it (after checking it matches)."""

    def __init__(self, path: str | Path, identity: TargetIdentity, *, dtype: str = "bfloat16",
                 meta: dict[str, Any] | None = None, aux_layers: list[int] | None = None) -> None:
        self.path = Path(path)
        self.dtype = storage_dtype(dtype)
        if (self.path / INDEX).is_file():
            store = FeatureStore(self.path)
            store.check_target(identity)
            if store.index["dtype"] != dtype:
                raise LkspecError(
                    f"{self.path} holds {store.index['dtype']} features, not {dtype}; pass --dtype "
                    f"{store.index['dtype']} to resume or choose a new output directory"
                )
            if store.aux_layers != list(aux_layers or []):
                raise LkspecError(f"{self.path} holds features with aux layers {store.aux_layers}, not "
                                  f"{list(aux_layers or [])}; pass --aux-layers {','.join(map(str, store.aux_layers))} "
                                  f"to resume or choose a new output directory")
            self.index = store.index
            self._remove_orphans()
            self._drop_damaged()
        else:
            if self.path.exists() and any(self.path.iterdir()):
                raise LkspecError(f"{self.path} exists and is not a feature directory; choose a new output "
                                  f"directory (lkspec writes features only into an empty or its own folder)")
            self.path.mkdir(parents=True, exist_ok=True)
            self.index = {"format": FORMAT, "target": identity.model_dump(), "dtype": dtype,
                          "hidden_size": identity.hidden_size, "meta": meta or {}, "shards": []}
            if aux_layers:
                self.index["aux_layers"] = list(aux_layers)
            write_json(self.path / INDEX, self.index)

    def _remove_orphans(self) -> None:
        """Shard files not in the index (a crash between the shard and the index write) are dropped."""
        listed = {s["file"] for s in self.index["shards"]}
        for f in self.path.glob("shard-*.safetensors"):
            if f.name not in listed:
                f.unlink()
        for f in self.path.glob(".shard-*.tmp"):
            f.unlink()

    def _drop_damaged(self) -> None:
        """A listed shard whose file is missing or unreadable (truncated, corrupt) leaves the index, so the
        rerun extracts its documents again; every other shard is kept."""
        good = []
        for info in self.index["shards"]:
            try:
                with open_safetensors(self.path / info["file"]):
                    good.append(info)
            except LkspecError as exc:
                log.warning("%s; re-extracting its %d documents", exc, info["num_docs"])
                (self.path / info["file"]).unlink(missing_ok=True)
        if len(good) != len(self.index["shards"]):
            self.index["shards"] = good
            write_json(self.path / INDEX, self.index)

    def done_rows(self) -> set[int]:
        return {int(r) for s in self.index["shards"] for r in s.get("rows", [])}

    def write_shard(self, docs: list[Doc]) -> None:
        if not docs:
            return
        H = self.index["hidden_size"]
        A = len(self.index.get("aux_layers") or [])
        for d in docs:
            if d.hidden.shape != (len(d), H):
                raise LkspecError(f"document {d.row}: hidden {tuple(d.hidden.shape)} is not [{len(d)}, {H}]")
            if A and (d.aux is None or d.aux.shape != (len(d), A * H)):
                raise LkspecError(f"document {d.row}: aux {None if d.aux is None else tuple(d.aux.shape)} is not "
                                  f"[{len(d)}, {A * H}]")
        lengths = torch.tensor([len(d) for d in docs], dtype=torch.int64)
        tensors = {
            "hidden": torch.cat([d.hidden for d in docs]).to(self.dtype).cpu(),
            "input_ids": torch.cat([d.input_ids for d in docs]).to(torch.int32).cpu(),
            "loss_mask": torch.cat([d.loss_mask for d in docs]).bool().cpu(),
            "doc_offsets": torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
            "rows": torch.tensor([d.row for d in docs], dtype=torch.int64),
        }
        if A:
            tensors["aux"] = torch.cat([d.aux for d in docs]).to(self.dtype).cpu()  # type: ignore[misc]
        if all(d.target_lse is not None for d in docs):
            tensors["target_lse"] = torch.cat([d.target_lse.float().cpu() for d in docs])  # type: ignore[union-attr]
        used, n = {s["file"] for s in self.index["shards"]}, len(self.index["shards"])
        while f"shard-{n:05d}.safetensors" in used:  # a re-extracted damaged shard leaves a gap in the numbers
            n += 1
        name = f"shard-{n:05d}.safetensors"
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


def extract_features(
    target: Target,
    tokens_dir: str | Path,
    out: str | Path,
    *,
    dtype: str = "bfloat16",
    batch_size: int = 8,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    max_tokens: int | None = None,
    aux_layers: list[int] | None = None,
    progress: bool = True,
    on_shard_done: Callable[[int], None] | None = None,
) -> FeatureStore:
    """Teacher-forced target pass over a tokens dataset into a feature store; reruns resume."""
    tokens_dir, out = Path(tokens_dir), Path(out)
    ds, meta = load_tokens(tokens_dir, target.identity)
    storage_dtype(dtype)
    aux_layers = list(aux_layers or [])
    check_aux_layers(aux_layers, target.config)
    source = tokens_source(tokens_dir, meta)
    extract = {"batch_size": batch_size, "shard_tokens": shard_tokens, "max_tokens": max_tokens}
    if (out / INDEX).is_file():
        old = FeatureStore(out).meta.get("key")
        if old is not None and old != source["key"]:
            raise LkspecError(f"{out} holds features of another tokens dataset (key {old} != {source['key']}); "
                              f"choose a new output directory")
    writer = FeatureWriter(out, target.identity, dtype=dtype, meta={**source, "extract": extract},
                           aux_layers=aux_layers)
    writer.index["meta"]["extract"] = extract
    lengths = row_lengths(ds)
    plan = plan_shards(lengths, batch_size=batch_size, shard_tokens=shard_tokens, max_tokens=max_tokens)
    done = writer.done_rows()
    total = sum(lengths[r] for sh in plan for b in sh for r in b)
    todo = total - sum(lengths[r] for sh in plan for b in sh for r in b if r in done)
    need = estimate_bytes(todo, target.hidden_size, dtype, len(aux_layers))
    free = shutil.disk_usage(out).free
    per_token = estimate_bytes(1, target.hidden_size, dtype, len(aux_layers))
    log.info("features: %d tokens to extract (%d done) x %d bytes per token (hidden %d%s, %s) -> about %.2f GiB "
             "in %s (%.1f GiB free)", todo, total - todo, per_token, target.hidden_size,
             f" + aux layers {aux_layers}" if aux_layers else "", dtype, need / 2**30, out, free / 2**30)
    if need > free:
        log.warning("the estimate exceeds the free disk space; pass --max-tokens or free space "
                    "(completed shards survive a full disk, so a rerun resumes)")
    if todo == 0:
        log.info("features in %s are already complete (%d docs, %d tokens)", out, len(done), total)
        return FeatureStore(out)
    kept = KeptStates.open(tokens_dir, StateSpec(dtype, tuple(aux_layers)))
    if kept is not None:
        log.info("features: from the states the target kept while answering (no second pass over %s)", tokens_dir)

    def lse(h: torch.Tensor) -> torch.Tensor:
        return full_logsumexp(target, h.to(target.device))
    with tqdm(total=total, initial=total - todo, desc="features", unit="tok", unit_scale=True,
              disable=not progress) as bar:
        for s, shard in enumerate(plan):
            batches = [[r for r in b if r not in done] for b in shard]
            batches = [b for b in batches if b]
            if not batches:
                continue
            docs: list[Doc] = []
            for rows in batches:
                got = kept.docs(ds, rows, lse) if kept is not None else None
                docs.extend(got if got is not None else forward_docs(target, ds, rows, writer.dtype, aux_layers))
                bar.update(sum(lengths[r] for r in rows))
            n = len(writer.index["shards"])
            with disk_full_is_one_line(f"writing shard {n} to {out}",
                                       f"the partial shard was discarded and the {n} earlier shards are intact"):
                writer.write_shard(docs)
            if on_shard_done is not None:
                on_shard_done(s)
    store = FeatureStore(out)
    log.info("features in %s: %d docs, %d tokens in %d shards", out, store.num_docs, store.num_tokens,
             len(store.shards))
    if kept is not None:  # a hand-over: the store holds them now
        kept.remove()
    return store


def open_features(spec: str | Path, target: Target | None = None, **online: Any) -> DocSource:
    """A feature directory -> `FeatureStore`; a tokens dataset directory (with a target) -> `OnlineFeatures`."""
    path = Path(str(spec).removeprefix("online:"))
    if (path / INDEX).is_file() and not str(spec).startswith("online:"):
        store = FeatureStore(path)
        if target is not None:
            store.check_target(target.identity)
        return store
    if (path / META).is_file():
        if target is None:
            raise LkspecError(f"{path} is a tokens dataset: online features need the target (pass --target)")
        return OnlineFeatures(target, path, **online)
    raise LkspecError(f"{path} is neither a feature directory ({INDEX}) nor a tokens dataset ({META}); "
                      f"create one with `lkspec data features` or `lkspec data regenerate`")
