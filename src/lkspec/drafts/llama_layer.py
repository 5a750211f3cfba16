"""The pieces of a Llama decoder layer as EAGLE-3 uses them: RMSNorm, grouped-query attention with RoPE whose
input is twice the hidden width, the SiLU-gated MLP, and the layer that joins them (vLLM's names throughout).

Attention is split into `qkv` and `out` because the draft computes scores itself: its teacher-forced pass scores
every anchor's chain against step 1's keys plus the chain's own (`lkspec.drafts.eagle3`), which no fused kernel
call expresses. The layers take the draft's config (an `Eagle3Config`: hidden size, heads, KV heads, head_dim,
MLP width, RoPE theta, norm eps).
"""

from __future__ import annotations

import bisect
import itertools
from typing import Any

import torch
from torch import nn


class RMSNorm(nn.Module):
    """Llama's: x * rsqrt(mean(x^2) + eps) * weight, normalised in fp32."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, c: Any) -> None:
        super().__init__()
        H, nh, nkv, d = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.nh, self.nkv, self.d = nh, nkv, d
        self.q_proj = nn.Linear(2 * H, nh * d, bias=False)
        self.k_proj = nn.Linear(2 * H, nkv * d, bias=False)
        self.v_proj = nn.Linear(2 * H, nkv * d, bias=False)
        self.o_proj = nn.Linear(nh * d, H, bias=False)
        self.register_buffer("inv_freq", 1.0 / c.rope_theta ** (torch.arange(0, d, 2).float() / d), persistent=False)

    def rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Llama's rotary embedding (rotate-half layout) of x [B, n, T, d] at positions pos [T] or [B, T]."""
        ang = pos.to(self.inv_freq.device).float()[..., None] * self.inv_freq
        ang = torch.cat([ang, ang], -1)
        if ang.dim() == 3:
            ang = ang[:, None]
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        x1, x2 = x[..., : self.d // 2], x[..., self.d // 2 :]
        return x * cos + torch.cat([-x2, x1], -1) * sin

    def q(self, u: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """[B, T, 2H] -> queries [B, nh, T, d] at positions pos."""
        B, T, _ = u.shape
        return self.rope(self.q_proj(u).view(B, T, self.nh, self.d).transpose(1, 2), pos)

    def kv(self, u: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T, 2H] -> keys and values [B, nh, T, d] (key/value heads repeated for grouped queries)."""
        B, T, _ = u.shape
        k = self.k_proj(u).view(B, T, self.nkv, self.d).transpose(1, 2)
        v = self.v_proj(u).view(B, T, self.nkv, self.d).transpose(1, 2)
        rep = self.nh // self.nkv
        return self.rope(k, pos).repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)

    def qkv(self, u: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.q(u, pos), *self.kv(u, pos)

    def out(self, o: torch.Tensor) -> torch.Tensor:
        B, _, T, _ = o.shape
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.nh * self.d))


def document_blocks(segments: torch.Tensor | None, n: int) -> list[tuple[int, int]]:
    """[start, end) of each document among positions 0..n-1 of a packed row (segments [n]); one block if None."""
    if segments is None or n == 0:
        return [(0, n)]
    cuts = ((segments[1:] != segments[:-1]).nonzero().flatten() + 1).tolist()
    edges = [0, *cuts, n]
    return list(itertools.pairwise(edges))


def document_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, blocks: list[tuple[int, int]],
                       anchors: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of queries at anchors [n] (ascending positions; q [B, nh, n, d]) over the context keys of
    their own document (k, v [B, nh, n1, d], anchor s's key at s <= t): the output and the scores' logsumexp
    [B, nh, n], which lets a caller merge further keys into the same softmax."""
    at = anchors.tolist()
    outs, lses = [], []
    for a, b in blocks:
        lo, hi = bisect.bisect_left(at, a), bisect.bisect_left(at, b)
        if lo >= hi:
            continue
        end = at[hi - 1] + 1  # no query of this document reads a key past its last anchor
        s = (q[:, :, lo:hi] @ k[:, :, a:end].transpose(-1, -2)) * scale
        keys = torch.arange(a, end, device=q.device)
        s = s.masked_fill(keys[None, :] > anchors[lo:hi, None], float("-inf"))
        outs.append(torch.softmax(s, -1) @ v[:, :, a:end])
        lses.append(torch.logsumexp(s, -1))
    if not outs:
        return q.new_zeros(q.shape), q.new_zeros(q.shape[:-1])
    return torch.cat(outs, 2), torch.cat(lses, 2)


class MLP(nn.Module):
    def __init__(self, hidden: int, inner: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class MidLayer(nn.Module):
    def __init__(self, c: Any) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.hidden_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c.hidden_size, c.intermediate_size)

    def inputs(self, emb: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.input_layernorm(emb), self.hidden_norm(x)], -1)

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """The pre-norm output g from the step's input x and its attention output (before o_proj)."""
        r = x + self.self_attn.out(attn)
        return r + self.mlp(self.post_attention_layernorm(r))
