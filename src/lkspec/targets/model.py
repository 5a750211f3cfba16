"""A loaded target and its identity: the handful of operations every later stage needs from the LLM.

Drafts learn the target's **post-norm** final hidden state (the vector the lm_head turns into next-token
logits) and logits recomputed from such states, through its tokenizer and chat template. The identity
record travels with every artefact made from a target, so that features, drafts and evaluation results
made for one target are never silently used with another.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from lkspec.cpu_paths import cpu_linear, use_cpu_paths
from lkspec.errors import LkspecError
from lkspec.targets.resolve import EMBEDDED_NAME, resolve_target


class TargetIdentity(BaseModel):
    """What later stages record and compare: drafts and features are only valid for this target."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    vocab_size: int
    hidden_size: int
    tokenizer_hash: str

    def check(self, other: TargetIdentity | dict[str, Any], what: str) -> None:
        """Raise a one-line error if `other` (the identity stored with `what`) is not this target."""
        other = other if isinstance(other, TargetIdentity) else TargetIdentity.model_validate(other)
        diffs = [
            f"{field} {getattr(other, field)!r} != {getattr(self, field)!r}"
            for field in ("vocab_size", "hidden_size", "tokenizer_hash")
            if getattr(other, field) != getattr(self, field)
        ]
        if diffs:
            raise LkspecError(
                f"{what} was made for target {other.name!r}, not {self.name!r} ({'; '.join(diffs)}); "
                f"rebuild it with --target {self.name} or pass the target it was made for"
            )


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU (bf16 matmuls are ~6x slower there), bf16 on accelerators."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def tokenizer_hash(tok: Any) -> str:
    """sha256 over the vocabulary, the special tokens and the chat template."""
    payload = {
        "vocab": sorted(tok.get_vocab().items(), key=lambda kv: kv[1]),
        "special": {k: str(v) for k, v in sorted(tok.special_tokens_map.items())},
        "chat_template": tok.chat_template or "",
    }
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


def project_hidden(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cfg: Any,
                   rows: torch.Tensor | None = None) -> torch.Tensor:
    """lm_head(hidden) in fp32, plus the output transforms some families apply after it (Granite's
    logits_scaling, Cohere's logit_scale, Gemma's final softcapping), so the result equals the model's."""
    if rows is not None:  # every transform below is elementwise, so a subset of rows projects the same
        rows = rows.to(weight.device)
        weight, bias = weight[rows], None if bias is None else bias[rows]
    logits = cpu_linear(hidden.to(weight.dtype), weight, bias).float()
    if getattr(cfg, "logits_scaling", None):
        logits = logits / cfg.logits_scaling
    if getattr(cfg, "logit_scale", None) and cfg.model_type.startswith("cohere"):
        logits = logits * cfg.logit_scale
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@dataclass
class TargetTensors:
    """What a target-initialised draft starts from: the target's own token tables and final-norm scale.

    `norm_scale` is g in h = g * x / rms(x) for RMS-style final norms (probed, so variants such as Gemma's
    1 + w come out right); None for norms with a bias or centring, where only a scalar scale applies.
    """

    lm_head: torch.Tensor  # [V, H]
    embedding: torch.Tensor  # [V, H] input embedding
    norm_scale: torch.Tensor | None  # [H]


def final_norm(model: Any) -> torch.nn.Module | None:
    """The decoder's final norm (the module that makes hidden states post-norm), when it has a usual name."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    for name in ("norm", "final_layernorm", "ln_f", "final_norm"):
        module = getattr(decoder, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


def cached_decoder(model: Any) -> Callable[..., Any]:
    """The decoder called with a KV cache under the keyword this transformers takes: `cache` (5.x, where
    `past_key_values` still works but warns) or `past_key_values` (4.x)."""
    decoder = model.get_decoder()
    key = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"

    def call(*, cache: Any, **kw: Any) -> Any:
        return decoder(**kw, **{key: cache})

    return call


def check_aux_layers(layers: Sequence[int], config: Any) -> None:
    """A one-line error for layer indices the target does not have (0 is the embedding output, L the last layer's)."""
    L = int(getattr(config, "num_hidden_layers", 0) or 0)
    bad = [i for i in layers if not 0 <= i <= L]
    if L and bad:
        raise LkspecError(f"aux layers {bad} are outside the target's 0..{L} (its hidden_states indices); "
                          f"choose layers in that range, e.g. {[2, L // 2, L - 3]}")


def select_features(out: Any, aux_layers: Sequence[int]) -> torch.Tensor:
    """A draft's input from a decoder output: the post-norm final state, or (with `aux_layers`, from a pass with
    output_hidden_states) the input states of those layers concatenated, as vLLM captures them for EAGLE-3."""
    if not aux_layers:
        return out.last_hidden_state
    return torch.cat([out.hidden_states[i] for i in aux_layers], -1)


def crop_cache(cache: object, keep: int) -> None:
    """Roll the KV cache back to its first `keep` positions.

    A negative argument means "remove this many" in every transformers version (older ones also read a
    positive one as the final length; 5.x refuses it).
    """
    remove = cache.get_seq_length() - keep  # type: ignore[attr-defined]
    if remove > 0:
        cache.crop(-remove)  # type: ignore[attr-defined]


@torch.no_grad()
def norm_scale(norm: torch.nn.Module | None, hidden: int) -> torch.Tensor | None:
    """g of an RMS-style norm, read off its output on the all-ones vector (rms 1); None when it is not one."""
    if norm is None or getattr(norm, "bias", None) is not None:
        return None
    p = next(norm.parameters(), None)
    ones = torch.ones(1, hidden, device=p.device if p is not None else "cpu", dtype=p.dtype if p is not None else
                      torch.float32)
    g = norm(ones).float()[0].cpu()
    return g if g.shape == (hidden,) and bool(torch.isfinite(g).all()) else None


@dataclass
class Target:
    """A loaded, frozen target with the handful of operations the pipeline needs."""

    name: str
    model: Any  # transformers PreTrainedModel (causal LM)
    tokenizer: Any

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def hidden_size(self) -> int:
        return int(self.lm_head.weight.shape[1])

    @property
    def vocab_size(self) -> int:
        return int(self.lm_head.weight.shape[0])

    @property
    def lm_head(self) -> torch.nn.Linear:
        return self.model.get_output_embeddings()

    def init_tensors(self) -> TargetTensors:
        return TargetTensors(self.lm_head.weight.detach().float().cpu(),
                             self.model.get_input_embeddings().weight.detach().float().cpu(),
                             norm_scale(final_norm(self.model), self.hidden_size))

    @cached_property
    def eos_token_ids(self) -> list[int]:
        """Every id that ends a response: the tokenizer's EOS plus the generation config's list."""
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.model.config, self.tokenizer):
            value = getattr(source, "eos_token_id", None) if source is not None else None
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list | tuple):
                ids.update(int(v) for v in value)
        if not ids:
            raise LkspecError(f"target {self.name!r} defines no EOS token; set eos_token_id in its config")
        return sorted(ids)

    @cached_property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad) if pad is not None else self.eos_token_ids[0]

    @cached_property
    def tokenizer_hash(self) -> str:
        return tokenizer_hash(self.tokenizer)

    @property
    def identity(self) -> TargetIdentity:
        return TargetIdentity(
            name=self.name,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            tokenizer_hash=self.tokenizer_hash,
        )

    def render_chat(self, messages: list[dict[str, str]], *, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of `messages` through the target's chat template (no extra BOS added)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise LkspecError(
                f"target {self.name!r} has no chat template; use an instruction-tuned model or set one"
            )
        text = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Post-norm final hidden states [B, T, H]: exactly what the lm_head consumes.

        The decoder's `last_hidden_state` already has the final norm applied in every HF causal LM, and
        calling the decoder alone skips the vocabulary projection (a fifth of SmolLM2's cost).
        """
        input_ids = input_ids.to(self.device)
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        out = self.model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state

    @torch.no_grad()
    def states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
               aux_layers: Sequence[int] = ()) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(post-norm final states [B, T, H], the input states of `aux_layers` concatenated [B, T, A*H] or None):
        what a draft that fuses several layers (EAGLE-3) reads beside what the teacher's lm_head reads."""
        if not aux_layers:
            return self.hidden_states(input_ids, attention_mask), None
        check_aux_layers(aux_layers, self.config)
        mask = None if attention_mask is None else attention_mask.to(self.device)
        out = self.model.get_decoder()(input_ids=input_ids.to(self.device), attention_mask=mask, use_cache=False,
                                       output_hidden_states=True)
        return out.last_hidden_state, select_features(out, aux_layers)

    def logits_from_hidden(self, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Target logits from cached hidden states through the frozen lm_head, in fp32 (only the vocabulary
        `rows` when given: a truncated draft's teacher).

        Applies the output transforms some families put after the lm_head (Granite's logits_scaling,
        Cohere's logit_scale, Gemma's final softcapping) so the result equals the model's own logits.
        """
        return project_hidden(hidden, self.lm_head.weight, getattr(self.lm_head, "bias", None), self.model.config,
                              rows)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The model's own forward logits (fp32), for checks against `logits_from_hidden`."""
        out = self.model(input_ids=input_ids.to(self.device),
                         attention_mask=None if attention_mask is None else attention_mask.to(self.device),
                         use_cache=False)
        return out.logits.float()


def resolve_placement(spec: str | os.PathLike[str], device: str | torch.device | None,
                      dtype: torch.dtype | str | None) -> tuple[str, Path | str, torch.device, torch.dtype]:
    """(name, source, device, dtype): fp32 on CPU, bf16 on GPU unless given."""
    name, source = resolve_target(spec)
    dev = torch.device(device) if device is not None else default_device()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return name, source, dev, dtype or default_dtype(dev)


def load_target(
    spec: str | os.PathLike[str] = EMBEDDED_NAME,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> Target:
    """Load a frozen target in eval mode. fp32 on CPU, bf16 on GPU unless `dtype` says otherwise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name, source, dev, dt = resolve_placement(spec, device, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dt)
    except OSError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LkspecError(
            f"could not load target {name!r} ({first}); check the id or path, or download it first "
            f"when this machine has no hub access"
        ) from exc
    model.to(dev).eval().requires_grad_(False)
    use_cpu_paths(model)  # a round's few-token passes on CPU (lkspec.cpu_paths); a no-op on other devices
    return Target(name=name, model=model, tokenizer=tokenizer)
