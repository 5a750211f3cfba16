"""vLLM 0.32's names for draft checkpoints: architectures, config-key renaming, tensor-key remapping, tying.

These are the rules a *reader* needs to take an outside checkpoint the way vLLM takes it, so they sit
beside the drafts, below both the checkpoint reader (`lkspec.drafts.checkpoint`) and the export-side
transcription of vLLM's loaders (`lkspec.export.vllm_rules`), which must agree with each other: a name
mapped one way on import and another way on export would make a round trip lie. Sources are those
listed in `lkspec.export.vllm_rules` (0.32.0 wheel).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MLP_ARCH = "MLPSpeculatorPreTrainedModel"
ARCTIC_MLP_ARCH = "ArcticMLPSpeculatorPreTrainedModel"
MEDUSA_ARCH = "MedusaModel"
EAGLE3_ARCH = "LlamaForCausalLMEagle3"  # the authors' native layout (vLLM's Eagle3LlamaForCausalLM)
SPECULATORS_ARCH = "Eagle3Speculator"  # vllm-project/speculators' layout of the same draft


def is_eagle3(cfg: Mapping[str, Any]) -> bool:
    archs = cfg.get("architectures") or []
    archs = [archs] if isinstance(archs, str) else archs
    return cfg.get("speculators_model_type") == "eagle3" or bool({SPECULATORS_ARCH, EAGLE3_ARCH} & set(archs))


def eagle3_view(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """An EAGLE-3 config as vLLM's Eagle3LlamaForCausalLM sees it: the speculators format's
    transformer_layer_config with the Eagle3 keys on top (vLLM's converter), or a native config as is."""
    view = {**cfg.get("transformer_layer_config", {}), **cfg} if SPECULATORS_ARCH in (cfg.get("architectures") or []) \
        else dict(cfg)
    ids = view.get("eagle_aux_hidden_state_layer_ids") or (view.get("eagle_config") or {}).get(
        "eagle_aux_hidden_state_layer_ids")
    view["aux_layer_ids"] = list(ids or [])
    return view




def medusa_renamed_keys(cfg: Mapping[str, Any]) -> dict[str, list[str]]:
    """`MedusaConfig.from_pretrained`'s renaming: {new key: [config keys that land on it, in order]}."""
    hits: dict[str, list[str]] = {"num_heads": [], "num_hidden_layers": []}
    for k in cfg:
        if "num" in k:
            if "heads" in k:
                hits["num_heads"].append(k)
            elif "layers" in k:
                hits["num_hidden_layers"].append(k)
    return hits


def remap_medusa_key(name: str) -> str:
    """vLLM 0.32 `Medusa._remap_old_checkpoint_key`: FasterDecoding's `{h}.{l}.linear.*` / `{h}.{L}.weight`."""
    parts = name.split(".")
    if len(parts) >= 3 and parts[0].isdigit() and parts[1].isdigit():
        head, layer, rest = parts[0], parts[1], parts[2:]
        if "linear" in rest:
            return f"blocks.{head}.layers.{layer}.{'.'.join(rest[rest.index('linear') + 1:])}"
        return f"lm_heads.{head}.{'.'.join(rest)}"
    return name


def tied_source(name: str) -> str | None:
    """For a tied MLP-Speculator: the stage-0/1 tensor a later stage's tensor must equal (fms tying)."""
    parts = name.split(".")
    if len(parts) != 3 or not parts[1].isdigit():
        return None
    kind, i = parts[0], int(parts[1])
    if kind in ("emb", "head", "ln") and i > 0:
        return f"{kind}.0.{parts[2]}"
    if kind == "proj" and i > 1:
        return f"proj.1.{parts[2]}"
    return None
