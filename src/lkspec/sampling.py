"""Turning logits into the distribution a token is drawn from, identically for target and draft.

Speculative decoding is lossless only if the draft's q and the target's p are warped by the *same*
rule (temperature, top-k, top-p) before the rejection test; one function serves both sides.
T = 0 means greedy: the distribution is the one-hot of the argmax.
"""

from __future__ import annotations

import torch

from lkspec.errors import LkspecError


def check_temperature(temperature: float) -> None:
    if not temperature >= 0:  # also catches NaN
        raise LkspecError(f"temperature must be >= 0 (0 = greedy), got {temperature}")


def warp_probs(logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Probabilities over the last dim after temperature, top-k and top-p (fp32).

    top_k = 0 and top_p = 1 disable those filters. Ties at the top-k boundary keep every tied token,
    as HF's and vLLM's samplers do.
    """
    check_temperature(temperature)
    logits = logits.float()
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).to(torch.float32)
    logits = logits / temperature
    if top_k and 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        if not 0 < top_p <= 1:
            raise LkspecError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p (the top token always stays)
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of `probs` [..., V] -> [...] (int64)."""
    flat = probs.reshape(-1, probs.shape[-1])
    out = torch.multinomial(flat, 1, generator=generator).squeeze(-1)
    return out.reshape(probs.shape[:-1])
