"""Draft architectures: alignment, the exact vLLM math, tying, propose, checkpoints, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lkspec.drafts import DEFAULT_ETA, DRAFTS, build_draft, load_draft
from lkspec.errors import LkspecError

H, V, T, B = 16, 40, 12, 2
ARCHS = [("mlp_speculator", {"inner_dim": 24}), ("medusa", {"num_layers": 2, "bias": True})]


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, H, generator=g), torch.randint(0, V, (B, T), generator=g)


def _randomize(draft: torch.nn.Module, seed: int = 1) -> None:
    """MEDUSA starts with identity blocks; give every parameter random values so the tests see all paths."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 else 0.0))


def test_registry_and_paper_eta() -> None:
    assert set(DRAFTS) == {"mlp_speculator", "medusa", "eagle3"}
    assert DEFAULT_ETA == {"mlp_speculator": 3.0, "medusa": 10.0, "eagle3": 3.0}  # the paper's EAGLE-3 eta is 3


@pytest.mark.parametrize(("arch", "kw"), ARCHS)
def test_shapes_and_default_k(arch: str, kw: dict) -> None:
    d = build_draft(arch, hidden_size=H, vocab_size=V, seed=0, **kw)
    assert d.num_heads == 6
    out = d(*_inputs())
    assert [tuple(o.shape) for o in out] == [(B, T - k, V) for k in range(1, 7)]
    assert d.num_parameters() == sum(p.numel() for p in d.parameters())


@pytest.mark.parametrize(("arch", "kw"), ARCHS)
def test_alignment_every_head(arch: str, kw: dict) -> None:
    """Head k at anchor t may depend on h_t and tokens t+1..t+k (MLP) only — nothing else."""
    d = build_draft(arch, hidden_size=H, vocab_size=V, seed=0, **kw)
    _randomize(d)
    hidden, ids = _inputs()
    base = d(hidden, ids)
    t = 3
    for k in range(1, d.num_heads + 1):
        # another hidden state (not h_t) must not matter; h_t must
        h2 = hidden.clone()
        h2[:, t + 1] += 5.0
        h2[:, t - 1] += 5.0
        assert torch.allclose(d(h2, ids)[k - 1][:, t], base[k - 1][:, t])
        h3 = hidden.clone()
        h3[:, t] += 1.0
        assert not torch.allclose(d(h3, ids)[k - 1][:, t], base[k - 1][:, t])
        # tokens after t+k (incl. the predicted token t+k+1) and at/before t never leak in
        ids2 = ids.clone()
        ids2[:, t + k + 1 :] = (ids2[:, t + k + 1 :] + 1) % V
        ids2[:, : t + 1] = (ids2[:, : t + 1] + 1) % V
        assert torch.allclose(d(hidden, ids2)[k - 1][:, t], base[k - 1][:, t])
        # the MLP chain does read tokens t+1..t+k; MEDUSA reads none
        ids3 = ids.clone()
        ids3[:, t + k] = (ids3[:, t + k] + 1) % V
        changed = not torch.allclose(d(hidden, ids3)[k - 1][:, t], base[k - 1][:, t])
        assert changed == (arch == "mlp_speculator")


def _vllm_mlp_logits(d, hidden: torch.Tensor, ids: torch.Tensor) -> list[torch.Tensor]:
    """An independent transcription of vLLM's MLPSpeculator.generate_proposals, teacher-forced.

    vLLM: s = proj_i(s) + (emb_weight / state_weight) * emb_i(tok), emb_weight = sqrt((1-sw^2) * inner/2);
    s = GELU(LN_i(s)) with LN = w * x * rsqrt(mean(x^2) + 1e-6) + b; logits = head_i(s).
    """
    sd = {k: v.double() for k, v in d.state_dict().items()}
    K, inner = d.num_heads, d.config.inner
    sw = 0.5 ** (0.5 / K)
    ew = math.sqrt((1 - sw**2) * (inner / 2))
    s = hidden.double()
    if d.config.scale_input:
        s = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6) / math.sqrt(2)
    out = []
    for i in range(K):
        n = T - (i + 1)
        s = s[:, :n] @ sd[f"proj.{i}.weight"].T + (ew / sw) * sd[f"emb.{i}.weight"][ids[:, i + 1 : i + 1 + n]]
        s = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6) * sd[f"ln.{i}.weight"] + sd[f"ln.{i}.bias"]
        s = torch.nn.functional.gelu(s)
        out.append(s @ sd[f"head.{i}.weight"].T)
    return out


@pytest.mark.parametrize("scale_input", [False, True])
@pytest.mark.parametrize("tie", [False, True])
def test_mlp_equals_vllm_formula(scale_input: bool, tie: bool) -> None:
    """fms form (what we train) and vLLM form (divided by state_weight) give the same logits."""
    d = build_draft("mlp_speculator", hidden_size=H, vocab_size=V, inner_dim=24, seed=0,
                    scale_input=scale_input, tie_weights=tie)
    _randomize(d)
    hidden, ids = _inputs()
    ours = d(hidden, ids)
    ref = _vllm_mlp_logits(d, hidden, ids)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=2e-5)


def test_mlp_constants_and_init_scale() -> None:
    d = build_draft("mlp_speculator", hidden_size=H, vocab_size=V, inner_dim=64, seed=0)
    assert d.state_weight == pytest.approx(0.5 ** (0.5 / 6))
    assert d.emb_weight == pytest.approx(math.sqrt(1 - d.state_weight**2))
    w = d.head[0].weight
    assert w.std().item() == pytest.approx(1 / math.sqrt(64), rel=0.15)
    assert torch.all(d.ln[0].weight == 1) and torch.all(d.ln[0].bias == 0)


def test_tied_weights_share_storage() -> None:
    d = build_draft("mlp_speculator", hidden_size=H, vocab_size=V, inner_dim=24, tie_weights=True, seed=0)
    ptr = lambda t: t.untyped_storage().data_ptr()  # noqa: E731
    assert len({ptr(e.weight) for e in d.emb}) == 1
    assert len({ptr(h.weight) for h in d.head}) == 1
    assert len({ptr(ln.weight) for ln in d.ln}) == 1 and len({ptr(ln.bias) for ln in d.ln}) == 1
    assert len({ptr(p.weight) for p in d.proj[1:]}) == 1 and ptr(d.proj[0].weight) != ptr(d.proj[1].weight)
    untied = build_draft("mlp_speculator", hidden_size=H, vocab_size=V, inner_dim=24, seed=0)
    assert d.num_parameters() < untied.num_parameters()
    # a gradient step on one stage's head moves every stage's head
    with torch.no_grad():
        d.head[0].weight.add_(1.0)
    assert torch.equal(d.head[5].weight, d.head[0].weight)


@pytest.mark.parametrize(("arch", "kw"), ARCHS)
def test_propose_greedy_is_deterministic_and_matches_forward(arch: str, kw: dict) -> None:
    d = build_draft(arch, hidden_size=H, vocab_size=V, seed=0, **kw)
    _randomize(d)
    hidden, ids = _inputs()
    h, last = hidden[:, 0], ids[:, 0]
    a = d.propose(h, last, temperature=0)
    b = d.propose(h, last, temperature=0)
    assert torch.equal(a.tokens, b.tokens)
    assert torch.all(a.probs.sum(-1) == 1) and torch.all(a.probs.max(-1).values == 1)
    # teacher-forcing [_, last, d_1..d_{K-1}] at anchor 0 reproduces each head's argmax
    seq = torch.cat([ids[:, :1], last[:, None], a.tokens[:, :-1]], 1)
    hid = torch.cat([h[:, None], torch.zeros(B, d.num_heads, H)], 1)
    logits = d(hid, seq)
    for k in range(1, d.num_heads + 1):
        assert torch.equal(logits[k - 1][:, 0].argmax(-1), a.tokens[:, k - 1])


@pytest.mark.parametrize(("arch", "kw"), ARCHS)
def test_propose_samples_from_q(arch: str, kw: dict) -> None:
    """At T=1 the first drafted token's frequencies match q (chi-square, 4000 draws, p > 1e-3)."""
    torch.manual_seed(0)  # the weights and the state below come from the global RNG: fix them
    d = build_draft(arch, hidden_size=H, vocab_size=8, seed=0, **kw)
    _randomize(d)
    n = 4000
    h = torch.randn(1, H).expand(n, H)
    last = torch.full((n,), 3)
    prop = d.propose(h, last, temperature=1.0, generator=torch.Generator().manual_seed(0))
    q = prop.probs[0, 0].double()
    counts = torch.bincount(prop.tokens[:, 0], minlength=8).double()
    expected = q * n
    keep = expected > 5
    chi2 = (((counts - expected) ** 2) / expected)[keep].sum().item()
    dof = int(keep.sum()) - 1
    # 1e-3 upper quantile of chi-square via Wilson-Hilferty
    z = 3.09
    crit = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < crit, (chi2, crit)
    assert torch.allclose(prop.probs.sum(-1), torch.ones(n, d.num_heads))


@pytest.mark.parametrize(("arch", "kw"), [*ARCHS, ("mlp_speculator", {"inner_dim": 24, "tie_weights": True})])
def test_save_load_roundtrip(tmp_path, arch: str, kw: dict) -> None:
    d = build_draft(arch, hidden_size=H, vocab_size=V, seed=0, **kw)
    _randomize(d)
    d.save(tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["lkspec"]["arch"] == arch
    d2 = load_draft(tmp_path / "ck")
    hidden, ids = _inputs()
    for a, b in zip(d(hidden, ids), d2(hidden, ids), strict=True):
        assert torch.equal(a, b)


def test_seeded_init_is_reproducible() -> None:
    a = build_draft("mlp_speculator", hidden_size=H, vocab_size=V, seed=7)
    b = build_draft("mlp_speculator", hidden_size=H, vocab_size=V, seed=7)
    c = build_draft("mlp_speculator", hidden_size=H, vocab_size=V, seed=8)
    assert torch.equal(a.head[0].weight, b.head[0].weight)
    assert not torch.equal(a.head[0].weight, c.head[0].weight)


def test_bad_input() -> None:
    with pytest.raises(LkspecError, match="num_heads: Input should be greater than or equal to 1"):
        build_draft("mlp_speculator", hidden_size=H, vocab_size=V, num_heads=0)
    with pytest.raises(LkspecError, match="unknown draft architecture"):
        build_draft("eagle9", hidden_size=H, vocab_size=V)
    with pytest.raises(LkspecError, match="unknown key 'inner_dim'"):
        build_draft("medusa", hidden_size=H, vocab_size=V, inner_dim=3)  # an MLP key on MEDUSA: refused
    d = build_draft("medusa", hidden_size=H, vocab_size=V, num_heads=2)
    with pytest.raises(LkspecError, match="K <= 2"):
        d.propose(torch.randn(1, H), torch.tensor([0]), num_tokens=3)
    with pytest.raises(LkspecError, match="temperature"):
        d.propose(torch.randn(1, H), torch.tensor([0]), temperature=-1)


def _mirrored_mlp(**kw: object) -> torch.nn.Module:
    d = build_draft("mlp_speculator", seed=0, hidden_size=H, vocab_size=V, inner_dim=2 * H, tie_weights=True, **kw)
    _randomize(d)
    with torch.no_grad():  # the target-initialised form of every head: [A, -A]
        a = d.head[0].weight[:, :H].clone()
        d.head[0].weight.copy_(torch.cat([a, -a], 1))
    return d


def test_mirrored_heads_take_the_half_projection_with_the_same_logits() -> None:
    d = _mirrored_mlp()
    x, ids = _inputs()
    full = [s @ d.head_weight(k).T for k, s in enumerate(d.head_states(x, ids), 1)]
    with torch.no_grad():
        assert all(h.mirrored() for h in d.head)
        for a, b in zip(d.head_logits(x, ids), full, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    state = dict(d.state_dict())
    assert {k for k in state if k.startswith("head.")} == {f"head.{i}.weight" for i in range(6)}
    with torch.no_grad():  # a write that breaks the form: the head is projected in full again
        d.head[0].weight[0, 0] += 1.0
        assert not d.head[0].mirrored()
        torch.testing.assert_close(d.head_logits(x, ids)[0], d.head_states(x, ids)[0] @ d.head_weight(1).T)


def test_a_mirrored_head_being_trained_gets_the_full_gradient() -> None:
    """The shortcut would hand its gradient to one half only: a weight that wants a gradient is projected in full."""
    d = _mirrored_mlp(num_heads=2)
    x, ids = _inputs()
    assert not d.head[0].mirrored()  # grad mode, weight trainable
    d.head_logits(x, ids)[0].pow(2).sum().backward()
    g = d.head[0].weight.grad
    assert g is not None and g[:, H:].abs().sum() > 0 and g[:, :H].abs().sum() > 0
    d.zero_grad()
    for p in d.vocab_parameters():  # draft.freeze: the shortcut, and the trunk's gradient is unchanged
        p.requires_grad_(False)
    assert d.head[0].mirrored()
    d.head_logits(x, ids)[0].pow(2).sum().backward()
    folded = d.proj[0].weight.grad.clone()
    d.zero_grad()
    s = d.head_states(x, ids)[0]
    (s @ d.head_weight(1).T).pow(2).sum().backward()
    torch.testing.assert_close(folded, d.proj[0].weight.grad, rtol=1e-4, atol=1e-5)
