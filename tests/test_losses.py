"""Losses: the paper's identities, the chunked twin against the reference, multi-head aggregation."""

from __future__ import annotations

import math

import pytest
import torch

from lkspec.alignment import head_mask, head_masks, head_targets
from lkspec.errors import LkspecError
from lkspec.losses import (
    LOSSES,
    combine,
    draft_loss,
    head_loss,
    head_weights,
    lam,
    simulated_tau,
    token_stats_chunked,
    token_stats_reference,
)

N, V = 48, 300


def _chain(name: str, n: int = N) -> torch.Tensor | None:
    """c_t for a chain loss (any positive weights will do for agreement tests), None for the others."""
    if not LOSSES[name].chain:
        return None
    return 0.5 + torch.rand(n, generator=torch.Generator().manual_seed(7)) * 2


def _logits(seed: int = 0, n: int = N, v: int = V, scale: float = 2.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g, dtype=torch.float64).float(), (torch.randn(n, v, generator=g) * scale)


def test_alpha_is_one_minus_tv() -> None:
    z, zp = _logits()
    _, alpha = token_stats_reference(z, zp)
    p, q = zp.softmax(-1), z.softmax(-1)
    tv = 0.5 * (p - q).abs().sum(-1)
    torch.testing.assert_close(alpha, 1 - tv, rtol=0, atol=1e-6)
    assert head_loss("tv", z, zp).item() == pytest.approx(tv.mean().item(), abs=1e-6)


def test_alpha_is_q_of_argmax_for_point_mass() -> None:
    """Paper App. B: if p is a point mass at x*, alpha = q(x*)."""
    z, _ = _logits()
    zp = torch.full((N, V), -1e4)
    zp[:, 7] = 0
    _, alpha = token_stats_chunked(z, zp)
    torch.testing.assert_close(alpha, z.softmax(-1)[:, 7], rtol=1e-5, atol=1e-7)


def test_grad_of_neg_log_alpha_is_tv_grad_over_alpha() -> None:
    """Paper §4.1: grad(-log alpha) = grad(TV) / alpha — the same direction, rescaled by 1/alpha."""
    z, zp = _logits(n=1)
    z.requires_grad_(True)
    g_alpha = torch.autograd.grad(head_loss("lk_alpha", z, zp, impl="reference"), z)[0]
    g_tv = torch.autograd.grad(head_loss("tv", z, zp, impl="reference"), z)[0]
    alpha = token_stats_reference(z.detach(), zp)[1]
    torch.testing.assert_close(g_alpha, g_tv / alpha, rtol=1e-4, atol=1e-9)
    cos = torch.nn.functional.cosine_similarity(g_alpha.flatten(), g_tv.flatten(), dim=0)
    assert cos.item() == pytest.approx(1.0, abs=1e-6)


def test_kl_gradient_is_q_minus_p() -> None:
    z, zp = _logits()
    z.requires_grad_(True)
    g = torch.autograd.grad(head_loss("kl", z, zp), z)[0]
    torch.testing.assert_close(g, (z.softmax(-1) - zp.softmax(-1)).detach() / N, rtol=1e-4, atol=1e-8)


def test_lambda_schedule() -> None:
    assert lam(0.0, 3.0).item() == 1.0
    assert lam(1e-6, 10.0).item() == pytest.approx(1.0, abs=1e-4)
    assert lam(1.0, 3.0).item() == pytest.approx(math.exp(-3))
    assert lam(0.2, 3.0).item() > lam(0.6, 3.0).item()
    # lambda is a stop-gradient constant: lk_hybrid's gradient is lam*gradKL + (1-lam)*gradTV exactly
    z, zp = _logits()
    z.requires_grad_(True)
    alpha_bar = token_stats_reference(z.detach(), zp)[1].mean()
    w = lam(alpha_bar, 3.0)
    g_h = torch.autograd.grad(head_loss("lk_hybrid", z, zp, eta=3.0), z)[0]
    g_kl = torch.autograd.grad(head_loss("kl", z, zp), z)[0]
    g_tv = torch.autograd.grad(head_loss("tv", z, zp), z)[0]
    torch.testing.assert_close(g_h, w * g_kl + (1 - w) * g_tv, rtol=1e-4, atol=1e-9)


def test_hybrid_is_kl_when_alpha_zero_and_tv_when_eta_large() -> None:
    z, zp = _logits()
    kl, alpha = token_stats_reference(z, zp)
    assert combine("lk_hybrid", kl, alpha, eta=0.0).item() == pytest.approx(kl.mean().item(), rel=1e-6)
    assert combine("lk_hybrid", kl, alpha, eta=1e4).item() == pytest.approx(1 - alpha.mean().item(), rel=1e-6)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("temperature", [1.0, 0.6, 1.7])
def test_chunked_equals_reference(name: str, temperature: float) -> None:
    """Value and gradient agree in fp32 to rtol 1e-4 (chunk of 64 columns forces many chunks)."""
    z, zp = _logits(seed=3, scale=4.0)
    mask = torch.rand(N, generator=torch.Generator().manual_seed(1)) > 0.3
    out = {}
    for impl in ("reference", "chunked"):
        zz = z.clone().requires_grad_(True)
        if impl == "chunked":
            import lkspec.losses as L

            kl, alpha = L.token_stats_chunked(zz[mask], zp[mask], temperature, chunk=64)
            c = _chain(name)
            loss = combine(name, kl, alpha, eta=3.0, chain=None if c is None else c[mask])
        else:
            loss = head_loss(name, zz, zp, mask, eta=3.0, temperature=temperature, impl=impl, chain=_chain(name))
        (grad,) = torch.autograd.grad(loss, zz)
        out[impl] = (loss.detach(), grad)
    torch.testing.assert_close(out["chunked"][0], out["reference"][0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["chunked"][1], out["reference"][1], rtol=1e-4, atol=1e-7)
    assert torch.all(out["chunked"][1][~mask] == 0)


def test_chunked_handles_bf16_logits_and_saturated_rows() -> None:
    z, zp = _logits(seed=5)
    z[0, :] = -1e4
    z[0, 3] = 1e4  # q is exactly one-hot
    zp[0] = z[0]  # ... and equal to p: alpha = 1, KL = 0
    kl, alpha = token_stats_chunked(z, zp)
    assert alpha[0].item() == pytest.approx(1.0) and kl[0].item() == pytest.approx(0.0, abs=1e-6)
    zb = z.bfloat16().requires_grad_(True)
    loss = head_loss("lk_hybrid", zb, zp.bfloat16())
    (g,) = torch.autograd.grad(loss, zb)
    assert g.dtype == torch.bfloat16 and torch.isfinite(g.float()).all()


def test_head_loss_bad_input() -> None:
    z, zp = _logits()
    with pytest.raises(LkspecError, match="unknown loss"):
        head_loss("ce", z, zp)
    bad = z.clone()
    bad[2, 5] = float("nan")
    with pytest.raises(LkspecError, match="NaN"):
        head_loss("kl", bad, zp)
    with pytest.raises(LkspecError, match=r"\[N, V\]"):
        head_loss("kl", z[:, :10], zp)
    with pytest.raises(LkspecError, match="temperature"):
        head_loss("kl", z, zp, temperature=0.0)


def test_lk_alpha_guards_zero_alpha() -> None:
    z = torch.full((2, 4), -1e4)
    z[:, 0] = 0
    zp = torch.full((2, 4), -1e4)
    zp[:, 1] = 0
    loss = head_loss("lk_alpha", z, zp)
    assert torch.isfinite(loss) and loss.item() > 20


def test_simulated_tau_and_weights() -> None:
    assert simulated_tau([1.0] * 6) == 7.0
    assert simulated_tau([0.0] * 6) == 1.0
    assert simulated_tau([0.5, 0.5]) == pytest.approx(1 + 0.5 + 0.25)
    assert head_weights(3) == pytest.approx([1.0, 0.8, 0.64])


def test_draft_loss_aggregates_heads_with_gamma() -> None:
    g = torch.Generator().manual_seed(0)
    B, T, K = 2, 10, 3
    target = torch.randn(B, T, V, generator=g)
    loss_mask = torch.ones(B, T, dtype=torch.bool)
    loss_mask[:, :3] = False
    logits = [torch.randn(B, T - k, V, generator=g, requires_grad=True) for k in range(1, K + 1)]
    masks = head_masks(loss_mask, K)
    targets = [head_targets(target, k) for k in range(1, K + 1)]
    total, stats = draft_loss("lk_hybrid", logits, targets, masks, eta=3.0)
    expected = sum(
        0.8**i * head_loss("lk_hybrid", logits[i].reshape(-1, V), targets[i].reshape(-1, V),
                           masks[i].reshape(-1), eta=3.0)
        for i in range(K)
    )
    torch.testing.assert_close(total, expected)
    assert [s.count for s in stats] == [m.sum().item() for m in masks]
    assert all(0 < s.alpha < 1 and 0 < s.lam <= 1 for s in stats)


def test_global_count_and_alpha_mean_reproduce_single_process() -> None:
    """Shards combined with the global count and global mean alpha give the full batch's gradient
    (what data-parallel ranks do); for the pure sums (kl, lk_alpha, per-token hybrid) also its value."""
    z, zp = _logits()
    for name in LOSSES:
        zz = z.clone().requires_grad_(True)
        c = _chain(name)
        full = combine(name, *token_stats_reference(zz, zp), eta=3.0, chain=c)
        (g_full,) = torch.autograd.grad(full, zz)
        zz2 = z.clone().requires_grad_(True)
        kl, alpha = token_stats_reference(zz2, zp)
        a_mean = alpha.detach().mean()
        halves = [combine(name, kl[s], alpha[s], eta=3.0, count=N, alpha_mean=a_mean,
                          chain=None if c is None else c[s])
                  for s in (slice(0, N // 3), slice(N // 3, N))]
        (g_sum,) = torch.autograd.grad(halves[0] + halves[1], zz2)
        torch.testing.assert_close(g_sum, g_full, rtol=1e-5, atol=1e-9)
        if name in ("kl", "lk_alpha", "lk_hybrid_token"):
            torch.testing.assert_close((halves[0] + halves[1]).detach(), full.detach(), rtol=1e-5, atol=1e-6)


def test_head_mask_alignment_and_documents() -> None:
    loss_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    m1 = head_mask(loss_mask, 1)  # anchor t predicts t+2
    assert m1.tolist() == [[1, 1, 1, 1, 1, 1, 0]]
    m2 = head_mask(loss_mask, 2)  # anchor t predicts t+3
    assert m2.tolist() == [[1, 1, 1, 1, 1, 0]]
    docs = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]])
    assert head_mask(loss_mask, 1, docs).tolist() == [[1, 1, 0, 0, 1, 1, 0]]


# ------------------------------------------------------------------------------------------------
# truncated draft vocabulary (paper §4.4)
# ------------------------------------------------------------------------------------------------
def _truncated(seed: int = 7, n: int = N, v: int = V, kept: int = 120) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    full = torch.randn(n, v, generator=g) * 3
    keep = torch.randperm(v, generator=g)[:kept]
    return torch.randn(n, kept, generator=g) * 2, full, keep


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_truncated_alpha_uses_the_original_p_and_kl_the_renormalised_one(temperature: float) -> None:
    z, full, keep = _truncated()
    lse = torch.logsumexp(full / temperature, -1)
    kl, alpha = token_stats_reference(z, full[:, keep], temperature, lse)
    q = (z / temperature).softmax(-1)
    p = (full / temperature).softmax(-1)[:, keep]  # not renormalised: sums to p(S) < 1
    torch.testing.assert_close(alpha, torch.minimum(p, q).sum(-1), rtol=1e-5, atol=1e-7)
    p_tilde = p / p.sum(-1, keepdim=True)
    torch.testing.assert_close(kl, (p_tilde * (p_tilde.log() - q.log())).sum(-1), rtol=1e-4, atol=1e-6)
    assert (alpha <= p.sum(-1) + 1e-6).all()  # no draft can accept mass the map leaves out
    # without the full normaliser the kept columns would be the whole distribution: alpha would be larger
    assert (token_stats_reference(z, full[:, keep], temperature)[1] > alpha).all()


@pytest.mark.parametrize("name", LOSSES)
def test_truncated_chunked_equals_reference(name: str) -> None:
    z, full, keep = _truncated(seed=11)
    lse = torch.logsumexp(full / 0.8, -1)
    out = {}
    for impl in ("reference", "chunked"):
        zz = z.clone().requires_grad_(True)
        if impl == "chunked":
            kl, alpha = token_stats_chunked(zz, full[:, keep], 0.8, chunk=32, target_lse=lse)
        else:
            kl, alpha = token_stats_reference(zz, full[:, keep], 0.8, lse)
        loss = combine(name, kl, alpha, eta=3.0, chain=_chain(name, z.shape[0]))
        (grad,) = torch.autograd.grad(loss, zz)
        out[impl] = (loss.detach(), grad)
    torch.testing.assert_close(out["chunked"][0], out["reference"][0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["chunked"][1], out["reference"][1], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("truncated", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_fused_equals_chunked_and_reference(truncated: bool, temperature: float) -> None:
    """The compiled twin: same per-token KL and alpha, same gradient under a loss that reads both."""
    from lkspec.losses.kernels import COMPILED, token_stats_fused

    if truncated:
        z, full, keep = _truncated(seed=13)
        zp, lse = full[:, keep], torch.logsumexp(full / temperature, -1)
    else:
        (z, zp), lse = _logits(seed=9, scale=4.0), None
    assert COMPILED.get(z.device) is not None, "torch.compile is expected to work where the suite runs"
    out = {}
    for name, fn in [("reference", token_stats_reference), ("fused", token_stats_fused)]:
        zz = z.clone().requires_grad_(True)
        kl, alpha = fn(zz, zp, temperature, target_lse=lse)
        loss = combine("lk_hybrid", kl, alpha, eta=3.0)
        (grad,) = torch.autograd.grad(loss, zz)
        out[name] = (kl.detach(), alpha.detach(), grad)
    chunked = token_stats_chunked(z, zp, temperature, chunk=32, target_lse=lse)
    for a, b in zip(out["fused"][:2], chunked, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for a, b in zip(out["fused"], out["reference"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_fused_falls_back_to_chunked_when_compiling_fails(monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    from lkspec.losses import kernels

    def broken(*_a: object, **_k: object) -> object:
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(kernels, "COMPILED", kernels._Compiled())
    monkeypatch.setattr(torch, "compile", broken)
    z, zp = _logits(seed=4)
    with caplog.at_level("WARNING"):
        kl, alpha = kernels.token_stats(z, zp, impl="fused")
    assert "using the chunked twin instead" in caplog.text
    ref = token_stats_chunked(z, zp)
    assert torch.equal(kl, ref[0]) and torch.equal(alpha, ref[1])
