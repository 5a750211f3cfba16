"""The lm_head alone: what training needs from a target, without building the model.

Teacher logits are recomputed from cached hidden states, so a trainer never runs the decoder; for a
large target, reading the vocabulary projection (one [V, H] tensor) straight from its safetensors instead
of loading the whole model saves almost all of the memory and load time. Which checkpoint tensor holds
the projection is found by building the architecture on the meta device, so no name list is kept here.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from lkspec.io import read_json
from lkspec.targets.model import Target, TargetIdentity, load_target, project_hidden, resolve_placement, tokenizer_hash
from lkspec.targets.resolve import EMBEDDED_NAME

log = logging.getLogger(__name__)

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

    name, source, dev, dt = resolve_placement(spec, device, dtype)
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
