"""From a feature store to micro-batches: survey, held-out split, global batches, rank slices, packing.

Draft heads are position-wise (head k at anchor t sees h_t and tokens t+1..t+k only), so documents can
be packed back to back into one row: `alignment.head_mask(..., doc_ids)` drops every anchor whose
target lies in another document. A document longer than a micro-batch is cut into windows that overlap
by K+1 tokens; each anchor is *owned* by exactly one window (the one where all of its inputs and its
target are present), so packing and splitting change the memory profile, never the loss.

The global batch is fixed by the data order alone (documents, or a token budget); ranks then take
token-balanced slices of it, so N processes optimise exactly what one process would.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from lkspec.alignment import head_mask
from lkspec.data.source import Doc, DocSource
from lkspec.errors import LkspecError


# ------------------------------------------------------------------------------------------------
# survey: what is in the store, without the hidden states where possible
# ------------------------------------------------------------------------------------------------
def head_counts(loss_mask: torch.Tensor, num_heads: int) -> list[int]:
    """Valid anchors of heads 1..K in one document (its target token exists and is trained on)."""
    m = loss_mask.bool()[None]
    return [int(head_mask(m, k).sum()) for k in range(1, num_heads + 1)]


@dataclass
class DocInfo:
    row: int
    length: int
    counts: list[int]  # valid anchors per head


def survey(store: DocSource, num_heads: int) -> list[DocInfo]:
    """Row, length and per-head valid anchors of every document.

    Planning needs only the loss masks, so this reads `iter_doc_masks()`: no hidden state is loaded from
    disk or computed by a target.
    """
    return [DocInfo(int(row), int(m.numel()), head_counts(m, num_heads)) for row, m in store.iter_doc_masks()]


def row_hash(row: int) -> int:
    """A fixed pseudo-random key per dataset row: the held-out split depends on rows only."""
    return int.from_bytes(hashlib.blake2b(str(row).encode(), digest_size=8).digest(), "big")


@dataclass
class DataPlan:
    """Which documents train, which are held out, and how many steps an epoch takes."""

    train_rows: set[int]
    heldout_rows: set[int]
    train_tokens: int
    heldout_tokens: int
    train_counts: list[int]  # valid anchors per head over the training split
    heldout_counts: list[int]
    steps_per_epoch: int
    num_docs: int
    num_tokens: int
    dropped_docs: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def plan_data(docs: list[DocInfo], *, num_heads: int, heldout_fraction: float, heldout_max_docs: int,
              batch_size: int, batch_tokens: int | None, where: str) -> DataPlan:
    """Split documents and check the data can train every head; one-line errors name the fix."""
    if not docs:
        raise LkspecError(f"{where} holds no documents; build features first with `lkspec data features`")
    usable = [d for d in docs if d.counts[0] > 0]
    if not usable:
        raise LkspecError(
            f"{where}: no document has a response token 2+ positions after another token, so head 1 has "
            f"nothing to learn; regenerate longer responses (loss_mask marks response tokens)"
        )
    n_held = min(math.ceil(heldout_fraction * len(usable)), heldout_max_docs) if heldout_fraction > 0 else 0
    if n_held and len(usable) - n_held < 1:
        raise LkspecError(
            f"{where} has {len(usable)} usable document(s): too few for a held-out split of "
            f"{heldout_fraction:g}; add documents or set data.heldout_fraction=0"
        )
    order = sorted(usable, key=lambda d: (row_hash(d.row), d.row))
    held, train = order[:n_held], order[n_held:]

    def sums(ds: list[DocInfo]) -> list[int]:
        return [sum(d.counts[k] for d in ds) for k in range(num_heads)]

    train_counts, held_counts = sums(train), sums(held)
    if train_counts[-1] == 0:
        k_max = max((k + 1 for k in range(num_heads) if train_counts[k] > 0), default=0)
        longest = max(d.length for d in train)
        raise LkspecError(
            f"{where}: no training document is long enough for head {num_heads} (needs {num_heads + 2}+ tokens "
            f"with response tokens; longest has {longest}); use draft.num_heads <= {k_max} or longer documents"
        )
    if held and held_counts[-1] == 0:
        raise LkspecError(
            f"{where}: the {len(held)} held-out document(s) have no valid position for head {num_heads}; "
            f"raise data.heldout_fraction or set it to 0"
        )
    train_tokens = sum(d.length for d in train)
    # a full token-budget batch holds >= batch_tokens tokens, so this bounds the step count from above
    steps = train_tokens // batch_tokens + 1 if batch_tokens else math.ceil(len(train) / batch_size)
    return DataPlan(
        train_rows={d.row for d in train}, heldout_rows={d.row for d in held}, train_tokens=train_tokens,
        heldout_tokens=sum(d.length for d in held), train_counts=train_counts, heldout_counts=held_counts,
        steps_per_epoch=steps, num_docs=len(docs), num_tokens=sum(d.length for d in docs),
        dropped_docs=len(docs) - len(usable),
    )


# ------------------------------------------------------------------------------------------------
# global batches and rank slices
# ------------------------------------------------------------------------------------------------
def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def global_batches(store: DocSource, rows: set[int], *, seed: int | None, batch_size: int,
                   batch_tokens: int | None) -> Iterator[list[Doc]]:
    """The epoch's global batches, in a order fixed by (seed, epoch) only."""
    buf: list[Doc] = []
    tokens = 0
    for doc in store.iter_docs(seed=seed):
        if doc.row not in rows:
            continue
        buf.append(doc)
        tokens += len(doc)
        if (batch_tokens and tokens >= batch_tokens) or (not batch_tokens and len(buf) == batch_size):
            yield buf
            buf, tokens = [], 0
    if buf:
        yield buf


def rank_slice(docs: list[Doc], rank: int, world: int) -> list[Doc]:
    """This rank's share of a global batch: longest documents first to the least-loaded rank."""
    if world == 1:
        return list(docs)
    load = [0] * world
    owner = [0] * len(docs)
    for i in sorted(range(len(docs)), key=lambda i: (-len(docs[i]), i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += len(docs[i])
    return [d for i, d in enumerate(docs) if owner[i] == rank]


# ------------------------------------------------------------------------------------------------
# packing into micro-batches
# ------------------------------------------------------------------------------------------------
@dataclass
class MicroBatch:
    """One packed row (batch dimension 1): documents or windows of documents back to back."""

    hidden: torch.Tensor  # [1, T, H] storage dtype
    input_ids: torch.Tensor  # [1, T]
    loss_mask: torch.Tensor  # [1, T] bool
    doc_ids: torch.Tensor  # [1, T] int64, one id per window
    own: torch.Tensor  # [1, T] bool: anchors this row is responsible for
    target_lse: torch.Tensor | None = None  # [1, T] fp32 when every document carries it (data.source.Doc)
    aux: torch.Tensor | None = None  # [1, T, A*H] when every document carries aux states (EAGLE-3's input)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])

    @classmethod
    def empty(cls, hidden_size: int, dtype: torch.dtype) -> MicroBatch:
        """A zero-token row: lets a rank with less data keep FSDP's collectives in lockstep."""
        z = torch.zeros(1, 0, dtype=torch.int64)
        return cls(torch.zeros(1, 0, hidden_size, dtype=dtype), z, z.bool(), z, z.bool())

    def head_masks(self, num_heads: int) -> list[torch.Tensor]:
        """[T-k] bool per head: valid, same-document, owned anchors."""
        T = self.num_tokens
        return [(head_mask(self.loss_mask, k, self.doc_ids) & self.own[:, : max(T - k, 0)])[0]
                for k in range(1, num_heads + 1)]


@dataclass
class _Window:
    doc: Doc
    start: int
    end: int
    own_end: int


def windows(doc: Doc, num_heads: int, max_tokens: int, start: int = 0) -> list[_Window]:
    """Cut a document from `start` on into windows of <= max_tokens overlapping by K+1; anchors
    [start, own_end) of a window are owned."""
    L = len(doc)
    if max_tokens >= L - start:
        return [_Window(doc, start, L, L)]
    stride = max_tokens - (num_heads + 1)
    out, a = [], start
    while True:
        b = min(a + max_tokens, L)
        out.append(_Window(doc, a, b, b if b == L else a + stride))
        if b == L:
            return out
        a += stride


def first_anchor(doc: Doc, num_heads: int) -> int:
    """The first position any head trains at: head k at anchor t predicts token t + k + 1, so nothing before
    the first trained token minus K + 1 is an anchor, an input of one, or a teacher position."""
    trained = doc.loss_mask.nonzero()
    return max(0, int(trained[0]) - num_heads - 1) if len(trained) else 0


def pack(docs: list[Doc], num_heads: int, max_tokens: int, *, context: bool = True) -> list[MicroBatch]:
    """Greedy, order-preserving packing of (windows of) documents into rows of <= max_tokens tokens.

    `context=False` is for a draft that reads nothing but its anchor's chain (MLP-Speculator, MEDUSA): each
    document then starts at its `first_anchor`. The prompt before it would cost the draft's trunk a pass (most of
    a step's positions, for short answers to long prompts) and teach nothing; the loss is the same.
    """
    groups: list[list[_Window]] = []
    cur: list[_Window] = []
    used = 0
    for doc in docs:
        for w in windows(doc, num_heads, max_tokens, 0 if context else first_anchor(doc, num_heads)):
            n = w.end - w.start
            if cur and used + n > max_tokens:
                groups.append(cur)
                cur, used = [], 0
            cur.append(w)
            used += n
    if cur:
        groups.append(cur)
    return [_build(g) for g in groups]


def _build(group: list[_Window]) -> MicroBatch:
    hidden, ids, mask, doc_ids, own = [], [], [], [], []
    lse = [w.doc.target_lse[w.start : w.end] for w in group if w.doc.target_lse is not None]
    aux = [w.doc.aux[w.start : w.end] for w in group if w.doc.aux is not None]
    for i, w in enumerate(group):
        n = w.end - w.start
        hidden.append(w.doc.hidden[w.start : w.end])
        ids.append(w.doc.input_ids[w.start : w.end])
        mask.append(w.doc.loss_mask[w.start : w.end].bool())
        doc_ids.append(torch.full((n,), i, dtype=torch.int64))
        o = torch.zeros(n, dtype=torch.bool)
        o[: w.own_end - w.start] = True
        own.append(o)
    return MicroBatch(
        hidden=torch.cat(hidden)[None], input_ids=torch.cat(ids).long()[None], loss_mask=torch.cat(mask)[None],
        doc_ids=torch.cat(doc_ids)[None], own=torch.cat(own)[None],
        target_lse=torch.cat(lse).float()[None] if len(lse) == len(group) else None,
        aux=torch.cat(aux)[None] if aux and len(aux) == len(group) else None,
    )
