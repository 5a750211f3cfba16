"""Per-token KL(p||q) and alpha = sum_v min(p_v, q_v): the two numbers every loss in the table is made of.

Three implementations with the same values and draft gradients (tests/test_losses.py):

* `reference`: a few readable lines of full-vocabulary tensor math; autograd keeps several [N, V]
  intermediates for backward.
* `chunked`: a custom autograd function that walks the vocabulary in chunks, keeps only the inputs and
  three [N] vectors for backward, and recomputes the probabilities chunk by chunk there.
* `fused`: the same autograd function over whole rows, its arithmetic compiled by `torch.compile`, which
  fuses the dozen elementwise passes the eager twin makes over every [N, chunk] block (subtract, exp, compare,
  select, multiply, sum) into loops that keep them in registers: on the 2-core CPU fwd + bwd is 1.7-2.0x
  `chunked`'s speed over full rows and 2.7-2.9x with a truncated vocabulary's normaliser, where the loss had
  been half of a training step (benchmarks/loss_cost.py); its peak is the returned gradient plus one more
  [N, V] buffer. Compiling costs seconds once per process; where it fails (inductor's CPU backend needs a C++
  compiler) a warning says so and `chunked` runs instead.

The target logits are a teacher: they never receive a gradient. p and q are taken at the training
temperature, in fp32.

Truncated draft vocabulary (paper §4.4). A draft whose heads cover only a token subset S gets the target's
logits restricted to S plus `target_lse`, the logsumexp of the target's *full* logits at the same
temperature. Then alpha = sum_{v in S} min(p_v, q_v) with the original p (tokens outside S contribute
min(p, 0) = 0), so alpha stays the exact acceptance rate; KL is taken against the renormalised
p~ = p restricted to S / p(S) ("a proxy of a proxy"). Without `target_lse`, p over the given columns is
the whole distribution and both coincide.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any

import torch

from lkspec.errors import LkspecError

IMPLEMENTATIONS = ("chunked", "reference", "fused")

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------
# per-token statistics: the reference
# ----------------------------------------------------------------------------------------------
def token_stats_reference(
    draft_logits: torch.Tensor, target_logits: torch.Tensor, temperature: float = 1.0,
    target_lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """KL(p~||q) and alpha = sum min(p, q) per row, by the definitions (p~ = p unless `target_lse` is given)."""
    log_q = torch.log_softmax(draft_logits.float() / temperature, dim=-1)
    zp = target_logits.detach().float() / temperature
    log_pt = torch.log_softmax(zp, dim=-1)
    p_t, q = log_pt.exp(), log_q.exp()
    kl = (p_t * (log_pt - log_q)).sum(-1)
    p = p_t if target_lse is None else (zp - target_lse.detach().float()[:, None]).exp()
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

    With q = softmax(z/T), p~ = softmax(zp/T) (KL's teacher), p = exp(zp/T - lse_a) (alpha's: p~ itself
    unless a full-vocabulary logsumexp lse_a is given), s_v = 1[q_v < p_v] and S = sum_v s_v q_v:
        dKL_t/dz    = (q - p~) / T
        dalpha_t/dz = q * (s - S) / T
    Forward saves three logsumexps and S ([N] vectors); backward recomputes p, p~ and q per chunk. (At
    exact ties q_v = p_v > 0, torch.minimum splits the gradient in half; this takes the subgradient 0.
    Ties have measure zero and the tests check agreement on random logits.)
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, zp: torch.Tensor, temperature: float, chunk: int,  # type: ignore[override]
                target_lse: torch.Tensor | None):
        inv_t = 1.0 / temperature
        lse_q = _logsumexp_chunked(z, inv_t, chunk)
        lse_p = _logsumexp_chunked(zp, inv_t, chunk)
        lse_a = lse_p if target_lse is None else target_lse.detach().float()
        ratio = None if target_lse is None else torch.exp(lse_p - lse_a)[:, None]  # p(S) per row, <= 1
        n = z.shape[0]
        kl = torch.zeros(n, device=z.device, dtype=torch.float32)
        alpha = torch.zeros_like(kl)
        s_mass = torch.zeros_like(kl)
        for i in range(0, z.shape[1], chunk):
            log_q = _scaled_log_probs(z[:, i : i + chunk], inv_t, lse_q)
            log_p = _scaled_log_probs(zp[:, i : i + chunk], inv_t, lse_p)
            q = log_q.exp()
            p = log_p.exp()
            p_kl = p
            if ratio is not None:  # exp(zp/T - lse_a) = p~ * exp(lse_p - lse_a): one scale per row, no second exp
                p = p_kl * ratio
            kl += torch.nn.functional.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)
            del p_kl
            below = q < p
            alpha += torch.where(below, q, p).sum(-1)
            s_mass += torch.where(below, q, 0.0).sum(-1)
        ctx.save_for_backward(z, zp, lse_q, lse_p, lse_a, s_mass)
        ctx.inv_t, ctx.chunk, ctx.truncated = inv_t, chunk, target_lse is not None
        return kl, alpha

    @staticmethod
    def backward(ctx, g_kl: torch.Tensor | None, g_alpha: torch.Tensor | None):  # type: ignore[override]
        z, zp, lse_q, lse_p, lse_a, s_mass = ctx.saved_tensors
        inv_t, chunk = ctx.inv_t, ctx.chunk
        ratio = torch.exp(lse_p - lse_a)[:, None] if ctx.truncated else None
        zeros = torch.zeros_like(lse_q)
        gk = (zeros if g_kl is None else g_kl.float()) * inv_t
        ga = (zeros if g_alpha is None else g_alpha.float()) * inv_t
        # grad = q * (gk + ga * (s - S)) - gk * p~, where the bracket takes one of two values per row
        coef_below = (gk + ga * (1.0 - s_mass))[:, None]
        coef_above = (gk - ga * s_mass)[:, None]
        neg_gk = -gk[:, None]
        grad = torch.empty_like(z)
        for i in range(0, z.shape[1], chunk):
            q = _scaled_log_probs(z[:, i : i + chunk], inv_t, lse_q).exp_()
            p_kl = _scaled_log_probs(zp[:, i : i + chunk], inv_t, lse_p).exp_()
            p = p_kl * ratio if ratio is not None else p_kl
            g = torch.where(q < p, coef_below, coef_above).mul_(q)
            grad[:, i : i + chunk] = torch.addcmul(g, p_kl, neg_gk)
        return grad, None, None, None, None


def token_stats_chunked(
    draft_logits: torch.Tensor, target_logits: torch.Tensor, temperature: float = 1.0, chunk: int | None = None,
    target_lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same values and draft gradients as `token_stats_reference`, in O(N) saved memory."""
    n, v = draft_logits.shape
    chunk = chunk or _chunk_size(n, v)
    kl, alpha = _ChunkedKLAlpha.apply(draft_logits, target_logits.detach(), temperature, chunk, target_lse)
    return kl, alpha


# ----------------------------------------------------------------------------------------------
# per-token statistics: the fused twin (the chunked one's arithmetic over whole rows, compiled)
# ----------------------------------------------------------------------------------------------
def _rows_stats(z: torch.Tensor, zp: torch.Tensor, lse_a: torch.Tensor, inv_t: float) -> tuple[torch.Tensor, ...]:
    """KL_t, alpha_t, S_t = sum_{q < p} q and the two logsumexps of whole rows (see `_ChunkedKLAlpha`)."""
    zq, zt = z.float() * inv_t, zp.float() * inv_t
    lse_q, lse_p = torch.logsumexp(zq, -1), torch.logsumexp(zt, -1)
    log_q, log_p = zq - lse_q[:, None], zt - lse_p[:, None]
    q, p_kl, p = log_q.exp(), log_p.exp(), (zt - lse_a[:, None]).exp()
    below = q < p
    kl = (p_kl * (log_p - log_q)).sum(-1)
    return kl, torch.where(below, q, p).sum(-1), torch.where(below, q, 0.0).sum(-1), lse_q, lse_p


def _rows_grad(z: torch.Tensor, zp: torch.Tensor, lse_q: torch.Tensor, lse_p: torch.Tensor, lse_a: torch.Tensor,
               s_mass: torch.Tensor, gk: torch.Tensor, ga: torch.Tensor, inv_t: float) -> torch.Tensor:
    """dL/dz = q * (gk + ga * (s - S)) - gk * p~ (gk, ga already divided by T)."""
    zq, zt = z.float() * inv_t, zp.float() * inv_t
    q, p_kl, p = (zq - lse_q[:, None]).exp(), (zt - lse_p[:, None]).exp(), (zt - lse_a[:, None]).exp()
    coef = torch.where(q < p, (gk + ga * (1.0 - s_mass))[:, None], (gk - ga * s_mass)[:, None])
    return q * coef - p_kl * gk[:, None]


class _Compiled:
    """`_rows_stats` and `_rows_grad` compiled once per device type (shapes symbolic), or None where that fails."""

    def __init__(self) -> None:
        self.fns: dict[str, tuple[Any, Any] | None] = {}

    def get(self, device: torch.device) -> tuple[Any, Any] | None:
        if device.type not in self.fns:
            try:
                self.fns[device.type] = self._compile(device)
            except Exception as e:  # inductor raises many kinds (no compiler, no backend for the device)
                log.warning("loss.impl fused: torch.compile failed on %s (%s: %s); using the chunked twin instead",
                            device.type, type(e).__name__, str(e).splitlines()[0] if str(e) else "")
                self.fns[device.type] = None
        return self.fns[device.type]

    @staticmethod
    def _compile(device: torch.device) -> tuple[Any, Any]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # inductor's own use of torch.jit
            fns = torch.compile(_rows_stats, dynamic=True), torch.compile(_rows_grad, dynamic=True)
            # compile both now, on a small block: a failure must not wait for the first backward
            z = torch.randn(3, 17, device=device)
            lse = torch.logsumexp(z, -1)
            kl, _, s_mass, lse_q, lse_p = fns[0](z, z + 1, lse, 1.0)
            fns[1](z, z + 1, lse_q, lse_p, lse, s_mass, kl, kl, 1.0)
        return fns


COMPILED = _Compiled()


class _FusedKLAlpha(torch.autograd.Function):
    """`_ChunkedKLAlpha` over whole rows with compiled arithmetic: same saved tensors, same formulas."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, zp: torch.Tensor, temperature: float,  # type: ignore[override]
                lse_a: torch.Tensor | None, fns: tuple[Any, Any]):
        inv_t = 1.0 / temperature
        if lse_a is None:  # p is p~ itself: its own normaliser
            lse_a = torch.logsumexp(zp.float() * inv_t, -1)
        kl, alpha, s_mass, lse_q, lse_p = fns[0](z, zp, lse_a.detach().float(), inv_t)
        ctx.save_for_backward(z, zp, lse_q, lse_p, lse_a, s_mass)
        ctx.inv_t, ctx.grad_fn = inv_t, fns[1]
        return kl, alpha

    @staticmethod
    def backward(ctx, g_kl: torch.Tensor | None, g_alpha: torch.Tensor | None):  # type: ignore[override]
        z, zp, lse_q, lse_p, lse_a, s_mass = ctx.saved_tensors
        zeros = torch.zeros_like(lse_q)
        gk = (zeros if g_kl is None else g_kl.float()) * ctx.inv_t
        ga = (zeros if g_alpha is None else g_alpha.float()) * ctx.inv_t
        grad = ctx.grad_fn(z, zp, lse_q, lse_p, lse_a, s_mass, gk, ga, ctx.inv_t)
        return grad.to(z.dtype), None, None, None, None


def token_stats_fused(
    draft_logits: torch.Tensor, target_logits: torch.Tensor, temperature: float = 1.0,
    target_lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same values and draft gradients as `token_stats_chunked`, compiled (`chunked` where compiling fails)."""
    fns = COMPILED.get(draft_logits.device)
    if fns is None or draft_logits.shape[0] == 0:
        return token_stats_chunked(draft_logits, target_logits, temperature, target_lse=target_lse)
    kl, alpha = _FusedKLAlpha.apply(draft_logits, target_logits.detach(), temperature, target_lse, fns)
    return kl, alpha


def token_stats(
    draft_logits: torch.Tensor, target_logits: torch.Tensor, temperature: float = 1.0, impl: str = "chunked",
    target_lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (KL_t, alpha_t) of [N, V] draft and target logits at `temperature` (see the module docstring
    for `target_lse`, the full-vocabulary normaliser of a truncated draft vocabulary)."""
    if temperature <= 0 or not math.isfinite(temperature):
        raise LkspecError(f"training temperature must be > 0, got {temperature}")
    if draft_logits.shape != target_logits.shape or draft_logits.dim() != 2:
        raise LkspecError(
            f"draft logits {tuple(draft_logits.shape)} and target logits {tuple(target_logits.shape)} must both be "
            f"[N, V]; the draft's vocab must equal the target's"
        )
    if target_lse is not None and target_lse.shape != draft_logits.shape[:1]:
        raise LkspecError(f"target_lse {tuple(target_lse.shape)} must be [N] = [{draft_logits.shape[0]}]")
    if impl == "chunked":
        return token_stats_chunked(draft_logits, target_logits, temperature, target_lse=target_lse)
    if impl == "fused":
        return token_stats_fused(draft_logits, target_logits, temperature, target_lse)
    if impl == "reference":
        return token_stats_reference(draft_logits, target_logits, temperature, target_lse)
    raise LkspecError(f"unknown loss implementation {impl!r}; choose one of {', '.join(IMPLEMENTATIONS)}")


def check_finite(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if not torch.isfinite(t).all():
            raise LkspecError(
                "logits contain NaN or inf; check the features (dtype overflow?) and lower the learning rate"
            )
