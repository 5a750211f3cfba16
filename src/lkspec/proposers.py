"""Proposers that need no training: n-gram prompt lookup, and its combination with a trained draft.

`ngram` is vLLM's `ngram` method (`prompt_lookup_min` / `prompt_lookup_max`): find the longest n in
[nmin, nmax] whose last n context tokens occur earlier in the context, take the earliest such occurrence,
and propose the (up to) K tokens that followed it; no match, no proposal (the round emits one token). It
costs nothing to serve and wins wherever the output copies its input (GSM8K numbers, code identifiers),
so it is the baseline any trained draft must beat.

Its proposals depend only on the accepted prefix, which along an emitted path is the path itself, so the
coupling replay scores it exactly at any temperature: q is one-hot on the proposal, and a proposed token
is accepted iff it equals the emitted one.

`ngram+draft` (lkspec's combination, which no engine offers for trained drafts): the n-gram continuation
where the context has a match, the trained draft for the positions after it (and for the whole round
when there is none). The draft's chain consumes the n-gram tokens as its inputs, so along an accepted
prefix its proposals are exactly its teacher-forced ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field, model_validator

from lkspec.config import StrictModel, flag

PROPOSER_KINDS = ("draft", "ngram", "ngram+draft")
NGRAM = "ngram"


class NgramSettings(StrictModel):
    """vLLM's names: prompt_lookup_min / prompt_lookup_max."""

    nmin: int = Field(1, ge=1, description="Shortest n-gram the n-gram lookup matches (vLLM prompt_lookup_min).",
                      **flag("--ngram-min"))
    nmax: int = Field(3, ge=1, description="Longest n-gram the n-gram lookup matches (vLLM prompt_lookup_max).",
                      **flag("--ngram-max"))

    @model_validator(mode="after")
    def _order(self) -> NgramSettings:
        if self.nmin > self.nmax:
            raise ValueError(f"ngram nmin {self.nmin} > nmax {self.nmax}; use nmin <= nmax")
        return self


class NgramIndex:
    """Earliest start of every n-gram (n in [nmin, nmax]) of a growing context: one proposal per call, O(nmax)."""

    def __init__(self, settings: NgramSettings, context: Sequence[int] = ()) -> None:
        self.nmin, self.nmax = settings.nmin, settings.nmax
        self.tokens: list[int] = []
        self.first: dict[tuple[int, ...], int] = {}
        self.extend(context)

    def extend(self, tokens: Sequence[int]) -> None:
        for t in tokens:
            self.tokens.append(int(t))
            m = len(self.tokens)
            for n in range(self.nmin, min(self.nmax, m) + 1):
                self.first.setdefault(tuple(self.tokens[m - n :]), m - n)

    def propose(self, k: int) -> list[int]:
        """Up to k tokens after the earliest earlier occurrence of the longest matching suffix."""
        m = len(self.tokens)
        for n in range(min(self.nmax, m - 1), self.nmin - 1, -1):
            start = self.first.get(tuple(self.tokens[m - n :]))
            if start is not None and start < m - n:  # an earlier occurrence, not the suffix itself
                return self.tokens[start + n : start + n + k]
        return []


def ngram_proposals(prompt: Sequence[int], response: Sequence[int], k: int,
                    settings: NgramSettings) -> list[list[int]]:
    """The proposal at every round boundary b = 0..n-1 along one path (context = prompt + response[:b])."""
    index = NgramIndex(settings, prompt)
    out = []
    for b in range(len(response)):
        out.append(index.propose(k))
        index.extend(response[b : b + 1])
    return out


Kind = Literal["draft", "ngram", "ngram+draft"]
