"""One optimizer step's arithmetic: teacher logits, draft heads one at a time, the loss, the gradients.

Memory. K heads x tokens x V fp32 logits do not fit for real vocabularies (6 x 2048 x 128256 x 4 B =
6 GB, twice that with what backward keeps). So per micro-batch the trunk (`draft.head_states`, small:
[tokens, inner]) runs once with its graph, and each head then computes its logits only for its valid
anchors, takes its loss and runs its own backward into a detached copy of its state; one final backward
pushes the collected state gradients through the trunk. At most one head's [tokens, V] logits (plus the
loss's chunked temporaries) is alive at a time. Teacher logits are computed once per micro-batch, only
at positions some head needs, with the frozen lm_head.

lambda. lk_hybrid's lambda_k = exp(-eta * alpha_k) uses the mean alpha_k of the *global* batch (all
micro-batches, all ranks), so accumulation and data parallelism change nothing:
* every rank holds at most one micro-batch: each head all-reduces its alpha sum right before its
  backward (one scalar collective per head), no extra compute;
* otherwise a no-grad pass over the step's micro-batches measures alpha_k first (one extra forward).
Denominators are the global valid-anchor counts (known from the masks before any forward), so each
rank's loss is its exact share of the global mean and gradients are *summed* across ranks.

Chain losses (lk_tau) weight head k at anchor t by the other heads' alpha there, so `measure_chain` runs every
head once without gradients before the per-head backward passes: one extra head forward, no extra memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Protocol

import torch
from torch import nn

from lkspec.drafts import Draft
from lkspec.errors import LkspecError
from lkspec.losses import AlphaMean, chain_of, draft_head_term, get_loss, token_stats
from lkspec.train.batching import MicroBatch, pack
from lkspec.train.distributed import DistContext
from lkspec.train.metrics import HeadSums


def head_modules(draft: Draft) -> list[nn.Module]:
    """The nn.Linear computing head k's logits, k = 1..K (found by weight identity, so any arch works)."""
    out = []
    linears = [m for m in draft.modules() if isinstance(m, nn.Linear)]
    for k in range(1, draft.num_heads + 1):
        w = draft.head_weight(k)
        matches = [m for m in linears if m.weight is w]
        if not matches:
            raise TypeError(f"{type(draft).__name__}: head {k}'s weight is not an nn.Linear's")
        out.append(matches[min(k - 1, len(matches) - 1)])
    return out


class Teacher(Protocol):
    """What a step needs from the target: its frozen lm_head, as logits from post-norm hidden states (all of
    the vocabulary, or the given rows)."""

    def logits_from_hidden(self, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor: ...


def known_alpha_mean(value: torch.Tensor) -> AlphaMean:
    """lambda's batch-mean alpha, measured beforehand (a no-grad pass over the step's micro-batches)."""
    return lambda _local_sum: value


class StepRunner:
    """Computes losses and gradients of micro-batches for one draft and one frozen lm_head."""

    def __init__(self, draft: Draft, lm_head: Teacher, heads: list[nn.Module], *, loss: str, eta: float,
                 gamma: float, temperature: float, impl: str, micro_batch_tokens: int,
                 ctx: DistContext | None = None, device: torch.device | None = None,
                 autocast_dtype: torch.dtype | None = None, trunk: Callable[..., list[torch.Tensor]] | None = None,
                 grad_scale: float = 1.0, lockstep: bool = False) -> None:
        self.draft, self.lm_head, self.heads = draft, lm_head, heads
        self.K = len(heads)
        self.loss = get_loss(loss)
        self.eta, self.gamma, self.temperature, self.impl = eta, gamma, temperature, impl
        self.micro_batch_tokens = micro_batch_tokens
        self.ctx = ctx or DistContext()
        self.device = device or torch.device("cpu")
        self.autocast_dtype = autocast_dtype
        self.trunk = trunk or draft.head_states
        self.grad_scale = grad_scale  # fsdp averages gradients over ranks; the loss is pre-multiplied to undo it
        # fsdp: every forward/backward of a sharded unit is a collective, so all ranks must run the same number
        # of micro-batches, heads and backward passes (empty ones included)
        self.lockstep = lockstep

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ----- one micro-batch ----------------------------------------------------------------------
    def micro(self, mb: MicroBatch, sums: HeadSums, *, backward: bool, counts: list[float] | None = None,
              alpha_means: list[AlphaMean] | None = None) -> None:
        K, dev = self.K, self.device
        hidden = mb.hidden.to(dev, non_blocking=True)
        ids = mb.input_ids.to(dev, non_blocking=True)
        masks = [m.to(dev) for m in mb.head_masks(K)]
        needed = torch.zeros(mb.num_tokens, dtype=torch.bool, device=dev)
        for k, m in enumerate(masks, 1):
            needed[k:] |= m  # head k at anchor t is taught by the target's distribution at t + k
        index = torch.cumsum(needed, 0) - 1
        with torch.no_grad():
            lse = None
            token_map = self.draft.token_map
            if token_map is not None and mb.target_lse is not None and self.temperature == 1.0:
                # the features carry the full normaliser: project only the kept rows of the lm_head
                teacher = self.lm_head.logits_from_hidden(hidden[0, needed], rows=token_map)  # [M, N] fp32
                lse = mb.target_lse[0].to(dev)[needed]
            else:
                teacher = self.lm_head.logits_from_hidden(hidden[0, needed])  # [M, V] fp32
                if token_map is not None:  # a truncated head: its columns, and the full normaliser once
                    lse = torch.logsumexp(teacher / self.temperature, -1)
                    teacher = teacher[:, token_map.to(dev)]
        with torch.set_grad_enabled(backward), self.autocast():
            states = [s[0] for s in self.trunk(*self.draft_inputs(mb, hidden), ids, **self.packing(mb, masks))]

        def rows(k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
            """Head k's anchors, the teacher's logits there and their full-vocabulary normalisers."""
            m = masks[k - 1]
            return m, teacher[index[k:][m]], None if lse is None else lse[index[k:][m]]

        chain = self.measure_chain(states, rows) if self.loss.chain else None
        leaves: list[torch.Tensor] = []
        for k in range(1, K + 1):
            m, teacher_k, lse_k = rows(k)
            leaf = states[k - 1].detach().requires_grad_(True) if backward else states[k - 1]
            with torch.set_grad_enabled(backward), self.autocast():
                z = self.heads[k - 1](leaf[m])
            chain_k = None if chain is None else chain[k - 1, : m.numel()][m]
            term = draft_head_term(
                self.loss.name, k, z, teacher_k, None, eta=self.eta, gamma=self.gamma,
                temperature=self.temperature, impl=self.impl, count=None if counts is None else counts[k - 1],
                alpha_mean=None if alpha_means is None else alpha_means[k - 1], target_lse=lse_k, chain=chain_k,
            )
            sums.add(k, term.kl, term.alpha, self.eta, term.chain)
            if backward and (term.alpha.numel() > 0 or self.lockstep):
                (term.loss * self.grad_scale if self.grad_scale != 1.0 else term.loss).backward()
            leaves.append(leaf)
            del z, term
        if backward:
            if self.lockstep:
                pairs = [(s, leaf.grad if leaf.grad is not None else torch.zeros_like(s))
                         for s, leaf in zip(states, leaves, strict=True)]
            else:
                pairs = [(s, leaf.grad) for s, leaf in zip(states, leaves, strict=True) if leaf.grad is not None]
            if pairs:
                torch.autograd.backward([s for s, _ in pairs], [g for _, g in pairs])

    @torch.no_grad()
    def measure_chain(self, states: list[torch.Tensor], rows: Callable[[int], tuple[torch.Tensor, ...]]
                      ) -> torch.Tensor:
        """[K, T-1] dE[tau]/d alpha per head and anchor, from a gradient-free pass of every head (a chain loss).

        One extra head forward: head k's weight needs the alphas of the heads after it, so they are measured
        before any head's backward (holding every head's logits instead would cost K [tokens, V] tensors).
        """
        def alpha_of(k: int, m: torch.Tensor) -> torch.Tensor:
            _, teacher_k, lse_k = rows(k + 1)
            with self.autocast():
                z = self.heads[k](states[k].detach()[m])
            return token_stats(z, teacher_k, self.temperature, self.impl, lse_k)[1]

        return chain_of(alpha_of, [rows(k)[0] for k in range(1, self.K + 1)])

    def draft_inputs(self, mb: MicroBatch, hidden: torch.Tensor) -> tuple[torch.Tensor]:
        """What the draft reads: the final state, or (EAGLE-3) the aux states, zero-wide in an empty row."""
        if not self.draft.aux_layers:
            return (hidden,)
        if mb.aux is not None:
            return (mb.aux.to(self.device, non_blocking=True),)
        if mb.num_tokens:
            raise LkspecError(f"the draft reads target layers {list(self.draft.aux_layers)} but these features "
                              f"carry no aux states; extract them with --aux-layers")
        width = len(self.draft.aux_layers) * self.draft.config.hidden_size
        return (hidden.new_zeros(1, 0, width),)

    def packing(self, mb: MicroBatch, masks: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        """A draft that attends must not look across the documents packed into one row, and computes its chains
        only at the anchors some head trains on (the others are context: keys, never queries)."""
        if not self.draft.attends:
            return {}
        anchors = torch.zeros(mb.num_tokens, dtype=torch.bool, device=self.device)
        for m in masks:
            anchors[: m.numel()] |= m  # head k's mask covers anchors 0..T-k-1
        return {"segments": mb.doc_ids.to(self.device), "anchors": anchors[None]}

    def reduced_alpha_mean(self, k: int, counts: list[float]) -> AlphaMean:
        """lambda's batch-mean alpha from one all-reduce of head k's alpha sum, right before its backward."""
        n = max(1.0, counts[k - 1])

        def reduce(local_sum: torch.Tensor) -> torch.Tensor:
            return self.ctx.sum_(local_sum.detach().clone().float()) / n

        return reduce

    # ----- one optimizer step's worth of documents ------------------------------------------------
    def _lockstep(self, micro_batches: list[MicroBatch]) -> list[MicroBatch]:
        if not self.lockstep:
            return micro_batches
        n = self.ctx.max_int(len(micro_batches))
        h = self.draft.config.hidden_size
        return micro_batches + [MicroBatch.empty(h, torch.float32) for _ in range(n - len(micro_batches))]

    def _alpha_means(self, micro_batches: list[MicroBatch], counts: list[float]) -> list[AlphaMean] | None:
        """How lambda gets the global batch's mean alpha, for losses that need it (see the module docstring)."""
        if not self.loss.batch_alpha:
            return None
        if self.ctx.max_int(len(micro_batches)) <= 1:
            return [self.reduced_alpha_mean(k, counts) for k in range(1, self.K + 1)]
        pre = HeadSums(self.K)
        for mb in micro_batches:
            self.micro(mb, pre, backward=False)
        self.ctx.sum_(pre.t)
        return [known_alpha_mean(torch.tensor(a, dtype=torch.float32, device=self.device)) for a in pre.alphas()]

    def accumulate(self, micro_batches: list[MicroBatch]) -> HeadSums:
        """Forward + backward over this rank's micro-batches; returns the globally reduced head sums."""
        K = self.K
        micro_batches = self._lockstep(micro_batches)
        local = torch.zeros(K, dtype=torch.float64)
        for mb in micro_batches:
            local += torch.tensor([float(m.sum()) for m in mb.head_masks(K)], dtype=torch.float64)
        counts = self.ctx.sum_(local).tolist()
        alpha_means = self._alpha_means(micro_batches, counts)
        sums = HeadSums(K)
        for mb in micro_batches:
            self.micro(mb, sums, backward=True, counts=counts, alpha_means=alpha_means)
        if alpha_means is not None and not micro_batches:
            for reduce in alpha_means:  # an empty slice still joins every head's collective
                reduce(torch.zeros((), device=self.device))
        self.ctx.sum_(sums.t)
        return sums

    def pack(self, docs: list[Any]) -> list[MicroBatch]:
        return pack(docs, self.K, self.micro_batch_tokens, context=self.draft.attends)

    @torch.no_grad()
    def evaluate(self, micro_batches: list[MicroBatch]) -> HeadSums:
        micro_batches = self._lockstep(micro_batches)
        sums = HeadSums(self.K)
        for mb in micro_batches:
            self.micro(mb, sums, backward=False)
        self.ctx.sum_(sums.t)
        return sums
