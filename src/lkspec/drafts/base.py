"""What every draft architecture shares: the alignment contract, `propose`, save/load, the registry.

Alignment (DESIGN §1). `h_t` is the target's post-norm hidden state at position t (it produces the
distribution of token t+1). Head k (1-based) at anchor t predicts token t+k+1, and its target
distribution is the target's own next-token distribution at position t+k, softmax(lm_head(h_{t+k})).
A teacher-forced `forward(hidden [B,T,H], input_ids [B,T])` therefore returns, for head k, logits of
shape [B, T-k, V] for anchors t = 0..T-k-1; `target_logits[:, k:]` lines up with it row for row.

A checkpoint directory is what vLLM loads (config.json + model.safetensors in its own names), plus an
`lkspec` block in config.json with the full draft config and the target identity. Saving writes every
stage's tensors, also when weights are tied (vLLM 0.32 keeps a separate `head.i` per stage). Reading,
in that layout and every outside one, is `lkspec.drafts.checkpoint` (`load_draft`), which builds on this
module; this one imports nothing from the rest of `lkspec.drafts` or from any stage above it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from pydantic import Field

from lkspec import __version__
from lkspec.config import StrictModel, parse
from lkspec.errors import LkspecError
from lkspec.io import save_tensors, write_json
from lkspec.sampling import sample, warp_probs
from lkspec.targets import TargetIdentity

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class DraftConfig(StrictModel):
    """Fields every architecture has. Unknown keys are errors, so a typo never becomes a default."""

    arch: str
    hidden_size: int = Field(gt=0, description="target hidden size (input width)")
    vocab_size: int = Field(gt=0, description="target vocabulary size (rows of every head)")
    num_heads: int = Field(6, ge=1, description="K: tokens drafted per round (the paper uses 6)")


@dataclass
class Proposal:
    """K drafted tokens per row and the distributions they were drawn from (after warping)."""

    tokens: torch.Tensor  # [B, K] int64
    probs: torch.Tensor  # [B, K, V] fp32


class Draft(torch.nn.Module, ABC):
    """Base class. Subclasses set `arch`/`config_cls` and implement the per-architecture math."""

    arch: ClassVar[str]
    config_cls: ClassVar[type[DraftConfig]]

    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        self.config = config

    @property
    def num_heads(self) -> int:
        return self.config.num_heads

    def num_parameters(self) -> int:
        """Distinct trainable parameters (tied weights counted once)."""
        seen: set[int] = set()
        total = 0
        for p in self.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total

    @abstractmethod
    def head_states(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """Teacher-forced features for each head k: [B, T-k, D_k], before its vocabulary projection."""

    @abstractmethod
    def head_weight(self, k: int) -> torch.Tensor:
        """The vocabulary projection [V, D] of head k (1-based); logits = states @ weight.T."""

    def forward(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """Per-head logits, head k (1-based) -> [B, T-k, V]; see the module docstring for alignment."""
        return [s @ self.head_weight(k).T for k, s in enumerate(self.head_states(hidden, input_ids), 1)]

    @abstractmethod
    def _propose_logits(self, hidden: torch.Tensor, last_token: torch.Tensor, num_tokens: int,
                        pick: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Draft `num_tokens` tokens; `pick(logits)->(tokens, probs)` chooses each one."""

    @torch.no_grad()
    def propose(
        self,
        hidden: torch.Tensor,
        last_token: torch.Tensor,
        *,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        num_tokens: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Proposal:
        """Draft K tokens from the target's last hidden state [B, H] and the token it emitted [B].

        At T > 0 each token is sampled from q (warped like the target's p); at T = 0 it is the argmax and
        q is one-hot.
        """
        k = self.num_heads if num_tokens is None else num_tokens
        if not 1 <= k <= self.num_heads:
            raise LkspecError(f"cannot draft {k} tokens with a {self.num_heads}-head draft; use K <= {self.num_heads}")

        def pick(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            probs = warp_probs(logits, temperature, top_k, top_p)
            tokens = probs.argmax(-1) if temperature == 0 else sample(probs, generator)
            return tokens, probs

        tokens, probs = self._propose_logits(self._as_param_dtype(hidden), last_token.long(), k, pick)
        return Proposal(tokens=tokens, probs=probs)

    def _as_param_dtype(self, x: torch.Tensor) -> torch.Tensor:
        p = next(self.parameters())
        return x.to(device=p.device, dtype=p.dtype)

    # ----- the vLLM layout -------------------------------------------------------------------
    @abstractmethod
    def vllm_config(self) -> dict[str, Any]:
        """config.json keys in the layout vLLM's loader for this architecture reads."""

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """Every stage's tensors under vLLM's names (tied weights appear once per stage)."""
        return dict(self.state_dict(keep_vars=False))

    # ----- checkpoints -----------------------------------------------------------------------
    def save(self, path: str | Path, *, target: TargetIdentity | None = None,
             extra: dict[str, Any] | None = None, dtype: torch.dtype | None = None) -> Path:
        """Write config.json + model.safetensors (atomically, each file) into `path`."""
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        tensors = {k: (v.to(dtype) if dtype is not None else v).cpu() for k, v in self.export_state_dict().items()}
        for name, t in tensors.items():
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise LkspecError(f"draft tensor {name} has non-finite values; refusing to save a broken draft")
        save_tensors(out / WEIGHTS_FILE, tensors, metadata={"format": "pt"})
        cfg = self.vllm_config()
        cfg["torch_dtype"] = str(dtype or next(self.parameters()).dtype).removeprefix("torch.")
        cfg["lkspec"] = {
            "version": __version__,
            "arch": self.arch,
            "config": self.config.model_dump(),
            "target": target.model_dump() if target is not None else None,
            **(extra or {}),
        }
        write_json(out / CONFIG_FILE, cfg)
        return out


DRAFTS: dict[str, type[Draft]] = {}


def register(cls: type[Draft]) -> type[Draft]:
    """Class decorator: make an architecture available by its `arch` name."""
    DRAFTS[cls.arch] = cls
    return cls


def draft_class(arch: str) -> type[Draft]:
    try:
        return DRAFTS[arch]
    except KeyError:
        raise LkspecError(f"unknown draft architecture {arch!r}; choose one of {sorted(DRAFTS)}") from None


def build_draft(arch: str, *, seed: int | None = None, **config: Any) -> Draft:
    """A randomly initialised draft of architecture `arch` (seeded, for reproducible runs)."""
    cls = draft_class(arch)
    cfg = parse(cls.config_cls, {"arch": arch, **config}, f"{arch} draft config")
    if seed is None:
        return cls(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return cls(cfg)


def check_draft_target(config: DraftConfig, identity: TargetIdentity, what: str = "the draft") -> None:
    """A one-line error when a draft's shapes cannot work with this target."""
    if config.vocab_size != identity.vocab_size or config.hidden_size != identity.hidden_size:
        raise LkspecError(
            f"{what} has vocab {config.vocab_size} / hidden {config.hidden_size} but target {identity.name!r} "
            f"has vocab {identity.vocab_size} / hidden {identity.hidden_size}; use a draft trained for this target"
        )
