"""lk_tau, the expected-tau loss: its head weights are tau's derivative, its twins agree with the definition,
and its gradient moves weight to where a chain actually reaches."""

from __future__ import annotations

import pytest
import torch

from lkspec.alignment import head_mask, head_targets
from lkspec.drafts import build_draft
from lkspec.losses import (
    LOSSES,
    chain_weights,
    draft_loss,
    expected_tau,
    lk_tau_reference,
    token_stats_reference,
)
from lkspec.targets import Target
from lkspec.train.batching import Doc
from lkspec.train.step import StepRunner, head_modules
from test_train import make_docs

V = 50


@pytest.fixture(scope="module")
def tiny_docs(tiny_target: Target) -> list[Doc]:
    return make_docs(tiny_target)


def _heads(K: int, B: int, n: int, seed: int = 0) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """K heads of [B, n - k + 1] logits, targets and masks with some rows masked out (anchors aligned)."""
    g = torch.Generator().manual_seed(seed)
    z = [torch.randn(B, n - k, V, generator=g, dtype=torch.float64).float().requires_grad_(True) for k in range(K)]
    zp = [torch.randn(B, n - k, V, generator=g) * 3 for k in range(K)]
    m = [torch.rand(B, n - k, generator=g) > 0.2 for k in range(K)]
    return z, zp, m


def test_chain_weights_are_the_derivative_of_expected_tau() -> None:
    g = torch.Generator().manual_seed(0)
    alpha = torch.rand(5, 3, 7, generator=g, dtype=torch.float64)
    alpha[3:, :, 5:] = 0.0  # heads past the end of a response
    alpha[0, 1, 2] = 0.0  # a rejected first head: nothing after it counts
    live = alpha.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(expected_tau(live).sum(), live)
    torch.testing.assert_close(chain_weights(alpha), grad)
    assert torch.all(chain_weights(alpha)[1:, 1, 2] == 0)
    assert expected_tau(torch.ones(6, 1))[0] == 7.0


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_twin_equals_reference_value_and_gradient(temperature: float) -> None:
    z, zp, m = _heads(K=4, B=3, n=12, seed=1)
    ref = lk_tau_reference(z, zp, m, eta=3.0, temperature=temperature)
    g_ref = torch.autograd.grad(ref, z)
    total, stats = draft_loss("lk_tau", z, zp, m, eta=3.0, temperature=temperature, impl="chunked")
    g = torch.autograd.grad(total, z)
    torch.testing.assert_close(total, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    assert all(0 < s.lam < 1 for s in stats)


def test_without_kl_the_gradient_is_minus_the_gradient_of_expected_tau() -> None:
    """lambda -> 0 (eta huge) and equal anchors per head: the loss's gradient is -d mean_t E[tau_t]."""
    K, B, n = 3, 2, 9
    g = torch.Generator().manual_seed(2)
    z = [torch.randn(B, n, V, generator=g).requires_grad_(True) for _ in range(K)]
    zp = [torch.randn(B, n, V, generator=g) * 2 for _ in range(K)]
    m = [torch.ones(B, n, dtype=torch.bool) for _ in range(K)]
    total, _ = draft_loss("lk_tau", z, zp, m, eta=1e4)
    g_loss = torch.autograd.grad(total, z)
    alpha = torch.stack([token_stats_reference(zk.reshape(-1, V), pk.reshape(-1, V))[1]
                         for zk, pk in zip(z, zp, strict=True)])
    g_tau = torch.autograd.grad(-expected_tau(alpha).mean(), z)
    for a, b in zip(g_loss, g_tau, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


def test_gradient_follows_the_chain_where_gamma_weights_do_not() -> None:
    """Two anchors, head 2 identical at both, head 1 rejected at A and accepted at B: only rounds through B
    ever test head 2, so lk_tau pushes head 2 at B ~ alpha_1(B) / alpha_1(A) times harder; gamma-weighted
    L^alpha (and TV) push equally, blind to the chain."""
    target = torch.randn(V, generator=torch.Generator().manual_seed(3)) * 3
    far = -target  # head 1 at A: the opposite of the target
    near = target.clone()  # head 1 at B: the target itself
    z1 = torch.stack([far, near])[None].requires_grad_(True)  # [1, 2 anchors, V]
    z2 = torch.zeros(1, 2, V).requires_grad_(True)  # head 2: uniform at both anchors
    zp = target.expand(1, 2, V)
    masks = [torch.ones(1, 2, dtype=torch.bool)] * 2
    a1 = token_stats_reference(z1.detach()[0], zp[0])[1]
    assert a1[0] < 0.1 < 0.9 < a1[1]
    ratio = {}
    for name in ("lk_tau", "lk_alpha", "tv"):
        total, _ = draft_loss(name, [z1, z2], [zp, zp], masks, eta=1e4)
        (g2,) = torch.autograd.grad(total, z2)
        ratio[name] = float(g2[0, 1].norm() / g2[0, 0].norm())
    assert ratio["lk_tau"] == pytest.approx(float(a1[1] / a1[0]), rel=1e-4)
    assert ratio["lk_alpha"] == pytest.approx(1.0, rel=1e-5) and ratio["tv"] == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("arch", ["mlp_speculator", "medusa"])
def test_the_training_step_equals_the_reference(tiny_target: Target, tiny_docs: list[Doc], arch: str) -> None:
    """StepRunner (packed documents, per-head backward, detached chain weights, several micro-batches) gives
    the reference's gradient over the same documents."""
    opts = {"inner_dim": 16} if arch == "mlp_speculator" else {"num_layers": 1}
    draft = build_draft(arch, seed=1, hidden_size=tiny_target.hidden_size, vocab_size=tiny_target.vocab_size,
                        num_heads=3, **opts)
    if arch == "medusa":  # zero-init blocks would hide the trunk's gradient
        torch.nn.init.normal_(draft.blocks[0].layers[0].weight, std=0.1)
    docs = tiny_docs[:6]
    T = max(len(d) for d in docs)
    h = torch.zeros(len(docs), T, tiny_target.hidden_size)
    ids = torch.zeros(len(docs), T, dtype=torch.long)
    loss_mask = torch.zeros(len(docs), T, dtype=torch.bool)
    for i, d in enumerate(docs):  # padded at the end: neither architecture's anchors look right
        h[i, : len(d)], ids[i, : len(d)], loss_mask[i, : len(d)] = d.hidden.float(), d.input_ids, d.loss_mask
    teacher = tiny_target.logits_from_hidden(h)
    ref = lk_tau_reference(list(draft(h, ids)), [head_targets(teacher, k) for k in range(1, 4)],
                           [head_mask(loss_mask, k) for k in range(1, 4)], eta=3.0)
    ref.backward()
    expect = {n: p.grad.clone() for n, p in draft.named_parameters()}
    for micro in (4096, 20):  # one packed row / windows and micro-batches (lambda's alpha pre-pass)
        draft.zero_grad(set_to_none=True)
        runner = StepRunner(draft, tiny_target, head_modules(draft), loss="lk_tau", eta=3.0, gamma=0.8,
                            temperature=1.0, impl="chunked", micro_batch_tokens=micro)
        sums = runner.accumulate(runner.pack(docs))
        assert all(v is not None for v in sums.summary("lk_tau", 3.0).loss)
        for n, p in draft.named_parameters():
            torch.testing.assert_close(p.grad, expect[n], rtol=2e-4, atol=2e-6, msg=f"{micro} {n}")


def test_truncated_vocabulary_trains(tiny_target: Target, tiny_docs: list[Doc]) -> None:
    """A 40-row head: the step runs, and windows/micro-batches change nothing."""
    draft = build_draft("mlp_speculator", seed=1, hidden_size=tiny_target.hidden_size,
                        vocab_size=tiny_target.vocab_size, num_heads=3, inner_dim=16, draft_vocab_size=40)
    draft.set_token_map(torch.arange(40) * 2)
    grads = []
    for micro in (4096, 20):
        draft.zero_grad(set_to_none=True)
        runner = StepRunner(draft, tiny_target, head_modules(draft), loss="lk_tau", eta=3.0, gamma=0.8,
                            temperature=1.0, impl="chunked", micro_batch_tokens=micro)
        runner.accumulate(runner.pack(tiny_docs[:6]))
        grads.append({n: p.grad.clone() for n, p in draft.named_parameters() if p.grad is not None})
    assert grads[0] and all(torch.isfinite(g).all() for g in grads[0].values())
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=2e-4, atol=2e-6, msg=n)


def test_registered() -> None:
    entry = LOSSES["lk_tau"]
    assert entry.chain and entry.batch_alpha and entry.uses_eta
