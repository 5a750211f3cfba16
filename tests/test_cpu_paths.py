"""The CPU paths of lkspec.cpu_paths compute what the stock paths compute, and are the ones a loaded target takes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lkspec.cpu_paths import (
    GQA_ATTENTION,
    SMALL_ROWS,
    SmallRowsLinear,
    small_rows_linear,
    use_gqa_attention,
    use_small_rows_linears,
)
from lkspec.speed import verify_pass_logits
from lkspec.targets import Target, load_target


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


def test_linear_swap_keeps_parameters_and_state_dict() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4, bias=False))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(3, 8)
    ref = model(x)
    assert use_small_rows_linears(model) == 2
    assert all(type(m) is SmallRowsLinear for m in model if isinstance(m, nn.Linear))
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    torch.testing.assert_close(model(x), ref)
    assert use_small_rows_linears(model) == 0  # already swapped: nothing to do


def test_loaded_target_takes_both_paths(tiny_target: Target) -> None:
    assert tiny_target.model.config._attn_implementation == GQA_ATTENTION
    linears = [m for m in tiny_target.model.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is SmallRowsLinear for m in linears)


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
