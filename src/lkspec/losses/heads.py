"""From logits to one head's weighted term, and the sum over a draft's K heads.

`draft_head_term` exists on its own so a trainer can compute (and backpropagate) one head at a time,
keeping one [tokens, V] logits tensor alive instead of K (train/step.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lkspec.errors import LkspecError
from lkspec.losses.kernels import check_finite, token_stats
from lkspec.losses.table import GAMMA, TensorMeans, get_loss, head_weight

AlphaMean = Callable[[torch.Tensor], torch.Tensor]
"""Receives a head's local alpha sum, returns the batch-mean alpha lambda is computed from (data parallel:
an all-reduce divided by the global count). Called even when no row is selected, so every rank issues the
same collectives."""


def head_loss(name: str, draft_logits: torch.Tensor, target_logits: torch.Tensor, mask: torch.Tensor | None = None,
              *, eta: float = 3.0, temperature: float = 1.0, impl: str = "chunked") -> torch.Tensor:
    """Scalar loss of one draft head. Logits are [N, V]; `mask` (bool [N]) selects the rows that count."""
    loss = get_loss(name)
    check_finite(draft_logits, target_logits)
    if mask is not None:
        if mask.shape != draft_logits.shape[:1]:
            raise LkspecError(f"mask {tuple(mask.shape)} must be [N] = [{draft_logits.shape[0]}]")
        draft_logits, target_logits = draft_logits[mask.bool()], target_logits[mask.bool()]
    kl, alpha = token_stats(draft_logits, target_logits, temperature, impl)
    return loss(TensorMeans(kl, alpha), eta)  # type: ignore[return-value]


@dataclass
class HeadStats:
    """Sums and counts (not means), so metrics reduce exactly across batches and ranks."""

    count: float
    alpha_sum: float
    kl_sum: float
    loss: float
    lam: float

    @property
    def alpha(self) -> float:
        return self.alpha_sum / self.count if self.count else float("nan")

    @property
    def kl(self) -> float:
        return self.kl_sum / self.count if self.count else float("nan")


def head_weights(num_heads: int, gamma: float = GAMMA) -> list[float]:
    """gamma^(k-1) for heads k = 1..K."""
    return [head_weight(k, gamma) for k in range(1, num_heads + 1)]


def simulated_tau(alphas: Sequence[float]) -> float:
    """Expected acceptance length of a chain draft, bonus included: 1 + sum_k prod_{j<=k} alpha_j."""
    tau, run = 1.0, 1.0
    for a in alphas:
        if not math.isfinite(a):
            break
        run *= a
        tau += run
    return tau


@dataclass
class HeadTerm:
    """One head's contribution: the gamma-weighted differentiable loss, its stats, and per-token KL / alpha."""

    loss: torch.Tensor
    stats: HeadStats
    kl: torch.Tensor  # [n] detached
    alpha: torch.Tensor  # [n] detached


def draft_head_term(name: str, k: int, draft_logits: torch.Tensor, target_logits: torch.Tensor,
                    mask: torch.Tensor | None = None, *, eta: float = 3.0, gamma: float = GAMMA,
                    temperature: float = 1.0, impl: str = "chunked", count: float | None = None,
                    alpha_mean: AlphaMean | None = None, target_lse: torch.Tensor | None = None) -> HeadTerm:
    """gamma^(k-1) * loss_k of head k (1-based) and its statistics; `draft_loss` is the sum over heads.

    `count` is the denominator of the head's means (default: its selected rows); `alpha_mean` (default:
    these rows' mean) supplies the batch-mean alpha for losses whose lambda needs one. `target_lse` [n] is
    the full-vocabulary normaliser when the logits cover a truncated draft vocabulary (lkspec.losses.kernels).
    """
    loss = get_loss(name)
    if mask is not None:
        draft_logits, target_logits = draft_logits[mask.bool()], target_logits[mask.bool()]
        target_lse = None if target_lse is None else target_lse[mask.bool()]
    if draft_logits.shape[0] == 0:
        if alpha_mean is not None:
            alpha_mean(draft_logits.new_zeros((), dtype=torch.float32))
        empty = draft_logits.new_zeros(0, dtype=torch.float32)
        # keep the head in the graph (DDP needs every parameter used)
        return HeadTerm(0.0 * draft_logits.sum(), HeadStats(0.0, 0.0, 0.0, 0.0, float("nan")), empty, empty)
    kl, alpha = token_stats(draft_logits, target_logits, temperature, impl, target_lse)
    a_mean = alpha_mean(alpha.detach().sum()) if alpha_mean is not None else None
    lam_k, loss_k = loss.value(TensorMeans(kl, alpha, count, a_mean), eta)
    stats = HeadStats(count=float(alpha.numel()), alpha_sum=float(alpha.detach().sum()),
                      kl_sum=float(kl.detach().sum()), loss=float(loss_k.detach()),  # type: ignore[union-attr]
                      lam=float(lam_k) if lam_k is not None else float("nan"))
    return HeadTerm(head_weight(k, gamma) * loss_k, stats, kl.detach(), alpha.detach())  # type: ignore[arg-type]


def draft_loss(name: str, head_logits: Sequence[torch.Tensor], head_targets: Sequence[torch.Tensor],
               head_masks: Sequence[torch.Tensor], *, eta: float = 3.0, gamma: float = GAMMA,
               temperature: float = 1.0, impl: str = "chunked", counts: Sequence[float] | None = None,
               alpha_means: Sequence[AlphaMean | None] | None = None) -> tuple[torch.Tensor, list[HeadStats]]:
    """Total loss sum_k gamma^(k-1) * loss_k over heads, and per-head statistics.

    Each head's logits, targets and mask share leading dims (e.g. [B, T-k]); only masked rows count.
    """
    get_loss(name)
    total = head_logits[0].new_zeros((), dtype=torch.float32)
    stats: list[HeadStats] = []
    for k, (z, zp, m) in enumerate(zip(head_logits, head_targets, head_masks, strict=True), 1):
        term = draft_head_term(name, k, z, zp, m, eta=eta, gamma=gamma, temperature=temperature, impl=impl,
                               count=None if counts is None else counts[k - 1],
                               alpha_mean=None if alpha_means is None else alpha_means[k - 1])
        total = total + term.loss
        stats.append(term.stats)
    return total, stats
