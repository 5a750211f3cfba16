"""How outside checkpoint layouts map onto lkspec's drafts: one plan per architecture family.

`read_checkpoint` (in `lkspec.drafts.checkpoint`) reads lkspec's own directories directly; every other
layout (vLLM-native, IBM fms, FasterDecoding MEDUSA, the native and speculators EAGLE-3 layouts) is turned
into a `_Plan` here: the lkspec config it describes and where each lkspec tensor comes from (file and key,
a scale, a tied alias, or an offset index such as EAGLE-3's d2t). Only names and shapes are looked at.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lkspec.drafts.base import CONFIG_FILE
from lkspec.drafts.vllm_names import (
    ARCTIC_MLP_ARCH,
    MEDUSA_ARCH,
    MLP_ARCH,
    eagle3_view,
    is_eagle3,
    medusa_renamed_keys,
    remap_medusa_key,
    tied_source,
)
from lkspec.errors import LkspecError

log = logging.getLogger(__name__)


def short_list(names: list[str], n: int = 8) -> str:
    """The first n names and how many there are in all, for one-line errors."""
    return "[" + ", ".join(names[:n]) + (f", … ({len(names)} in all)" if len(names) > n else "") + "]"


def arch_of(raw: dict[str, Any], d: Path) -> str:
    model_type = raw.get("model_type")
    archs = raw.get("architectures") or []
    archs = [archs] if isinstance(archs, str) else list(archs)
    if is_eagle3(raw):
        return "eagle3"
    if model_type == "mlp_speculator" or {MLP_ARCH, ARCTIC_MLP_ARCH} & set(archs):
        return "mlp_speculator"
    if model_type == "medusa" or MEDUSA_ARCH in archs or any("medusa" in k for k in raw):
        return "medusa"
    raise LkspecError(
        f"{d}/{CONFIG_FILE} is not a draft lkspec can read (model_type {model_type!r}, architectures {archs}); "
        f"expected an MLP-Speculator, MEDUSA or EAGLE-3 checkpoint (lkspec, vLLM, speculators, IBM fms or "
        f"FasterDecoding layout)"
    )


def _need(raw: dict[str, Any], key: str, d: Path) -> Any:
    if key not in raw:
        raise LkspecError(f"{d}/{CONFIG_FILE} lacks {key!r}; add it (see docs/export.md for the layout)")
    return raw[key]


@dataclass
class Plan:
    """How to build each lkspec tensor: from which file/key, times which scale (or as a tied alias)."""

    arch: str
    config: dict[str, Any]
    sources: dict[str, tuple[Path, str]]  # lkspec name -> (file, original key)
    aliases: dict[str, str] = field(default_factory=dict)  # lkspec name -> lkspec name it copies
    scale: dict[str, float] = field(default_factory=dict)
    offset: dict[str, bool] = field(default_factory=dict)  # lkspec name -> read as arange(n) + the tensor (d2t)
    skip: set[str] = field(default_factory=set)  # original keys that carry nothing lkspec keeps (t2d)
    from_target: set[str] = field(default_factory=set)  # lkspec names the layout may leave to the target
    unknown: list[str] = field(default_factory=list)  # original keys with no place
    layout: str = "vllm"
    notes: list[str] = field(default_factory=list)


def plan_mlp(raw: dict[str, Any], scan: dict[str, tuple[Path, tuple[int, ...]]], d: Path) -> Plan:
    sources = {k.replace("speculator.", ""): (f, k) for k, (f, _) in scan.items()}
    layout = "fms" if any(k.startswith("speculator.") for k in scan) else "vllm"
    K = int(_need(raw, "n_predict", d))
    cfg = {
        "arch": "mlp_speculator",
        "hidden_size": int(_need(raw, "emb_dim", d)),
        "vocab_size": int(_need(raw, "vocab_size", d)),
        "num_heads": K,
        "inner_dim": int(raw.get("inner_dim") or 0),
        "tie_weights": bool(raw.get("tie_weights", False)),
        "scale_input": bool(raw.get("scale_input", False)),
    }
    plan = Plan("mlp_speculator", cfg, sources, layout=layout)
    if cfg["tie_weights"]:
        # fms ties emb/head/ln across stages and proj[2:] to proj[1]; tied files may store those once
        expanded = []
        for i in range(1, K):
            for name in (f"emb.{i}.weight", f"head.{i}.weight", f"ln.{i}.weight", f"ln.{i}.bias", f"proj.{i}.weight"):
                src = tied_source(name)
                if src is not None and name not in sources and src in sources:
                    plan.aliases[name] = src
                    expanded.append(name)
        if expanded:
            plan.notes.append(f"tied checkpoint: expanded {len(expanded)} shared tensors to every stage")
    return plan


def plan_medusa(raw: dict[str, Any], scan: dict[str, tuple[Path, tuple[int, ...]]], d: Path) -> Plan:
    view = dict(raw)
    for new, olds in medusa_renamed_keys(raw).items():
        values = {repr(raw[k]) for k in olds}
        if len(values) > 1:
            raise LkspecError(
                f"{d}/{CONFIG_FILE} has {olds} with different values; vLLM's MedusaConfig renames all of them to "
                f"{new} (the last one wins), so remove the ones that are not the Medusa {new}"
            )
        for k in olds:
            view[new] = view.pop(k)
    if (view.get("truncated_vocab_size") not in (None, view.get("vocab_size"))) or any(
        k.endswith("token_map") for k in scan
    ):
        raise LkspecError(f"{d} uses a truncated draft vocabulary (token_map); lkspec drafts predict the full "
                          f"target vocabulary, so retrain or drop the token map")
    original_lm_head = bool(view.get("original_lm_head", False))
    sources: dict[str, tuple[Path, str]] = {}
    fasterdecoding = False
    lm_layer: dict[str, int] = {}
    for k, (f, _) in scan.items():
        name = k.replace("medusa_heads.", "")
        parts = name.split(".")
        if len(parts) >= 3 and parts[0].isdigit() and parts[1].isdigit():
            fasterdecoding = True
            if "linear" not in parts[2:]:
                lm_layer[k] = int(parts[1])
        name = remap_medusa_key(name)
        if original_lm_head and name in ("lm_head.weight", "lm_heads.0.weight"):
            name = "lm_head.weight"
        if name in sources:
            raise LkspecError(f"{d}: tensors {sources[name][1]!r} and {k!r} both map to {name}; keep one")
        sources[name] = (f, k)
    heads = {int(n.split(".")[1]) for n in sources if n.startswith(("blocks.", "lm_heads.")) and
             n.split(".")[1].isdigit()}
    n_heads = max(heads) + 1 if heads else int(view.get("num_heads", 0))
    if "num_heads" in view and int(view["num_heads"]) != n_heads:
        log.warning("%s: config says %s heads but the weights hold %d; using the weights' %d "
                    "(FasterDecoding configs are known to misstate it)", d, view["num_heads"], n_heads, n_heads)
    layers = int(view.get("num_hidden_layers", 1))
    bad_lm = sorted(k for k, layer in lm_layer.items() if layer != layers)
    if bad_lm:
        raise LkspecError(f"{d}: FasterDecoding lm-head keys {short_list(bad_lm)} do not sit at index "
                          f"num_layers={layers}; fix medusa_num_layers in config.json")
    has_bias = any(n.startswith("blocks.") and n.endswith(".bias") for n in sources)
    notes = []
    if "medusa_fc_bias" in raw:
        bias = bool(raw["medusa_fc_bias"])
    else:
        bias = has_bias
        if has_bias:
            notes.append("blocks have biases but config.json has no medusa_fc_bias (vLLM would drop them); "
                         "kept them; re-export with lkspec to serve them")
    hidden = view.get("hidden_size")
    vocab = view.get("vocab_size")
    w0 = next((scan[src[1]][1] for n, src in sources.items() if n.startswith("blocks.") and n.endswith("weight")),
              None)
    h0 = next((scan[src[1]][1] for n, src in sources.items() if n.startswith(("lm_heads.", "lm_head."))), None)
    if hidden is None:
        hidden = w0[1] if w0 else (h0[1] if h0 else None)
    if vocab is None and h0 is not None:
        vocab = h0[0]
    if hidden is None or vocab is None:
        raise LkspecError(f"{d}: cannot tell hidden_size / vocab_size (no config keys, no head tensors)")
    cfg = {"arch": "medusa", "hidden_size": int(hidden), "vocab_size": int(vocab), "num_heads": n_heads,
           "num_layers": layers, "bias": bias}
    plan = Plan("medusa", cfg, sources, layout="fasterdecoding" if fasterdecoding else "vllm", notes=notes)
    if original_lm_head and "lm_head.weight" in sources:
        for h in range(n_heads):
            plan.aliases[f"lm_heads.{h}.weight"] = "lm_head.weight"
        plan.notes.append("original_lm_head: one shared lm_head expanded to every head")
    scale = float(view.get("logit_scale", 1.0) or 1.0)
    if scale != 1.0:
        plan.scale = {f"lm_heads.{h}.weight": scale for h in range(n_heads)}
        plan.notes.append(f"logit_scale {scale} folded into the lm_heads")
    return plan


def plan_eagle3(raw: dict[str, Any], scan: dict[str, tuple[Path, tuple[int, ...]]], d: Path) -> Plan:
    """Native (`LlamaForCausalLMEagle3`, `midlayer.*`) and speculators (`Eagle3Speculator`, `layers.0.*`) layouts;
    d2t (target id = draft id + d2t) becomes the token map, t2d is implied by it."""
    v = eagle3_view(raw)
    if not v["aux_layer_ids"]:
        raise LkspecError(f"{d}/{CONFIG_FILE} names no eagle_aux_hidden_state_layer_ids; add them (vLLM's default "
                          f"for a target with L layers is [2, L // 2, L - 3]) so the draft reads the layers it was "
                          f"trained on")
    if int(v.get("num_hidden_layers", 1)) != 1 or v.get("norm_before_residual") or v.get("norm_before_fc") or \
            v.get("fc_norm") or v.get("norm_output") or v.get("attention_bias") or v.get("mlp_bias"):
        raise LkspecError(f"{d}: this EAGLE-3 variant (more layers, norm_before_residual/norm_before_fc/fc_norm/"
                          f"norm_output, biases) is not one lkspec implements; it reads the authors' one-layer form")
    sources = {k.removeprefix("model.").replace("layers.0.", "midlayer.", 1): (f, k) for k, (f, _) in scan.items()}
    plan = Plan("eagle3", {}, sources, layout="speculators" if "transformer_layer_config" in raw else "vllm")
    if "d2t" in sources:
        sources["token_map"] = sources.pop("d2t")
        plan.offset["token_map"] = True
    plan.skip = {k for k in scan if k.endswith("t2d")}
    plan.from_target = {"embed_tokens.weight"}  # the authors' checkpoints leave it out (frozen, the target's)
    H, V = int(_need(v, "hidden_size", d)), int(_need(v, "vocab_size", d))
    N = int(v.get("draft_vocab_size") or V)
    plan.config = {
        "arch": "eagle3", "hidden_size": H, "vocab_size": V, "draft_vocab_size": N if N != V else None,
        "num_heads": _proposal_tokens(raw) or 6,  # the native layout does not say; an lkspec export's provenance does
        "aux_layers": sorted(v["aux_layer_ids"]), "num_attention_heads": int(_need(v, "num_attention_heads", d)),
        "num_key_value_heads": int(v.get("num_key_value_heads") or v["num_attention_heads"]),
        "head_dim": int(v.get("head_dim") or H // int(v["num_attention_heads"])),
        "intermediate_size": int(_need(v, "intermediate_size", d)),
        "rope_theta": float(v.get("rope_theta") or 10000.0), "rms_norm_eps": float(v.get("rms_norm_eps") or 1e-5),
        "max_position_embeddings": int(v.get("max_position_embeddings") or 2048),
    }
    if v.get("rope_scaling"):
        plan.notes.append(f"rope_scaling {v['rope_scaling']} is not applied (lkspec's draft uses plain RoPE)")
    return plan


def _proposal_tokens(raw: dict[str, Any]) -> int | None:
    methods = (raw.get("speculators_config") or {}).get("proposal_methods") or [{}]
    n = methods[0].get("speculative_tokens")
    return int(n) if n else None


PLANS = {"mlp_speculator": plan_mlp, "medusa": plan_medusa, "eagle3": plan_eagle3}
"""How each architecture's outside layouts are read (one entry per architecture)."""
