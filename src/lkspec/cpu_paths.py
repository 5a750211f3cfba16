"""Two CPU paths a speculative round needs and stock PyTorch/transformers do not take.

A round on CPU is a handful of tokens at a time: the target verifies k + 1 of them in one cached pass, a
draft proposes one at a time. The stock paths for such small shapes are slow on the 2-core reference host
(benchmarks/pass_paths.py, docs/evaluation.md "Where a CPU pass goes"):

1. `F.linear` hands a few-row product to MKL, which reads the weight at a fraction of the memory bandwidth
   a one-row product reaches: SmolLM2's 49152 x 576 lm_head takes 10-37 ms at 1-7 rows. Two rewrites of it
   (per shape, cache-cold, `benchmarks/linear_paths.py`):
   * 1-2 rows (plain decoding, a K = 1 verification, a draft's proposal): `(W @ x.T).T` over an even row
     count (one row padded to two by repeating it), the fastest path at every shape (lm_head 3.7-4.4 ms).
     The result is made contiguous: returned as a transposed view, it sent every attention of the next
     layer onto SDPA's math kernel. It is also the path wherever a gradient is wanted, up to 16 rows.
   * 3 rows and more, without a gradient: oneDNN's inner product over a copy of the weight reordered once
     into its blocked layout (`torch.ops.mkldnn._linear_pointwise`, what inductor's CPU backend calls):
     4.7-5.4 ms for the lm_head at 3-7 rows (`W @ x.T`: 6.3-8.5, MKL 22-37), and faster than `F.linear`
     at 64-4096 rows too (prefill, batched regeneration). The copy lives on the weight (`PACKED`), is
     rebuilt when the weight is written, and costs as much memory as the weight, so only the linears
     `use_cpu_linears` marks (a loaded target, the generator's draft) take it, and not where the copies
     would take more than a quarter of the machine's memory. Training keeps `F.linear` (autograd's).
2. With a mask, which every multi-token pass over a cache has, transformers' SDPA attention repeats the
   grouped KV heads by copying the whole cache per layer (`use_gqa_in_sdpa` is False whenever a mask is
   given, because CUDA's fused kernels refuse masked GQA). On CPU, SDPA's `enable_gqa` takes the mask and
   gives identical logits without the copy.

Both are rewrites of the same arithmetic (linear: float rounding differs in the last bits, as it does
between any two GEMM shapes; attention: a max difference of 0.0 measured), so the target's distribution is
unchanged and every exactness test runs through them. They apply on CPU only; on CUDA the stock paths are
the fast ones.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

SMALL_ROWS = 16  # at most this many rows take the `W @ x.T` product (measured up to 16 rows)
GQA_ATTENTION = "lkspec_sdpa_gqa"  # the transformers attention-interface name lkspec registers
ONEDNN_MIN_ROWS = 3  # 1-2 rows stream every weight faster as `W @ x.T` (per shape, cache-cold, measured)
PACKED = "_lkspec_onednn"  # weight attribute: None (marked), False (oneDNN refused it), or (key, reordered)
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


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


def _reordered(weight: torch.Tensor) -> torch.Tensor | None:
    """The weight in oneDNN's layout, reordered again whenever the weight was written or replaced."""
    cached = getattr(weight, PACKED, False)
    if cached is False:
        return None
    key = (weight._version, weight.data_ptr())
    if cached is None or cached[0] != key:
        try:
            cached = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach()))
        except RuntimeError:
            cached = False  # this build's oneDNN cannot take it: the other paths, from now on
        setattr(weight, PACKED, cached)
    return None if cached is False else cached[1]


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """`F.linear(x, weight, bias)` by oneDNN over the weight's reordered copy; None where that path does not
    apply (an unmarked weight, a gradient wanted, not fp32 on CPU, no oneDNN)."""
    grad = torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad
                                        or (bias is not None and bias.requires_grad))
    fp32 = x.dtype == weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32)
    packed = _reordered(weight) if _ONEDNN and fp32 and not grad and x.device.type == "cpu" and x.numel() else None
    if packed is None:
        return None
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    y = torch.ops.mkldnn._linear_pointwise(flat, packed, bias, "none", [], "")
    return y.reshape(*x.shape[:-1], weight.shape[0])


def cpu_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` on the fastest CPU path that applies (the module docstring)."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    y = onednn_linear(x, weight, bias) if rows >= ONEDNN_MIN_ROWS else None
    return small_rows_linear(x, weight, bias) if y is None else y


def mark_for_onednn(weight: torch.Tensor) -> None:
    """Let `cpu_linear` keep a oneDNN copy of this (CPU, fp32) weight."""
    if _ONEDNN and weight.device.type == "cpu" and weight.dtype == torch.float32 and not hasattr(weight, PACKED):
        setattr(weight, PACKED, None)


class CpuLinear(nn.Linear):
    """An nn.Linear whose forward takes `cpu_linear` (same parameters, same state dict)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return cpu_linear(x, self.weight, self.bias)


def use_cpu_linears(module: nn.Module) -> int:
    """Route every plain nn.Linear under `module` (on CPU) through `cpu_linear`; returns how many. Their
    weights are marked for the oneDNN copy unless those copies would take more than a quarter of this
    machine's memory (a large target on CPU keeps the other paths rather than doubling its footprint)."""
    linears = [m for m in module.modules()
               if (type(m) is nn.Linear or isinstance(m, CpuLinear)) and m.weight.device.type == "cpu"]
    weights = {id(m.weight): m.weight for m in linears}.values()
    copies = sum(w.numel() * w.element_size() for w in weights)
    fits = copies <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    swapped = 0
    for m in linears:
        if type(m) is nn.Linear:  # a CpuLinear already (a draft's own head class) keeps its class
            m.__class__ = CpuLinear
            swapped += 1
        if fits:
            mark_for_onednn(m.weight)
    return swapped


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
    """The paths on a model that decodes on CPU (a no-op elsewhere)."""
    use_gqa_attention(model)
    use_cpu_linears(model)
