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
from lkspec.losses.kernels import check_finite, token_stats, token_stats_reference
from lkspec.losses.table import GAMMA, TensorMeans, get_loss, head_weight, lam

AlphaMean = Callable[[torch.Tensor], torch.Tensor]
"""Receives a head's local alpha sum, returns the batch-mean alpha lambda is computed from (data parallel:
an all-reduce divided by the global count). Called even when no row is selected, so every rank issues the
same collectives."""


def head_loss(name: str, draft_logits: torch.Tensor, target_logits: torch.Tensor, mask: torch.Tensor | None = None,
              *, eta: float = 3.0, temperature: float = 1.0, impl: str = "chunked",
              chain: torch.Tensor | None = None) -> torch.Tensor:
    """Scalar loss of one draft head. Logits are [N, V]; `mask` (bool [N]) selects the rows that count;
    `chain` [N] is a chain loss's c_t (`lkspec.losses.Means.chain_tv`)."""
    loss = get_loss(name)
    check_finite(draft_logits, target_logits)
    if mask is not None:
        if mask.shape != draft_logits.shape[:1]:
            raise LkspecError(f"mask {tuple(mask.shape)} must be [N] = [{draft_logits.shape[0]}]")
        draft_logits, target_logits = draft_logits[mask.bool()], target_logits[mask.bool()]
        chain = None if chain is None else chain[mask.bool()]
    kl, alpha = token_stats(draft_logits, target_logits, temperature, impl)
    return loss(TensorMeans(kl, alpha, chain_t=chain), eta)  # type: ignore[return-value]


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


def chain_weights(alpha: torch.Tensor) -> torch.Tensor:
    """dE[tau_t]/d alpha_{t,k} for E[tau_t] = 1 + sum_k prod_{j<=k} alpha_{t,j}, per anchor: [K, ...] -> [K, ...].

    `alpha` holds each head's one-token acceptance at the same anchors, 0 where head k has no target (past the
    end of the response, or an anchor before it whose head-k token is not trained on): no round's chain passes
    through such a head, so it contributes nothing to the later heads' weights. The derivative is the
    prefix prod_{j<k} alpha_j times the suffix S_k = 1 + alpha_{k+1} S_{k+1} (S_K = 1): O(K), no division.
    """
    a = alpha.detach().double()
    prefix = torch.ones_like(a)
    prefix[1:] = torch.cumprod(a[:-1], 0)
    suffix = torch.ones_like(a)
    for k in range(a.shape[0] - 2, -1, -1):
        suffix[k] = 1.0 + a[k + 1] * suffix[k + 1]
    return (prefix * suffix).to(alpha.dtype)


def expected_tau(alpha: torch.Tensor) -> torch.Tensor:
    """E[tau_t] = 1 + sum_k prod_{j<=k} alpha_{t,j} per anchor, differentiable; `alpha` is [K, ...]."""
    return 1.0 + torch.cumprod(alpha, 0).sum(0)


@dataclass
class HeadTerm:
    """One head's contribution: the gamma-weighted differentiable loss, its stats, and per-token KL / alpha."""

    loss: torch.Tensor
    stats: HeadStats
    kl: torch.Tensor  # [n] detached
    alpha: torch.Tensor  # [n] detached
    chain: torch.Tensor | None = None  # [n] c_t of a chain loss (`Means.chain_tv`), for the metrics


def draft_head_term(name: str, k: int, draft_logits: torch.Tensor, target_logits: torch.Tensor,
                    mask: torch.Tensor | None = None, *, eta: float = 3.0, gamma: float = GAMMA,
                    temperature: float = 1.0, impl: str = "chunked", count: float | None = None,
                    alpha_mean: AlphaMean | None = None, target_lse: torch.Tensor | None = None,
                    chain: torch.Tensor | None = None) -> HeadTerm:
    """gamma^(k-1) * loss_k of head k (1-based) and its statistics; `draft_loss` is the sum over heads.

    `count` is the denominator of the head's means (default: its selected rows); `alpha_mean` (default:
    these rows' mean) supplies the batch-mean alpha for losses whose lambda needs one. `target_lse` [n] is
    the full-vocabulary normaliser when the logits cover a truncated draft vocabulary (lkspec.losses.kernels).
    `chain` [n] is dE[tau]/d alpha of this head at each row (`chain_weights`), for losses that read it.
    """
    loss = get_loss(name)
    if loss.chain and chain is None:
        raise LkspecError(f"loss {name!r} weights head {k} by the other heads' acceptance at the same anchors; "
                          f"pass chain= (lkspec.losses.chain_weights)")
    if mask is not None:
        draft_logits, target_logits = draft_logits[mask.bool()], target_logits[mask.bool()]
        target_lse = None if target_lse is None else target_lse[mask.bool()]
        chain = None if chain is None else chain[mask.bool()]
    if draft_logits.shape[0] == 0:
        if alpha_mean is not None:
            alpha_mean(draft_logits.new_zeros((), dtype=torch.float32))
        empty = draft_logits.new_zeros(0, dtype=torch.float32)
        # keep the head in the graph (DDP needs every parameter used)
        return HeadTerm(0.0 * draft_logits.sum(), HeadStats(0.0, 0.0, 0.0, 0.0, float("nan")), empty, empty)
    kl, alpha = token_stats(draft_logits, target_logits, temperature, impl, target_lse)
    a_mean = alpha_mean(alpha.detach().sum()) if alpha_mean is not None else None
    chain_t = None if chain is None else chain.detach() / head_weight(k, gamma)
    lam_k, loss_k = loss.value(TensorMeans(kl, alpha, count, a_mean, chain_t), eta)
    stats = HeadStats(count=float(alpha.numel()), alpha_sum=float(alpha.detach().sum()),
                      kl_sum=float(kl.detach().sum()), loss=float(loss_k.detach()),  # type: ignore[union-attr]
                      lam=float(lam_k) if lam_k is not None else float("nan"))
    return HeadTerm(head_weight(k, gamma) * loss_k, stats, kl.detach(), alpha.detach(), chain_t)  # type: ignore[arg-type]


def draft_loss(name: str, head_logits: Sequence[torch.Tensor], head_targets: Sequence[torch.Tensor],
               head_masks: Sequence[torch.Tensor], *, eta: float = 3.0, gamma: float = GAMMA,
               temperature: float = 1.0, impl: str = "chunked", counts: Sequence[float] | None = None,
               alpha_means: Sequence[AlphaMean | None] | None = None) -> tuple[torch.Tensor, list[HeadStats]]:
    """Total loss sum_k gamma^(k-1) * loss_k over heads, and per-head statistics.

    Each head's logits, targets and mask share leading dims [B, n_k] (n_k = T - k: entry t is anchor t);
    only masked rows count. A chain loss (lk_tau) first measures every head's alpha without gradients.
    """
    chain = chain_alphas(head_logits, head_targets, head_masks, temperature, impl) if get_loss(name).chain else None
    total = head_logits[0].new_zeros((), dtype=torch.float32)
    stats: list[HeadStats] = []
    for k, (z, zp, m) in enumerate(zip(head_logits, head_targets, head_masks, strict=True), 1):
        term = draft_head_term(name, k, z, zp, m, eta=eta, gamma=gamma, temperature=temperature, impl=impl,
                               count=None if counts is None else counts[k - 1],
                               alpha_mean=None if alpha_means is None else alpha_means[k - 1],
                               chain=None if chain is None else chain[k - 1, :, : z.shape[1]])
        total = total + term.loss
        stats.append(term.stats)
    return total, stats


@torch.no_grad()
def chain_alphas(head_logits: Sequence[torch.Tensor], head_targets: Sequence[torch.Tensor],
                 head_masks: Sequence[torch.Tensor], temperature: float = 1.0, impl: str = "chunked") -> torch.Tensor:
    """`chain_weights` of [B, n_k] heads aligned by anchor: [K, B, n_1], alpha taken as 0 outside a head's mask."""
    return chain_of(lambda k, m: token_stats(head_logits[k][m], head_targets[k][m], temperature, impl)[1],
                    head_masks)


def chain_of(alpha_of: Callable[[int, torch.Tensor], torch.Tensor], masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """`chain_weights` from each head's alpha at its selected anchors: `alpha_of(k, mask)` (0-based k) for the
    rows of `masks[k]` ([..., n_k], anchors aligned); [K, ..., n_1], alpha taken as 0 outside a head's mask."""
    alpha = torch.zeros(len(masks), *masks[0].shape, dtype=torch.float32, device=masks[0].device)
    for k, m in enumerate(masks):
        m = m.bool()
        if m.any():
            alpha[k, ..., : m.shape[-1]][m] = alpha_of(k, m).float()
    return chain_weights(alpha)


def lk_tau_reference(head_logits: Sequence[torch.Tensor], head_targets: Sequence[torch.Tensor],
                     head_masks: Sequence[torch.Tensor], *, eta: float = 3.0, gamma: float = GAMMA,
                     temperature: float = 1.0) -> torch.Tensor:
    """`lk_tau` by its definition, all heads at once (full-vocabulary tensors; tests hold the twins to it).

    Head k's tau part at anchor t is the expected length a round loses to its rejections, E[tau_t | alpha_k = 1]
    - E[tau_t], with the other heads' alphas held fixed; autograd differentiates E[tau] itself (no
    `chain_weights`). lambda_k and the KL part are lk_hybrid's.
    """
    K, (B, n) = len(head_logits), head_masks[0].shape
    kls, alphas, padded = [], [], []
    for z, zp, m in zip(head_logits, head_targets, head_masks, strict=True):
        kl, a = token_stats_reference(z[m.bool()], zp[m.bool()], temperature)
        row = torch.zeros(B, m.shape[1], dtype=a.dtype).masked_scatter(m.bool(), a)
        padded.append(torch.nn.functional.pad(row, (0, n - m.shape[1])))
        kls.append(kl)
        alphas.append(a)
    alpha = torch.stack(padded)  # [K, B, n]: head k at anchor t, 0 where it has no target
    total = alpha.new_zeros(())
    for k in range(K):
        m = head_masks[k].bool()
        if not m.any():
            continue
        fixed = alpha.detach().clone()
        live = torch.cat([fixed[:k], alpha[k : k + 1], fixed[k + 1 :]])
        fixed[k] = 1.0
        lost = (expected_tau(fixed) - expected_tau(live))[:, : m.shape[1]][m]
        w = lam(alphas[k].mean(), eta)
        total = total + head_weight(k + 1, gamma) * w * kls[k].mean() + (1.0 - w) * lost.mean()
    return total
