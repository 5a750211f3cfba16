"""The target's states kept while it answered: a feature store without a second pass over the data.

A feature store holds the target's post-norm state at every prompt and response position, and the `hf` backend
computes exactly those on its way (the prefill, then one position per sampled token: `lkspec.targets.decode`).
So `lkspec data all` and `lkspec run` ask regeneration to keep them (`regenerate(..., states=StateSpec)`), in the
store's dtype and with the aux layers its drafts read, one file per generation batch:

    TOKENS/states/batch-000003.safetensors   hidden [Ntok, H] (aux [Ntok, A*H]), offsets [n + 1], index [n]
    TOKENS/states/index.json                 written once the dataset is complete: dtype, aux layers, each
                                             file's dataset rows

`extract_features` then builds each document from them instead of running the teacher-forced pass (the target
still computes the full-vocabulary normaliser from the stored states, as after a pass) and removes the folder
once the store is complete: it is a hand-over, the store is what lasts. The states are those of a cached,
left-padded decode instead of one right-padded pass: equal up to float rounding (tests/test_states.py).
Where they cannot be used (another dtype or aux layers asked for, a dataset begun without them, the vLLM
backend) the pass runs as before.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lkspec.data.source import Doc, storage_dtype
from lkspec.io import open_safetensors, read_json, save_tensors, write_json

log = logging.getLogger(__name__)

FOLDER = "states"
INDEX = "index.json"
FORMAT = "lkspec-states/1"


@dataclass(frozen=True)
class StateSpec:
    """What the feature store will want: its storage dtype and the aux layers its drafts read."""

    dtype: str
    aux_layers: tuple[int, ...] = field(default_factory=tuple)


def batch_file(b: int) -> str:
    return f"batch-{b:06d}.safetensors"


def write_batch(tokens_dir: Path, b: int, index: list[int], hidden: list[torch.Tensor],
                aux: list[torch.Tensor] | None, spec: StateSpec) -> None:
    """Batch b's states (prompt indices `index`, one [L_i, H] tensor per prompt), written atomically."""
    folder = tokens_dir / FOLDER
    folder.mkdir(exist_ok=True)
    dtype = storage_dtype(spec.dtype)
    lengths = torch.tensor([h.shape[0] for h in hidden], dtype=torch.int64)
    tensors = {"hidden": torch.cat(hidden).to(dtype), "index": torch.tensor(index, dtype=torch.int64),
               "offsets": torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])}
    if aux is not None:
        tensors["aux"] = torch.cat(aux).to(dtype)
    save_tensors(folder / batch_file(b), tensors)


def finish(tokens_dir: Path, num_batches: int, kept_prompts: list[int], spec: StateSpec) -> bool:
    """Index the batch files by dataset row (rows are the kept prompts in prompt order); False, with the files
    removed, when a batch has none (a dataset begun without keeping states)."""
    folder = tokens_dir / FOLDER
    names = [batch_file(b) for b in range(num_batches)]
    if not all((folder / n).is_file() for n in names):
        if folder.is_dir():
            log.info("regeneration kept the states of only some batches; the features will come from a target pass")
            remove(tokens_dir)
        return False
    row_of = {i: r for r, i in enumerate(sorted(kept_prompts))}
    files = []
    for n in names:
        with open_safetensors(folder / n) as f:
            files.append({"file": n, "rows": [row_of[int(i)] for i in f.get_tensor("index")]})
    write_json(folder / INDEX, {"format": FORMAT, "dtype": spec.dtype, "aux_layers": list(spec.aux_layers),
                                "files": files})
    return True


def remove(tokens_dir: Path) -> None:
    """Delete what `write_batch` and `finish` wrote, and the folder when that leaves it empty."""
    folder = tokens_dir / FOLDER
    for p in [*folder.glob("batch-*.safetensors"), folder / INDEX]:
        p.unlink(missing_ok=True)
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


class KeptStates:
    """Documents from the states regeneration kept, for the rows it kept them for."""

    def __init__(self, tokens_dir: Path, index: dict[str, Any]) -> None:
        self.tokens_dir = tokens_dir
        self.where = {r: (f["file"], j) for f in index["files"] for j, r in enumerate(f["rows"])}

    @classmethod
    def open(cls, tokens_dir: Path, spec: StateSpec) -> KeptStates | None:
        """The kept states when they are what the store asks for (dtype, aux layers), else None."""
        path = tokens_dir / FOLDER / INDEX
        if not path.is_file():
            return None
        index = read_json(path)
        if index.get("format") != FORMAT:
            return None
        if index.get("dtype") != spec.dtype or list(index.get("aux_layers", [])) != list(spec.aux_layers):
            log.info("the states kept at regeneration are %s with aux layers %s, the features want %s with %s: "
                     "running the target instead", index.get("dtype"), index.get("aux_layers"), spec.dtype,
                     list(spec.aux_layers))
            return None
        return cls(tokens_dir, index)

    def docs(self, ds: Any, rows: list[int], lse: Any) -> list[Doc] | None:
        """The documents of dataset `rows` (None unless every row has kept states that fit its tokens);
        `lse(hidden)` is the target's full-vocabulary logsumexp per position."""
        if not all(r in self.where for r in rows):
            return None
        batch = ds[rows]
        by_file: dict[str, list[tuple[int, int]]] = {}
        for k, r in enumerate(rows):
            name, j = self.where[r]
            by_file.setdefault(name, []).append((k, j))
        hidden: list[Any] = [None] * len(rows)
        aux: list[Any] = [None] * len(rows)
        for name, items in by_file.items():
            with open_safetensors(self.tokens_dir / FOLDER / name) as f:
                off = f.get_tensor("offsets").tolist()
                has_aux = "aux" in f.keys()  # noqa: SIM118 (safe_open has no __contains__)
                h_slice = f.get_slice("hidden")
                a_slice = f.get_slice("aux") if has_aux else None
                for k, j in items:
                    hidden[k] = h_slice[off[j] : off[j + 1]]
                    aux[k] = a_slice[off[j] : off[j + 1]] if a_slice is not None else None
        out = []
        for k, r in enumerate(rows):
            ids = torch.tensor(batch["input_ids"][k], dtype=torch.long)
            if hidden[k].shape[0] != ids.numel():
                log.warning("the states kept for row %d have %d positions, the row %d tokens: running the target "
                            "instead", r, hidden[k].shape[0], ids.numel())
                return None
            out.append(Doc(row=r, input_ids=ids, loss_mask=torch.tensor(batch["loss_mask"][k], dtype=torch.bool),
                           hidden=hidden[k], target_lse=lse(hidden[k]), aux=aux[k]))
        return out

    def remove(self) -> None:
        remove(self.tokens_dir)

