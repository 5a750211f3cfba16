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

from lkspec.io import open_safetensors, read_json
from lkspec.targets.model import (
    Target,
    TargetIdentity,
    TargetTensors,
    final_norm,
    load_target,
    norm_scale,
    project_hidden,
    resolve_placement,
    tokenizer_hash,
)
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
    source: Path | str | None = None  # where the checkpoint is: init_tensors reads more of it on demand

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

    def logits_from_hidden(self, hidden: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return project_hidden(hidden, self.weight, self.bias, self.config, rows)

    def init_tensors(self) -> TargetTensors:
        """The input embedding and final-norm scale too, read from the checkpoint (only when a draft starts
        from the target): the embedding and norm modules are located on the meta device, like the lm_head."""
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(self.config)
        params = dict(meta.named_parameters(remove_duplicate=False))
        emb_names = [n for n, p in params.items() if p is meta.get_input_embeddings().weight]
        norm = final_norm(meta)
        norm_names = {n.rsplit(".", 1)[-1]: n for n, p in params.items()
                      if norm is not None and any(p is q for q in norm.parameters())}
        weight_map = _weight_map(self.source) if self.source is not None else {}
        embedding = _read(self.source, weight_map, emb_names, "cpu", torch.float32)
        scale = None
        if norm is not None and set(norm_names) == {"weight"}:
            w = _read(self.source, weight_map, [norm_names["weight"]], "cpu", torch.float32)
            if w is not None:
                norm = norm.to_empty(device="cpu").float()
                norm.weight.data.copy_(w)
                scale = norm_scale(norm, self.hidden_size)
        W = self.weight.detach().float().cpu()
        return TargetTensors(W, embedding if embedding is not None else W, scale)

    def to(self, device: str | torch.device) -> LMHead:
        self.weight = self.weight.to(device)
        self.bias = None if self.bias is None else self.bias.to(device)
        return self


DAMAGED_TARGET = "the target's weights are damaged; download or convert the target again"


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


def _weight_map(source: Path | str) -> dict[str, str]:
    """{tensor name: file} of a safetensors checkpoint (sharded or single)."""
    index = _checkpoint_file(source, "model.safetensors.index.json")
    if index is not None:
        return dict(read_json(index)["weight_map"])
    single = _checkpoint_file(source, "model.safetensors")
    if single is None:
        raise FileNotFoundError("no safetensors checkpoint")
    with open_safetensors(single, DAMAGED_TARGET) as f:
        return dict.fromkeys(f.keys(), "model.safetensors")


def _read(source: Path | str | None, weight_map: dict[str, str], names: list[str], device: Any,
          dtype: torch.dtype) -> torch.Tensor | None:
    """The first of `names` the checkpoint holds, or None."""
    for n in names:
        if source is not None and n in weight_map:
            path = _checkpoint_file(source, weight_map[n])
            if path is not None:
                with open_safetensors(path, DAMAGED_TARGET) as f:
                    return f.get_tensor(n).to(device=device, dtype=dtype)
    return None


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
    from transformers import AutoConfig, AutoTokenizer

    name, source, dev, dt = resolve_placement(spec, device, dtype)
    try:
        config = AutoConfig.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
        weight_names, bias_names = _lm_head_tensor_names(config)
        weight_map = _weight_map(source)
        weight = _read(source, weight_map, weight_names, dev, dt)
        if weight is None:
            raise KeyError(f"none of {weight_names} in the checkpoint")
        bias = _read(source, weight_map, bias_names, dev, dt) if bias_names else None
    except (OSError, KeyError, ValueError) as exc:
        log.info("loading the whole target for its lm_head (%s)", exc)
        return load_target(spec, device=dev, dtype=dt)
    return LMHead(name=name, weight=weight, bias=bias, config=config, tokenizer=tokenizer, source=source)
