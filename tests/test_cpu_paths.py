"""The CPU paths of lkspec.cpu_paths compute what the stock paths compute, and are the ones a loaded target takes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from lkspec.cpu_paths import (
    GQA_ATTENTION,
    ONEDNN_MIN_ROWS,
    PACKED,
    SMALL_ROWS,
    CpuLinear,
    cpu_linear,
    mark_for_onednn,
    small_rows_linear,
    use_cpu_linears,
    use_gqa_attention,
)
from lkspec.speed import verify_pass_logits
from lkspec.targets import Target, load_target

onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")


@pytest.mark.parametrize("rows", [1, 2, 3, 7, SMALL_ROWS, SMALL_ROWS + 1, 40])
@pytest.mark.parametrize("bias", [False, True])
def test_small_rows_linear_matches_f_linear_value_and_gradient(rows: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(1, rows, 24, generator=g, requires_grad=True)
    w = torch.randn(300, 24, generator=g, requires_grad=True)
    b = torch.randn(300, generator=g, requires_grad=True) if bias else None
    ref = nn.functional.linear(x, w, b)
    out = small_rows_linear(x, w, b)
    assert out.shape == ref.shape == (1, rows, 300)
    assert out.is_contiguous()  # a transposed result sent every attention of the next layer to SDPA's math path
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    up = torch.randn(ref.shape, generator=g)
    grads = torch.autograd.grad((out * up).sum(), [x, w] + ([b] if bias else []))
    grads_ref = torch.autograd.grad((ref * up).sum(), [x, w] + ([b] if bias else []))
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@onednn
@pytest.mark.parametrize("shape", [(1, 1), (1, ONEDNN_MIN_ROWS), (1, 7), (2, 5), (1, 40), (3, 100)])
@pytest.mark.parametrize("bias", [False, True])
def test_onednn_linear_matches_f_linear(shape: tuple[int, int], bias: bool) -> None:
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, 24, generator=g)
    w, b = torch.randn(300, 24, generator=g), torch.randn(300, generator=g) if bias else None
    mark_for_onednn(w)
    with torch.no_grad():
        out = cpu_linear(x, w, b)
    rows = shape[0] * shape[1]
    assert isinstance(getattr(w, PACKED), tuple) == (rows >= ONEDNN_MIN_ROWS), "oneDNN taken at the wrong row count"
    assert out.shape == (*shape, 300) and out.is_contiguous()
    torch.testing.assert_close(out, nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)


@onednn
def test_onednn_copy_follows_the_weight_and_gradients_take_autograd() -> None:
    """A cached oneDNN copy is rebuilt when the weight is written (an optimiser step, a loaded state dict),
    and a pass that wants gradients never reads it."""
    lin = nn.Linear(24, 50)
    assert use_cpu_linears(lin) == 1 and type(lin) is CpuLinear
    x = torch.randn(3, 24)
    with torch.no_grad():
        lin(x)
        first = getattr(lin.weight, PACKED)
        lin.weight.mul_(-2.0)
        torch.testing.assert_close(lin(x), nn.functional.linear(x, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
    assert getattr(lin.weight, PACKED) is not first
    lin.load_state_dict({"weight": torch.ones(50, 24), "bias": torch.zeros(50)})
    with torch.no_grad():
        torch.testing.assert_close(lin(x), x.sum(-1, keepdim=True).expand(3, 50), rtol=1e-5, atol=1e-5)
    out = lin(x)
    assert out.grad_fn is not None
    (grad,) = torch.autograd.grad(out.sum(), [lin.weight])
    torch.testing.assert_close(grad, x.sum(0).expand(50, 24))


def test_linear_swap_keeps_parameters_and_state_dict() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4, bias=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 8)
    ref = model(x)
    assert use_cpu_linears(model) == 2
    assert all(type(m) is CpuLinear for m in model if isinstance(m, nn.Linear))
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    torch.testing.assert_close(model(x), ref)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    assert use_cpu_linears(model) == 0  # already swapped: nothing to do


def test_onednn_copies_are_skipped_where_memory_is_short(monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.sysconf
    monkeypatch.setattr(os, "sysconf", lambda name: 1 if name == "SC_PHYS_PAGES" else real(name))
    model = nn.Sequential(nn.Linear(64, 64))  # 16 KiB of weight, a quarter of "memory" is one page
    assert use_cpu_linears(model) == 1 and type(model[0]) is CpuLinear
    assert not hasattr(model[0].weight, PACKED)
    x = torch.ones(4, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), nn.functional.linear(x, model[0].weight, model[0].bias))
    assert not hasattr(model[0].weight, PACKED)


def test_loaded_target_takes_the_cpu_paths(tiny_target: Target) -> None:
    assert tiny_target.model.config._attn_implementation == GQA_ATTENTION
    linears = [m for m in tiny_target.model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is CpuLinear for m in linears)
    if torch.backends.mkldnn.is_available():
        assert all(hasattr(m.weight, PACKED) for m in linears)


def test_gqa_attention_skips_the_kv_copy_and_keeps_the_logits(tiny_target_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A masked multi-token pass over a cache (a verification pass) gives the stock logits without
    transformers' `repeat_kv`, which copies the whole cache per layer."""
    import transformers.integrations.sdpa_attention as sdpa

    target = load_target(tiny_target_dir, device="cpu")
    assert target.model.config.num_key_value_heads < target.model.config.num_attention_heads
    ids = torch.randint(0, target.vocab_size, (1, 27), generator=torch.Generator().manual_seed(0))
    fast = verify_pass_logits(target, ids, 20)

    calls = []
    real = sdpa.repeat_kv
    monkeypatch.setattr(sdpa, "repeat_kv", lambda *a: calls.append(1) or real(*a))
    verify_pass_logits(target, ids, 20)
    assert not calls, "the GQA path copied the KV cache"
    target.model.set_attn_implementation("sdpa")
    stock = verify_pass_logits(target, ids, 20)
    assert calls, "the stock path no longer copies the cache: this test checks nothing"
    torch.testing.assert_close(fast, stock, rtol=1e-5, atol=1e-5)
    assert use_gqa_attention(target.model)
    assert target.model.config._attn_implementation == GQA_ATTENTION


def test_gqa_attention_leaves_other_implementations_alone(tiny_target_dir: Path) -> None:
    target = load_target(tiny_target_dir, device="cpu")
    target.model.set_attn_implementation("eager")
    assert not use_gqa_attention(target.model)
    assert target.model.config._attn_implementation == "eager"
