"""Choosing a truncated draft vocabulary: which N target tokens the heads keep.

Every head's cost (training and serving) is N x D instead of V x D, but a token outside the map can never
be accepted: alpha <= p(S). So the map should hold the tokens the target actually puts mass on where the
draft is used. `mass` ranks tokens by the target's summed next-token probability over the training
response positions (one lm_head pass over them): on SmolLM2 with 15K response tokens, N = 8192 keeps 93 %
of that mass and 88 % of held-out response tokens, where ranking by token counts keeps 78 % (most of the
vocabulary is never seen in so little data, and counts cannot rank what they never saw). `count` ranks
by occurrences in the training responses (no target pass); a file gives the ids explicitly.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lkspec.data.source import Doc
from lkspec.errors import LkspecError


@dataclass
class VocabChoice:
    tokens: torch.Tensor  # [N] kept target ids, ascending
    coverage: dict[str, float]  # share of the training responses' tokens (and target mass) the map keeps

    def describe(self) -> str:
        parts = [f"{k} {v:.1%}" for k, v in self.coverage.items()]
        return f"{self.tokens.numel()} tokens; coverage: {', '.join(parts)}"


def read_token_list(path: str | Path, vocab_size: int) -> torch.Tensor:
    """A JSON list of ids, or one id per line."""
    p = Path(path)
    if not p.is_file():
        raise LkspecError(f"token list {p} does not exist; pass a JSON list of ids or one id per line")
    text = p.read_text().strip()
    try:
        ids = json.loads(text) if text.startswith("[") else [int(x) for x in text.split()]
    except ValueError:
        raise LkspecError(f"token list {p} is neither a JSON list of ids nor one integer id per line") from None
    t = torch.tensor(ids, dtype=torch.long).unique(sorted=True)
    if t.numel() == 0 or int(t.min()) < 0 or int(t.max()) >= vocab_size:
        raise LkspecError(f"token list {p} must hold ids in [0, {vocab_size}); fix the file")
    return t


def choose_vocab(docs: Iterable[Doc], *, size: int, vocab_size: int, rank: str, teacher: Any,
                 tokens_file: str | None = None) -> VocabChoice:
    """The kept ids, with their coverage of the training responses (and of the target's mass for `mass`)."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    mass = torch.zeros(vocab_size, dtype=torch.float64)
    with torch.no_grad():
        for d in docs:
            resp = d.input_ids[d.loss_mask.bool()].long()
            counts += torch.bincount(resp, minlength=vocab_size).double()
            if rank == "mass" and tokens_file is None:
                # position t's distribution is that of token t+1: the positions before response tokens
                before = d.loss_mask.bool().roll(-1)
                before[-1] = False
                h = d.hidden[before]
                for s in range(0, h.shape[0], 1024):
                    logits = teacher.logits_from_hidden(h[s : s + 1024])
                    mass += torch.softmax(logits.float(), -1).sum(0).double().cpu()
    if tokens_file is not None:
        keep = read_token_list(tokens_file, vocab_size)
    else:
        score = mass if rank == "mass" else counts
        if rank not in ("mass", "count"):
            raise LkspecError(f"unknown vocabulary ranking {rank!r}; choose mass or count")
        keep = score.argsort(descending=True, stable=True)[: min(size, vocab_size)].sort().values
    kept = torch.zeros(vocab_size, dtype=torch.bool)
    kept[keep] = True
    coverage = {"training response tokens": float(counts[kept].sum() / counts.sum().clamp_min(1))}
    if mass.sum() > 0:
        coverage["target mass at training positions"] = float(mass[kept].sum() / mass.sum())
    return VocabChoice(keep, coverage)
