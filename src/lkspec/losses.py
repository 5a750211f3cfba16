"""Training objectives for drafts: KL, TV, and the LK losses (arXiv 2602.23881).

Speculative decoding accepts a drafted token with probability min(1, p/q), so the expected acceptance
of one position is alpha = sum_v min(p_v, q_v) = 1 - TV(p, q). KL(p||q) is only a proxy for it. The
LK losses train on alpha itself:

* `lk_alpha`  L = -mean_t log alpha_t   (hyperparameter-free; its gradient is TV's, scaled by 1/alpha)
* `lk_hybrid` L = lambda * KL + (1 - lambda) * (1 - mean alpha), lambda = exp(-eta * sg[mean alpha]),
  one lambda per head per step from the batch (paper eq. 5; the authors' code). Early in training
  alpha ~ 0, lambda ~ 1 and KL's strong gradients do the work; as alpha grows the loss moves to TV.
* `lk_hybrid_token` the per-token-lambda variant (vllm-project/speculators), under its own name.

Every loss is a function of two per-token quantities, KL_t and alpha_t, so the module has one place
that computes them (`token_stats`) in two implementations, and one place that combines them
(`combine`):

* `reference`: a few readable lines of full-vocabulary tensor math; autograd keeps several [N, V]
  intermediates for backward.
* `chunked`: a custom autograd function that walks the vocabulary in chunks, keeps only the inputs and
  three [N] vectors for backward, and recomputes the probabilities chunk by chunk there.

Both give the same values and gradients (tests/test_losses.py). The target logits are a teacher:
they never receive a gradient. p and q are taken at the training temperature, in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from lkspec.errors import LkspecError

LOSSES = ("kl", "tv", "lk_alpha", "lk_hybrid", "lk_hybrid_token")
IMPLEMENTATIONS = ("chunked", "reference")
GAMMA = 0.8
LOG_EPS = 1e-12  # guard for log(alpha) when alpha underflows to 0


def check_loss_name(name: str) -> None:
    if name not in LOSSES:
        raise LkspecError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")


# ----------------------------------------------------------------------------------------------
# per-token statistics: the reference
# ----------------------------------------------------------------------------------------------
def token_stats_reference(
    draft_logits: torch.Tensor, target_logits: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(p||q) and alpha = sum min(p, q) per row, by the definitions."""
    log_q = torch.log_softmax(draft_logits.float() / temperature, dim=-1)
    log_p = torch.log_softmax(target_logits.detach().float() / temperature, dim=-1)
    p, q = log_p.exp(), log_q.exp()
    kl = (p * (log_p - log_q)).sum(-1)
    alpha = torch.minimum(p, q).sum(-1)
    return kl, alpha


# ----------------------------------------------------------------------------------------------
# per-token statistics: the vocab-chunked twin
# ----------------------------------------------------------------------------------------------
def _chunk_size(n_rows: int, vocab: int, budget: int = 1 << 22) -> int:
    """Columns per chunk so one [N, chunk] fp32 temporary stays near `budget` elements (16 MB).

    Small chunks are also *faster* than full-vocabulary ops on CPU (no page-faulting GB temporaries);
    benchmarks/loss_cost.py measures both implementations side by side.
    """
    return max(256, min(vocab, budget // max(n_rows, 1)))


def _scaled_log_probs(x: torch.Tensor, inv_t: float, lse: torch.Tensor) -> torch.Tensor:
    """log softmax(x / T) for a chunk of columns, given the rows' full logsumexp (fp32 result)."""
    return (x.float() * inv_t if inv_t != 1.0 else x.float()) - lse[:, None]


def _logsumexp_chunked(x: torch.Tensor, inv_t: float, chunk: int) -> torch.Tensor:
    parts = [
        torch.logsumexp(x[:, i : i + chunk].float() * inv_t if inv_t != 1.0 else x[:, i : i + chunk].float(), -1)
        for i in range(0, x.shape[1], chunk)
    ]
    return torch.logsumexp(torch.stack(parts, -1), dim=-1)


class _ChunkedKLAlpha(torch.autograd.Function):
    """(KL_t, alpha_t) for rows of logits, saving no [N, V] intermediate for backward.

    With q = softmax(z/T), p = softmax(zp/T), s_v = 1[q_v < p_v] and S = sum_v s_v q_v:
        dKL_t/dz    = (q - p) / T
        dalpha_t/dz = q * (s - S) / T
    Forward saves the two logsumexps and S (three [N] vectors); backward recomputes p and q per
    chunk. (At exact ties q_v = p_v > 0, torch.minimum splits the gradient in half; this takes the
    subgradient 0. Ties have measure zero and the tests check agreement on random logits.)
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, zp: torch.Tensor, temperature: float, chunk: int):  # type: ignore[override]
        inv_t = 1.0 / temperature
        lse_q = _logsumexp_chunked(z, inv_t, chunk)
        lse_p = _logsumexp_chunked(zp, inv_t, chunk)
        n = z.shape[0]
        kl = torch.zeros(n, device=z.device, dtype=torch.float32)
        alpha = torch.zeros_like(kl)
        s_mass = torch.zeros_like(kl)
        for i in range(0, z.shape[1], chunk):
            log_q = _scaled_log_probs(z[:, i : i + chunk], inv_t, lse_q)
            log_p = _scaled_log_probs(zp[:, i : i + chunk], inv_t, lse_p)
            q, p = log_q.exp(), log_p.exp()
            kl += torch.nn.functional.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
            below = q < p
            alpha += torch.where(below, q, p).sum(-1)
            s_mass += torch.where(below, q, 0.0).sum(-1)
        ctx.save_for_backward(z, zp, lse_q, lse_p, s_mass)
        ctx.inv_t, ctx.chunk = inv_t, chunk
        return kl, alpha

    @staticmethod
    def backward(ctx, g_kl: torch.Tensor | None, g_alpha: torch.Tensor | None):  # type: ignore[override]
        z, zp, lse_q, lse_p, s_mass = ctx.saved_tensors
        inv_t, chunk = ctx.inv_t, ctx.chunk
        zeros = torch.zeros_like(lse_q)
        gk = (zeros if g_kl is None else g_kl.float()) * inv_t
        ga = (zeros if g_alpha is None else g_alpha.float()) * inv_t
        # grad = q * (gk + ga * (s - S)) - gk * p, where the bracket takes one of two values per row
        coef_below = (gk + ga * (1.0 - s_mass))[:, None]
        coef_above = (gk - ga * s_mass)[:, None]
        neg_gk = -gk[:, None]
        grad = torch.empty_like(z)
        for i in range(0, z.shape[1], chunk):
            q = _scaled_log_probs(z[:, i : i + chunk], inv_t, lse_q).exp_()
            p = _scaled_log_probs(zp[:, i : i + chunk], inv_t, lse_p).exp_()
            g = torch.where(q < p, coef_below, coef_above).mul_(q)
            grad[:, i : i + chunk] = torch.addcmul(g, p, neg_gk)
        return grad, None, None, None


def token_stats_chunked(
    draft_logits: torch.Tensor, target_logits: torch.Tensor, temperature: float = 1.0, chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same values and draft gradients as `token_stats_reference`, in O(N) saved memory."""
    n, v = draft_logits.shape
    chunk = chunk or _chunk_size(n, v)
    kl, alpha = _ChunkedKLAlpha.apply(draft_logits, target_logits.detach(), temperature, chunk)
    return kl, alpha


def token_stats(
    draft_logits: torch.Tensor, target_logits: torch.Tensor, temperature: float = 1.0, impl: str = "chunked"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (KL_t, alpha_t) of [N, V] draft and target logits at `temperature`."""
    if temperature <= 0 or not math.isfinite(temperature):
        raise LkspecError(f"training temperature must be > 0, got {temperature}")
    if draft_logits.shape != target_logits.shape or draft_logits.dim() != 2:
        raise LkspecError(
            f"draft logits {tuple(draft_logits.shape)} and target logits {tuple(target_logits.shape)} must both be "
            f"[N, V]; the draft's vocab must equal the target's"
        )
    if impl == "chunked":
        return token_stats_chunked(draft_logits, target_logits, temperature)
    if impl == "reference":
        return token_stats_reference(draft_logits, target_logits, temperature)
    raise LkspecError(f"unknown loss implementation {impl!r}; choose one of {', '.join(IMPLEMENTATIONS)}")


# ----------------------------------------------------------------------------------------------
# combining the statistics into a loss
# ----------------------------------------------------------------------------------------------
def lam(alpha_mean: torch.Tensor | float, eta: float) -> torch.Tensor:
    """lambda = exp(-eta * sg[alpha]): ~1 (KL) while the draft is poor, -> exp(-eta) (TV) once it is good."""
    a = torch.as_tensor(alpha_mean, dtype=torch.float32)
    return torch.exp(-eta * a.detach())


def combine(
    name: str,
    kl: torch.Tensor,
    alpha: torch.Tensor,
    *,
    eta: float = 3.0,
    count: float | torch.Tensor | None = None,
    alpha_mean: torch.Tensor | None = None,
) -> torch.Tensor:
    """One head's loss from its per-token KL_t and alpha_t.

    `count` (default: the number of rows) is the denominator of every mean, and `alpha_mean` (default:
    these rows' mean) is what lambda is computed from. Data-parallel training passes the global token
    count and the globally reduced mean so every rank optimises the single-process objective.
    """
    check_loss_name(name)
    n = kl.new_tensor(float(kl.numel()) if count is None else float(count))
    n = n.clamp_min(1.0)
    if name == "kl":
        return kl.sum() / n
    if name == "tv":
        return 1.0 - alpha.sum() / n
    if name == "lk_alpha":
        return -torch.log(alpha.clamp_min(LOG_EPS)).sum() / n
    if name == "lk_hybrid":
        a_bar = alpha.sum() / n if alpha_mean is None else alpha_mean
        w = lam(a_bar, eta).to(kl.device)
        return w * (kl.sum() / n) + (1.0 - w) * (1.0 - alpha.sum() / n)
    w_t = lam(alpha, eta).to(kl.device)  # lk_hybrid_token
    return (w_t * kl + (1.0 - w_t) * (1.0 - alpha)).sum() / n


def _check_finite(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if not torch.isfinite(t).all():
            raise LkspecError(
                "logits contain NaN or inf; check the features (dtype overflow?) and lower the learning rate"
            )


def head_loss(
    name: str,
    draft_logits: torch.Tensor,
    target_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    eta: float = 3.0,
    temperature: float = 1.0,
    impl: str = "chunked",
) -> torch.Tensor:
    """Scalar loss of one draft head. Logits are [N, V]; `mask` (bool [N]) selects the rows that count."""
    check_loss_name(name)
    _check_finite(draft_logits, target_logits)
    if mask is not None:
        if mask.shape != draft_logits.shape[:1]:
            raise LkspecError(f"mask {tuple(mask.shape)} must be [N] = [{draft_logits.shape[0]}]")
        draft_logits, target_logits = draft_logits[mask.bool()], target_logits[mask.bool()]
    kl, alpha = token_stats(draft_logits, target_logits, temperature, impl)
    return combine(name, kl, alpha, eta=eta)


# ----------------------------------------------------------------------------------------------
# all heads of a draft
# ----------------------------------------------------------------------------------------------
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


def _reported_lambda(name: str, alpha: torch.Tensor, alpha_mean: torch.Tensor, eta: float) -> float:
    if name == "lk_hybrid":
        return float(lam(alpha_mean, eta))
    if name == "lk_hybrid_token":
        return float(lam(alpha, eta).mean())
    return float("nan")


def head_weights(num_heads: int, gamma: float = GAMMA) -> list[float]:
    """gamma^(k-1) for heads k = 1..K: later heads matter less (they are reached less often)."""
    return [gamma**k for k in range(num_heads)]


def simulated_tau(alphas: Sequence[float]) -> float:
    """Expected acceptance length of a chain draft, bonus included: 1 + sum_k prod_{j<=k} alpha_j."""
    tau, run = 1.0, 1.0
    for a in alphas:
        if not math.isfinite(a):
            break
        run *= a
        tau += run
    return tau


AlphaMean = torch.Tensor | Callable[[torch.Tensor], torch.Tensor] | None


@dataclass
class HeadTerm:
    """One head's contribution: the gamma-weighted differentiable loss, its stats, and per-token KL / alpha."""

    loss: torch.Tensor
    stats: HeadStats
    kl: torch.Tensor  # [n] detached
    alpha: torch.Tensor  # [n] detached


def draft_head_term(
    name: str,
    k: int,
    draft_logits: torch.Tensor,
    target_logits: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    eta: float = 3.0,
    gamma: float = GAMMA,
    temperature: float = 1.0,
    impl: str = "chunked",
    count: float | None = None,
    alpha_mean: AlphaMean = None,
) -> HeadTerm:
    """gamma^(k-1) * loss_k of head k (1-based) and its statistics; `draft_loss` is the sum over heads.

    Exists on its own so a trainer can compute (and backpropagate) one head at a time, keeping one
    [tokens, V] logits tensor alive instead of K. `alpha_mean` may be a callable that receives this
    head's local alpha sum and returns the mean lambda is computed from: a data-parallel trainer passes
    one that all-reduces the sum and divides by the global count. It is called even when no row is
    selected, so every rank issues the same collectives.
    """
    check_loss_name(name)
    weight = gamma ** (k - 1)
    z_sel, zp_sel = (draft_logits, target_logits) if mask is None else (draft_logits[mask.bool()],
                                                                         target_logits[mask.bool()])
    if z_sel.shape[0] == 0:
        if callable(alpha_mean):
            alpha_mean(draft_logits.new_zeros((), dtype=torch.float32))
        empty = draft_logits.new_zeros(0, dtype=torch.float32)
        # keep the head in the graph (DDP needs every parameter used)
        return HeadTerm(0.0 * draft_logits.sum(), HeadStats(0.0, 0.0, 0.0, 0.0, float("nan")), empty, empty)
    kl, alpha = token_stats(z_sel, zp_sel, temperature, impl)
    n = float(count if count is not None else alpha.numel())
    a_mean = alpha_mean(alpha.detach().sum()) if callable(alpha_mean) else alpha_mean
    loss_k = combine(name, kl, alpha, eta=eta, count=count, alpha_mean=a_mean)
    a_for_lam = (alpha.sum() / n) if a_mean is None else a_mean
    stats = HeadStats(
        count=float(alpha.numel()),
        alpha_sum=float(alpha.detach().sum()),
        kl_sum=float(kl.detach().sum()),
        loss=float(loss_k.detach()),
        lam=_reported_lambda(name, alpha, a_for_lam, eta),
    )
    return HeadTerm(weight * loss_k, stats, kl.detach(), alpha.detach())


def draft_loss(
    name: str,
    head_logits: Sequence[torch.Tensor],
    head_targets: Sequence[torch.Tensor],
    head_masks: Sequence[torch.Tensor],
    *,
    eta: float = 3.0,
    gamma: float = GAMMA,
    temperature: float = 1.0,
    impl: str = "chunked",
    counts: Sequence[float] | None = None,
    alpha_means: Sequence[AlphaMean] | None = None,
) -> tuple[torch.Tensor, list[HeadStats]]:
    """Total loss sum_k gamma^(k-1) * loss_k over heads, and per-head statistics.

    Each head's logits, targets and mask share leading dims (e.g. [B, T-k]); only masked rows count.
    `counts` / `alpha_means` override the per-head denominators and lambda inputs (see `combine` and
    `draft_head_term`).
    """
    check_loss_name(name)
    total = head_logits[0].new_zeros((), dtype=torch.float32)
    stats: list[HeadStats] = []
    for k, (z, zp, m) in enumerate(zip(head_logits, head_targets, head_masks, strict=True)):
        term = draft_head_term(
            name, k + 1, z, zp, m, eta=eta, gamma=gamma, temperature=temperature, impl=impl,
            count=None if counts is None else counts[k],
            alpha_mean=None if alpha_means is None else alpha_means[k],
        )
        total = total + term.loss
        stats.append(term.stats)
    return total, stats
