"""MEDUSA heads (Cai et al. 2024) in vLLM's layout.

Every head reads the same target state h_t and nothing else: `num_layers` residual blocks
x <- x + SiLU(W x (+ b)), then the head's own vocabulary projection. Head k predicts token t+k+1.
Heads cannot see the tokens drafted before them, which is why MEDUSA's acceptance falls faster with
k than the MLP-Speculator's, and why the paper uses a larger eta (10) for it.

Init: block weights zero (each block starts as the identity, as in FasterDecoding/Medusa), block
biases zero, lm_heads random (nn.Linear default) — the paper trains from random init, not from a copy
of the target's lm_head.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from pydantic import Field
from torch import nn

from lkspec.data.source import Doc
from lkspec.drafts.base import Draft, DraftConfig, register
from lkspec.drafts.target_init import InitReport, NormalEquations, TargetBasis
from lkspec.targets import TargetTensors


class MedusaConfig(DraftConfig):
    arch: str = "medusa"
    num_layers: int = Field(1, ge=1, description="residual blocks per head")
    bias: bool = Field(False, description="biases in the residual blocks (exported as medusa_fc_bias)")


class ResBlock(nn.Module):
    """x + SiLU(W x + b); parameters named as vLLM's `blocks.{h}.layers.{l}.weight/bias`."""

    def __init__(self, hidden: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden, hidden))
        self.bias = nn.Parameter(torch.zeros(hidden)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + nn.functional.silu(nn.functional.linear(x, self.weight, self.bias))


class MedusaHead(nn.Module):
    def __init__(self, hidden: int, num_layers: int, bias: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(ResBlock(hidden, bias) for _ in range(num_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


@register
class Medusa(Draft):
    arch = "medusa"
    config_cls = MedusaConfig
    short = "medusa"
    title = "MEDUSA"
    default_eta = 10.0
    config: MedusaConfig

    def __init__(self, config: MedusaConfig) -> None:
        super().__init__(config)
        H = config.hidden_size
        self.blocks = nn.ModuleList(MedusaHead(H, config.num_layers, config.bias) for _ in range(config.num_heads))
        self.lm_heads = nn.ModuleList(nn.Linear(H, config.head_rows, bias=False) for _ in range(config.num_heads))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for block in self.blocks:
            for layer in block.layers:
                nn.init.zeros_(layer.weight)
                if layer.bias is not None:
                    nn.init.zeros_(layer.bias)
        for head in self.lm_heads:
            head.reset_parameters()

    def vocab_parameters(self) -> list[nn.Parameter]:
        return [h.weight for h in self.lm_heads]

    @torch.no_grad()
    def init_from_target(self, tensors: TargetTensors, docs: Callable[[], Iterable[Doc]]) -> InitReport:
        """Medusa-1's start (blocks at identity, every head from the target's lm_head), with each head's
        lm_head composed with a ridge map from h_t to the target's state k tokens ahead, so head k starts
        as a linear predictor of token t+k+1 rather than a copy of the target's prediction of t+1."""
        K, H = self.config.num_heads, self.config.hidden_size
        first = [d for _, d in zip(range(64), docs(), strict=False)]
        basis = TargetBasis.of(tensors, first)
        eqs = [NormalEquations(H, H) for _ in range(K)]
        for d in docs():
            h = self._as_param_dtype(d.hidden).float().cpu()
            for k, eq in enumerate(eqs, 1):
                if len(d) > k:
                    eq.add(h[:-k], basis.state(h[k:]))
        head = basis.head(self.token_map)
        for block in self.blocks:
            for layer in block.layers:
                layer.weight.zero_()
                if layer.bias is not None:
                    layer.bias.zero_()
        for lm_head, eq in zip(self.lm_heads, eqs, strict=True):
            lm_head.weight.copy_(head @ eq.solve().T)
        return InitReport({f"head{k}": eq.rows for k, eq in enumerate(eqs, 1)},
                          "final norm" if tensors.norm_scale is not None else "scalar")

    def head_states(self, hidden: torch.Tensor, input_ids: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Head k at anchor t reads h_t only; anchors run to T-k-1 so shapes match the MLP's."""
        hidden = self._as_param_dtype(hidden)
        T = hidden.shape[1]
        return [block(hidden[:, : max(T - k, 0)]) for k, block in enumerate(self.blocks, 1)]

    def head_weight(self, k: int) -> torch.Tensor:
        return self.lm_heads[k - 1].weight

    def _propose_logits(self, hidden: torch.Tensor, last_token: torch.Tensor, num_tokens: int,
                        pick: Any) -> tuple[torch.Tensor, torch.Tensor]:
        tokens, probs = [], []
        for i in range(num_tokens):
            token, q = pick(self.lm_heads[i](self.blocks[i](hidden)))
            tokens.append(token)
            probs.append(q)
        return torch.stack(tokens, 1), torch.stack(probs, 1)

    def vllm_config(self) -> dict[str, Any]:
        c = self.config
        return {
            "architectures": ["MedusaModel"],
            "model_type": "medusa",
            "hidden_size": c.hidden_size,
            "vocab_size": c.vocab_size,
            "num_heads": c.num_heads,
            "num_hidden_layers": c.num_layers,
            "medusa_fc_bias": c.bias,
            "truncated_vocab_size": c.draft_vocab_size if c.truncated else None,
        }
