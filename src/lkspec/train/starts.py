"""Reusing a fitted start: the token map and the target initialisation, shared by runs that only differ in
what they train with.

Both are functions of the training documents, the split, the draft options and the seed (the seed draws
whatever a fit leaves untouched), never of the loss, the optimiser or the steps. A study that trains four
losses, a temperature variant and three seeds on one data set would otherwise redo the same fit for every
run: on the 2-core CPU and the embedded target that is the lm_head pass over every training position
(vocabulary ranking) plus the ridge fits, a large share of a one-epoch run. `train.start_cache: DIR` keeps
each start once under DIR/<key>/ (the draft's state dict and the notes the run records), keyed by a digest
of all the inputs above, so a run reuses exactly the tensors its own fit would have produced; anything else
gets a new key. The files are lkspec's own safetensors, written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch

from lkspec.data.source import DocSource, data_identity
from lkspec.drafts import Draft
from lkspec.errors import LkspecError
from lkspec.io import atomic_dir, load_tensors, read_json, save_tensors, sha256_file, write_json
from lkspec.targets import TargetIdentity
from lkspec.train.config import TrainConfig

log = logging.getLogger(__name__)

START_FORMAT = "lkspec-start/1"  # bump when a fit's result changes for the same inputs
WEIGHTS = "start.safetensors"
NOTES = "start.json"


def start_key(cfg: TrainConfig, store: DocSource, train_rows: set[int] | list[int], target: TargetIdentity) -> str:
    """Digest of everything a fitted start depends on."""
    d = cfg.draft
    inputs: dict[str, Any] = {
        "format": START_FORMAT,
        "draft": d.model_dump(mode="json"),
        "vocab_tokens_sha256": sha256_file(d.vocab_tokens) if d.vocab_tokens else None,
        "seed": cfg.seed,
        "data": data_identity(store)["fingerprint"],
        "train_rows": hashlib.sha256(json.dumps(sorted(train_rows)).encode()).hexdigest(),
        "target": target.model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]


def load_start(cache: Path, key: str, draft: Draft) -> dict[str, Any] | None:
    """The notes of a start kept under `key`, loaded into `draft`; None when there is none (or it is damaged)."""
    d = cache / key
    if not (d / WEIGHTS).is_file() or not (d / NOTES).is_file():
        return None
    try:
        record = read_json(d / NOTES)
        tensors = load_tensors(d / WEIGHTS)
        if record.get("format") != START_FORMAT:
            return None
        with torch.no_grad():  # the token map is a buffer of the state dict: loaded with the weights
            draft.load_state_dict(tensors)
    except (LkspecError, OSError, RuntimeError, KeyError, ValueError) as exc:  # damaged or foreign: refit it
        log.warning("fitted start %s is unusable (%s); fitting it again", d, exc)
        return None
    log.info("reusing the fitted start %s (same documents, split, draft options and seed)", d)
    return {**record["notes"], "start_cache": str(d)}


def keep_start(cache: Path, key: str, draft: Draft, notes: dict[str, Any]) -> None:
    """Keep the start for later runs. The cache only saves time, so a cache that cannot be written (read-only,
    full, a file in the way) costs a warning, never the run that has just fitted its start."""
    try:
        with atomic_dir(cache / key, overwrite=True) as tmp:
            save_tensors(tmp / WEIGHTS, {k: v.detach().cpu() for k, v in draft.state_dict().items()}, dedupe=True)
            write_json(tmp / NOTES, {"format": START_FORMAT, "notes": notes})
    except (OSError, LkspecError) as exc:
        log.warning("could not keep the fitted start in %s (%s); training goes on, later runs fit it again "
                    "(point train.start_cache at a writable folder to share it)", cache, exc)
