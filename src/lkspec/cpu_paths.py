"""Two CPU paths a speculative round needs and stock PyTorch/transformers do not take.

A round on CPU is a handful of tokens at a time: the target verifies k + 1 of them in one cached pass, a
draft proposes one at a time. Both stock paths for such small shapes are slow on the 2-core reference host
(benchmarks/pass_paths.py, docs/evaluation.md "Where a CPU pass goes"):

1. `F.linear` with 1-16 rows takes an MKL path up to several times slower than the same product written as
   `(W @ x.T).T` with an even number of rows (an odd count padded by repeating the last row; one row alone
   dispatches to gemv). SmolLM2's 49152 x 576 lm_head: 10-35 ms at 1-7 rows against 4.8-15 ms; a whole
   cached pass + lm_head at 200 cached tokens, 1 / 2 / 4 / 7 new tokens: 68 / 105 / 105 / 104 ms stock,
   40 / 36 / 52 / 78 ms with both paths (2026-12-03, interleaved, benchmarks/pass_paths.py). The result is
   made contiguous: returned as a transposed view, it sent every attention of the next layer onto SDPA's
   math kernel. Large row counts — training, prefill — keep `F.linear`, the fast path there.
2. With a mask, which every multi-token pass over a cache has, transformers' SDPA attention repeats the
   grouped KV heads by copying the whole cache per layer (`use_gqa_in_sdpa` is False whenever a mask is
   given, because CUDA's fused kernels refuse masked GQA). On CPU, SDPA's `enable_gqa` takes the mask and
   gives identical logits without the copy.

Both are plain rewrites of the same arithmetic (linear: float rounding differs in the last bits, as it does
between any two GEMM shapes, 4e-5 on a 7-token pass's logits; attention: a max difference of 0.0
measured), so the target's distribution is unchanged and every exactness test runs through them. They
apply on CPU only; on CUDA the stock paths are the fast ones.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

SMALL_ROWS = 16  # at most this many rows take the `W @ x.T` product (measured up to 16 rows)
GQA_ATTENTION = "lkspec_sdpa_gqa"  # the transformers attention-interface name lkspec registers


def small_rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, computed as `(weight @ x.T).T` over an even number of rows when x has
    few rows on CPU."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows > SMALL_ROWS or rows == 0 or x.device.type != "cpu":
        return nn.functional.linear(x, weight, bias)
    flat = x.reshape(rows, x.shape[-1])
    if rows % 2:
        flat = torch.cat([flat, flat[-1:]])
    y = (weight @ flat.t()).t()[:rows].contiguous()
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], weight.shape[0])


class SmallRowsLinear(nn.Linear):
    """An nn.Linear whose forward takes `small_rows_linear` (same parameters, same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return small_rows_linear(x, self.weight, self.bias)


def use_small_rows_linears(module: nn.Module) -> int:
    """Route every plain nn.Linear under `module` (on CPU) through `small_rows_linear`; returns how many."""
    count = 0
    for m in module.modules():
        if type(m) is nn.Linear and m.weight.device.type == "cpu":
            m.__class__ = SmallRowsLinear
            count += 1
    return count


def sdpa_gqa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       is_causal: bool | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' SDPA attention, except that a masked multi-query pass over grouped KV heads on CPU
    passes `enable_gqa` instead of copying the cache; every other case is the stock function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    stock = (attention_mask is None or groups == 1 or query.shape[2] == 1 or query.device.type != "cpu"
             or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None
             or kwargs.get("output_attentions", False))
    if stock:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                                     scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def use_gqa_attention(model: Any) -> bool:
    """Switch a transformers model that runs SDPA attention on CPU to `sdpa_gqa_attention` (its masks stay
    SDPA's). False, with the model unchanged, where that does not apply: another attention implementation,
    a device other than CPU, or a transformers without the attention interfaces."""
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or model.device.type != "cpu":
        return False
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False
    AttentionInterface.register(GQA_ATTENTION, sdpa_gqa_attention)
    AttentionMaskInterface.register(GQA_ATTENTION, sdpa_mask)
    try:
        model.set_attn_implementation(GQA_ATTENTION)
    except (AttributeError, ValueError):
        return False
    return bool(config._attn_implementation == GQA_ATTENTION)


def use_cpu_paths(model: nn.Module) -> None:
    """Both paths on a model that decodes on CPU (a no-op elsewhere)."""
    use_gqa_attention(model)
    use_small_rows_linears(model)
