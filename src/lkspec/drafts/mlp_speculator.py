"""MLP-Speculator (Wertheimer et al. 2024), with the fms-extras / vLLM math exactly.

A recurrent chain of small MLP stages: stage k mixes the running state with the embedding of the
previous token and predicts the next one, so later heads condition on earlier drafted tokens (unlike
MEDUSA). Per stage (fms form, what we train):

    s = state_weight * proj_k(s) + emb_weight * sqrt(inner/2) * emb_k(token)
    s = GELU(LN_k(s));  logits_k = head_k(s)

with LN an RMS-style norm (no mean subtraction, eps 1e-6, weight and bias),
state_weight = 0.5 ** (0.5 / K) and emb_weight = sqrt(1 - state_weight**2). vLLM computes the same
thing divided by state_weight; the norm cancels the factor, so the same weights serve both.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import nn

from lkspec.cpu_paths import CpuLinear, small_rows_linear
from lkspec.data.source import Doc
from lkspec.drafts.base import Draft, DraftConfig, register
from lkspec.drafts.target_init import InitReport, NormalEquations, TargetBasis
from lkspec.errors import LkspecError
from lkspec.targets import TargetTensors

LN_EPS = 1e-6


class MLPSpeculatorConfig(DraftConfig):
    arch: str = "mlp_speculator"
    inner_dim: int = Field(0, ge=0, description="width of each stage; 0 means the target hidden size")
    tie_weights: bool = Field(False, description="share emb/head/ln across stages and proj[2:] with proj[1]")
    scale_input: bool = Field(False, description="RMS-normalise the target state and divide by sqrt(2) first")

    @property
    def inner(self) -> int:
        return self.inner_dim or self.hidden_size

    @model_validator(mode="after")
    def _tying_needs_two_heads(self) -> MLPSpeculatorConfig:
        if self.tie_weights and self.num_heads < 2:
            raise ValueError("tie_weights needs at least 2 heads; set num_heads >= 2 or tie_weights false")
        return self


class RMSNormAffine(nn.Module):
    """fms `LayerNormParameterized(use_mean=False)`: x * rsqrt(mean(x^2) + eps) * weight + bias."""

    def __init__(self, dim: int, affine: bool = True, eps: float = LN_EPS) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is not None:
            x = x * self.weight + self.bias
        return x


class MirroredHead(CpuLinear):
    """A stage's vocabulary projection (an nn.Linear: same tensors, same state dict) that does half the work while
    its weight has the form [A, -A].

    The target-initialised start writes every head that way (A = the target's lm_head rows times its norm scale:
    `init_from_target`), and W s = A (s_1 - s_2) for any state s = [s_1; s_2]. So while the weight keeps the form
    -- frozen (`draft.freeze`, the demo's), or not being trained (evaluation, generation) -- the head costs half
    the multiply-adds forward and backward: 1.7x faster at 2048 x 1152 -> 8192, the bulk of a training step, and
    half the bytes a proposal reads. Whether the form holds is checked once per write of the weight (its version
    counter); a weight being trained is always projected in full, since its gradient needs both halves.
    """

    _checked: tuple[int, int, bool] | None = None  # (data_ptr, version, mirrored) of the last weight checked

    def mirrored(self) -> bool:
        w = self.weight
        if self.bias is not None or w.shape[1] % 2 or type(w.data) is not torch.Tensor or w.device.type == "meta":
            return False
        if torch.is_grad_enabled() and w.requires_grad:
            return False
        key = (w.data_ptr(), w._version)
        if self._checked is None or self._checked[:2] != key:
            half = w.shape[1] // 2
            with torch.no_grad():
                self._checked = (*key, bool(torch.equal(w[:, :half], -w[:, half:])))
        return self._checked[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.mirrored():
            return super().forward(x)
        half = self.weight.shape[1] // 2
        return small_rows_linear(x[..., :half] - x[..., half:], self.weight[:, :half])


@register
class MLPSpeculator(Draft):
    arch = "mlp_speculator"
    config_cls = MLPSpeculatorConfig
    short = "mlp"
    title = "MLP-Speculator"
    default_eta = 3.0
    config: MLPSpeculatorConfig

    def __init__(self, config: MLPSpeculatorConfig) -> None:
        super().__init__(config)
        K, H, inner, V = config.num_heads, config.hidden_size, config.inner, config.vocab_size
        self.emb = nn.ModuleList(nn.Embedding(V, inner) for _ in range(K))
        self.proj = nn.ModuleList(nn.Linear(H if i == 0 else inner, inner, bias=False) for i in range(K))
        self.head = nn.ModuleList(MirroredHead(inner, config.head_rows, bias=False) for _ in range(K))
        self.ln = nn.ModuleList(RMSNormAffine(inner) for _ in range(K))
        self.ln0 = RMSNormAffine(H, affine=False) if config.scale_input else None
        self.state_weight = 0.5 ** (0.5 / K)
        self.emb_weight = math.sqrt(1 - self.state_weight**2)
        self.activation = nn.GELU()
        if config.tie_weights:
            for i in range(1, K):
                self.emb[i].weight = self.emb[0].weight
                self.head[i].weight = self.head[0].weight
                self.ln[i].weight = self.ln[0].weight
                self.ln[i].bias = self.ln[0].bias
                if i >= 2:
                    self.proj[i].weight = self.proj[1].weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """fms-extras init: truncated normal(0, 1/sqrt(inner)) for embeddings and linears; norms at identity."""
        std = 1 / math.sqrt(self.config.inner)
        for m in self.modules():
            if isinstance(m, nn.Embedding | nn.Linear):
                nn.init.trunc_normal_(m.weight, 0.0, std)
            elif isinstance(m, RMSNormAffine) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @classmethod
    def target_init_defaults(cls, hidden_size: int) -> dict[str, Any]:
        return {"inner_dim": 2 * hidden_size}  # the mirrored linear start (init_from_target)

    def vocab_parameters(self) -> list[nn.Parameter]:
        return list(dict.fromkeys([*(e.weight for e in self.emb), *(h.weight for h in self.head)]))

    @torch.no_grad()
    def init_from_target(self, tensors: TargetTensors, docs: Callable[[], Iterable[Doc]]) -> InitReport:
        """Start as an exactly linear one-step model of the target (needs inner_dim = 2 x hidden size).

        A stage is GELU(LN(u)), and GELU(x) - GELU(-x) = x exactly. So with a mirrored state u = [v; -v]
        (LN keeps the mirror: both halves share one RMS) every stage passes v / rms(v) on linearly, and
        heads [W g, -W g] turn it into the target's own logits. v is fitted by ridge regression: stage 1
        maps (h_t, e(y_{t+1})) to the target's next normalised state x_{t+1}; stages >= 2 map
        (x_{t+k-1}, e(y_{t+k})) to x_{t+k}, fitted on the target's states, with one token map Q shared by
        every stage (the embedding table is shared when weights are tied). Training then bends the
        linear start wherever a nonlinearity pays.
        """
        c, H = self.config, self.config.hidden_size
        if c.inner != 2 * H:
            raise LkspecError(f"a target-initialised mlp_speculator needs inner_dim = 2 x hidden size = {2 * H} "
                              f"(got {c.inner}); set draft.inner_dim={2 * H} or use draft.init=random")
        first = [d for _, d in zip(range(64), docs(), strict=False)]
        basis = TargetBasis.of(tensors, first)
        eq = NormalEquations(3 * H, H)  # rows [h_t, 0, e] (stage 1) and [0, x_t, e] (stages >= 2)
        for d in docs():
            if len(d) < 2:
                continue
            h = d.hidden.float()
            e = basis.embedding[d.input_ids[1:].long()]
            x_next = basis.state(h[1:])
            zeros = torch.zeros(len(d) - 1, H)
            eq.add(torch.cat([self._scaled_input(h[:-1]).float().cpu(), zeros, e], 1), x_next)
            eq.add(torch.cat([zeros, basis.state(h[:-1]), e], 1), x_next, weight=c.num_heads - 1)
        sol = eq.solve()
        P, M, Q = sol[:H].T, sol[H : 2 * H].T, sol[2 * H :].T
        emb_scale = self.emb_weight * math.sqrt(c.inner / 2)
        mirror = torch.cat([torch.cat([M, -M], 1), torch.cat([-M, M], 1)], 0)
        eq_emb = basis.embedding @ Q.T
        head = basis.head(self.token_map)
        for i in range(c.num_heads):
            first_proj = torch.cat([P, -P], 0) if i == 0 else mirror
            self.proj[i].weight.copy_(first_proj / self.state_weight)
            self.emb[i].weight.copy_(torch.cat([eq_emb, -eq_emb], 1) / emb_scale)
            self.head[i].weight.copy_(torch.cat([head, -head], 1))
            self.ln[i].weight.fill_(1.0)
            self.ln[i].bias.zero_()
        return InitReport({"chain": eq.rows}, "final norm" if tensors.norm_scale is not None else "scalar")

    def _scaled_input(self, hidden: torch.Tensor) -> torch.Tensor:
        hidden = self._as_param_dtype(hidden)
        if self.ln0 is not None:
            hidden = self.ln0(hidden) / math.sqrt(2)
        return hidden

    def step(self, i: int, state: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Stage i (0-based): new state from the previous state and the previous token."""
        z = self.emb[i](tokens) * (self.emb_weight * math.sqrt(self.config.inner / 2))
        state = self.proj[i](state) * self.state_weight + z
        return self.activation(self.ln[i](state))

    def head_states(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """Head k at anchor t consumes tokens t+1..t+k (teacher-forced) on top of h_t."""
        T = hidden.shape[1]
        if input_ids.shape[:2] != hidden.shape[:2]:
            raise LkspecError(f"hidden {tuple(hidden.shape)} and input_ids {tuple(input_ids.shape)} disagree on [B, T]")
        state = self._scaled_input(hidden)
        input_ids = input_ids.to(state.device).long()
        out = []
        for i in range(self.num_heads):
            k = i + 1
            n = max(T - k, 0)
            state = self.step(i, state[:, :n], input_ids[:, k : k + n])
            out.append(state)
        return out

    def head_weight(self, k: int) -> torch.Tensor:
        return self.head[k - 1].weight

    def head_logits(self, hidden: torch.Tensor, input_ids: torch.Tensor, *, first: int = 0) -> list[torch.Tensor]:
        # through the head modules, not `head_weight` (MirroredHead's shortcut)
        return [self.head[k](s) for k, s in enumerate(self.head_states(hidden[:, first:], input_ids[:, first:]))]

    def _propose_logits(self, hidden: torch.Tensor, last_token: torch.Tensor, num_tokens: int,
                        pick: Any) -> tuple[torch.Tensor, torch.Tensor]:
        state = self._scaled_input(hidden)
        token = last_token.to(state.device)
        tokens, probs = [], []
        for i in range(num_tokens):
            state = self.step(i, state, token)
            token, q = pick(self.head[i](state))
            tokens.append(token)
            probs.append(q)
        return torch.stack(tokens, 1), torch.stack(probs, 1)

    def vllm_config(self) -> dict[str, Any]:
        c = self.config
        return {
            "architectures": ["MLPSpeculatorPreTrainedModel"],
            "model_type": "mlp_speculator",
            "vocab_size": c.vocab_size,
            "emb_dim": c.hidden_size,
            "inner_dim": c.inner,
            "n_predict": c.num_heads,
            "top_k_tokens_per_head": [1] * c.num_heads,
            "n_candidates": 1,
            "tie_weights": c.tie_weights,
            "scale_input": c.scale_input,
        }
