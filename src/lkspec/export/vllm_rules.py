"""What vLLM 0.32's loaders do with a draft directory, transcribed so an export can be checked without vLLM.

vLLM accepts far more than it serves correctly: unknown tensor names are skipped without a word, a bias
without `medusa_fc_bias: true` is dropped, any Medusa config key containing "num" and "heads" is renamed
to `num_heads` (so a stray `num_attention_heads` silently replaces the head count), and a
`top_k_tokens_per_head` list of the wrong length trips an assert. The exporter runs every file it writes
through this transcription and refuses to write anything vLLM would load wrongly.

Sources (0.32.0 wheel): `transformers_utils/configs/{mlp_speculator,medusa}.py`,
`model_executor/models/{mlp_speculator,medusa}.py` (`__init__` -> `named_parameters`, `load_weights`),
`config/speculative.py` (`num_lookahead_tokens` <- `num_speculative_tokens`, divisibility by n_predict).
`scripts/check_vllm_load.sh` checks this transcription against the real classes.

This module owns the loader *simulation* (config views and defaults, the parameters vLLM builds,
`simulate_load`, the strict `check_servable` gate the exporter applies to what it writes). The naming
rules it shares with the checkpoint reader (architectures, key renaming, tied sources) live below it, in
`lkspec.drafts.vllm_names`, so that reading a checkpoint never depends on the export package.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from lkspec.drafts.vllm_names import (  # noqa: F401  (the arch names are re-exported for older imports)
    ARCTIC_MLP_ARCH,
    EAGLE3_ARCH,
    MEDUSA_ARCH,
    MLP_ARCH,
    SPECULATORS_ARCH,
    eagle3_view,
    is_eagle3,
    medusa_renamed_keys,
    remap_medusa_key,
    tied_source,
)
from lkspec.errors import LkspecError

MLP_DEFAULTS = {"vocab_size": 32000, "emb_dim": 4096, "inner_dim": 0, "n_predict": 3, "tie_weights": False,
                "scale_input": False}
MEDUSA_DEFAULTS = {"hidden_size": 4096, "vocab_size": 32001, "num_heads": 5, "num_hidden_layers": 1}


def medusa_view(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The attributes vLLM's MedusaConfig ends up with (renaming, then defaults); the last renamed key wins."""
    view = dict(cfg)
    for new, olds in medusa_renamed_keys(cfg).items():
        for old in olds:
            view[new] = view.pop(old)
    for k, v in MEDUSA_DEFAULTS.items():
        view.setdefault(k, v)
    if view.get("truncated_vocab_size") is None:
        view["truncated_vocab_size"] = view["vocab_size"]
    return view


def mlp_view(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The attributes vLLM's MLPSpeculatorConfig ends up with, including its length assert."""
    view = {**MLP_DEFAULTS, **cfg}
    top_k = view.get("top_k_tokens_per_head")
    if top_k is None:
        top_k = view["top_k_tokens_per_head"] = [5, 4, 3]
    if len(top_k) != view["n_predict"]:
        raise LkspecError(
            f"top_k_tokens_per_head has {len(top_k)} entries but n_predict is {view['n_predict']}: vLLM's "
            f"MLPSpeculatorConfig asserts they are equal; write a list of length n_predict"
        )
    return view


def method_of(cfg: Mapping[str, Any]) -> str:
    if is_eagle3(cfg):
        return "eagle3"
    model_type = cfg.get("model_type")
    if model_type in ("mlp_speculator", "medusa"):
        return str(model_type)
    raise LkspecError(f"config.json has model_type {model_type!r}; vLLM needs 'mlp_speculator' or 'medusa'")


def eagle3_parameters(cfg: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """The checkpoint names (before vLLM stacks q/k/v and gate/up) vLLM's Eagle3LlamaForCausalLM loads, with
    shapes (vLLM 0.32 `llama_eagle3.py`: `midlayer.` is read as `layers.0.`; d2t exists only for a head smaller
    than the vocabulary; embed_tokens is loaded when present, else the target's is shared)."""
    v = eagle3_view(cfg)
    H, V, nh = int(v["hidden_size"]), int(v["vocab_size"]), int(v["num_attention_heads"])
    nkv, d = int(v.get("num_key_value_heads") or nh), int(v.get("head_dim") or H // nh)
    inner, N = int(v["intermediate_size"]), int(v.get("draft_vocab_size") or V)
    A = int(v.get("num_aux_hidden_states") or len(v["aux_layer_ids"]) or 3)
    L = "layers.0."
    params: dict[str, tuple[int, ...]] = {
        "fc.weight": (H, A * H), "embed_tokens.weight": (V, H), "norm.weight": (H,), "lm_head.weight": (N, H),
        f"{L}self_attn.q_proj.weight": (nh * d, 2 * H), f"{L}self_attn.k_proj.weight": (nkv * d, 2 * H),
        f"{L}self_attn.v_proj.weight": (nkv * d, 2 * H), f"{L}self_attn.o_proj.weight": (H, nh * d),
        f"{L}mlp.gate_proj.weight": (inner, H), f"{L}mlp.up_proj.weight": (inner, H),
        f"{L}mlp.down_proj.weight": (H, inner),
        **{f"{L}{n}.weight": (H,) for n in ("input_layernorm", "hidden_norm", "post_attention_layernorm")},
    }
    if N != V:
        params["d2t"] = (N,)
    return params


def vllm_parameters(cfg: Mapping[str, Any], num_speculative_tokens: int | None = None) -> dict[str, tuple[int, ...]]:
    """`dict(model.named_parameters())` of vLLM's draft class built from this config (unpadded vocab rows).

    vLLM sets `num_lookahead_tokens = num_speculative_tokens` before building, so that many stages/heads
    exist, whatever n_predict / num_heads the config says.
    """
    method = method_of(cfg)
    if method == "eagle3":
        return eagle3_parameters(cfg)
    if method == "mlp_speculator":
        v = mlp_view(cfg)
        n = num_speculative_tokens or v["n_predict"]
        if n > v["n_predict"] and n % v["n_predict"]:
            raise LkspecError(f"vLLM refuses num_speculative_tokens={n}: not divisible by n_predict={v['n_predict']}")
        V, D, I = v["vocab_size"], v["emb_dim"], v["inner_dim"] or v["emb_dim"]
        params: dict[str, tuple[int, ...]] = {}
        if v["tie_weights"]:
            if v["n_predict"] <= 1:
                raise LkspecError("vLLM asserts n_predict > 1 when tie_weights is true; untie a 1-stage draft")
            # shared modules appear once in named_parameters; 0.32 keeps one head per stage
            params["emb.0.weight"] = (V, I)
            params["proj.0.weight"] = (I, D)
            if n > 1:
                params["proj.1.weight"] = (I, I)
            params.update({f"head.{i}.weight": (V, I) for i in range(n)})
            params.update({"ln.0.weight": (I,), "ln.0.bias": (I,)})
        else:
            for i in range(n):
                params[f"emb.{i}.weight"] = (V, I)
                params[f"proj.{i}.weight"] = (I, D if i == 0 else I)
                params[f"head.{i}.weight"] = (V, I)
                params[f"ln.{i}.weight"] = (I,)
                params[f"ln.{i}.bias"] = (I,)
        return params
    v = medusa_view(cfg)
    n = num_speculative_tokens or v["num_heads"]
    H, V, L = v["hidden_size"], v["vocab_size"], v["num_hidden_layers"]
    params = {}
    for h in range(n):
        for layer in range(L):
            params[f"blocks.{h}.layers.{layer}.weight"] = (H, H)
            if v.get("medusa_fc_bias", False):
                params[f"blocks.{h}.layers.{layer}.bias"] = (H,)
    if v.get("original_lm_head", False):
        params["lm_head.weight"] = (v["truncated_vocab_size"], H)
    else:
        params.update({f"lm_heads.{h}.weight": (V, H) for h in range(n)})
    return params


def vllm_param_name(method: str, name: str, cfg: Mapping[str, Any]) -> str:
    """The name `load_weights` looks up for a checkpoint tensor."""
    if method == "mlp_speculator":
        return name.replace("speculator.", "")
    if method == "eagle3":
        return name.replace("midlayer.", "layers.0.", 1)
    mapped = remap_medusa_key(name.replace("medusa_heads.", ""))
    if medusa_view(cfg).get("original_lm_head", False) and mapped == "lm_heads.0.weight":
        return "lm_head.weight"
    return mapped


@dataclass
class VllmLoad:
    """The outcome of feeding a checkpoint to vLLM's `load_weights` (transcribed)."""

    method: str
    params: dict[str, tuple[int, ...]]
    loaded: dict[str, str] = field(default_factory=dict)  # vLLM param -> checkpoint tensor name
    ignored: list[str] = field(default_factory=list)  # checkpoint tensors no parameter took
    missing: list[str] = field(default_factory=list)  # parameters nothing loaded
    bad_shapes: list[str] = field(default_factory=list)


def simulate_load(cfg: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                  num_speculative_tokens: int | None = None) -> VllmLoad:
    method = method_of(cfg)
    params = vllm_parameters(cfg, num_speculative_tokens)
    out = VllmLoad(method=method, params=params)
    for name, t in tensors.items():
        target = vllm_param_name(method, name, cfg)
        if target in params:
            out.loaded[target] = name  # Medusa keeps the last duplicate; so does this
            if tuple(t.shape) != params[target]:
                out.bad_shapes.append(f"{name} {tuple(t.shape)} != {params[target]}")
        else:
            out.ignored.append(name)
    out.missing = sorted(set(params) - set(out.loaded))
    return out


def _short(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f", … ({len(names)} in all)" if len(names) > n else "")


def check_servable(cfg: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> VllmLoad:
    """Refuse (one line) a config + tensors that vLLM 0.32 would reject or load differently from lkspec.

    Strict on purpose, for what lkspec writes: exact key names, architectures a one-element list, every
    parameter loaded from a tensor of the right shape, and no tensor ignored unless it is a tied copy equal to
    the tensor that was loaded in its place.
    """
    method = method_of(cfg)
    archs = cfg.get("architectures")
    if not (isinstance(archs, list) and len(archs) == 1 and isinstance(archs[0], str)):
        raise LkspecError(f"architectures must be a one-element list (vLLM <= 0.9.2 reads architectures[0]), "
                          f"got {archs!r}")
    if "vocab_size" not in (eagle3_view(cfg) if method == "eagle3" else cfg):
        raise LkspecError("config.json lacks vocab_size; vLLM would fall back to its default; write the target's")
    if method == "medusa":
        for new, olds in medusa_renamed_keys(cfg).items():
            stray = [k for k in olds if k != new]
            if stray:
                raise LkspecError(f"config.json has {stray}: vLLM's MedusaConfig renames every key containing "
                                  f"'num' and '{new.split('_')[-1]}' to {new}, clobbering it; remove them")
        if "num_heads" not in cfg or "num_hidden_layers" not in cfg or "hidden_size" not in cfg:
            raise LkspecError("a MEDUSA config.json needs hidden_size, num_heads and num_hidden_layers")
        if "medusa_fc_bias" not in cfg:
            raise LkspecError("a MEDUSA config.json must say medusa_fc_bias (vLLM drops biases unless it is true)")
    if method == "eagle3":
        _check_eagle3(cfg, tensors)
    load = simulate_load(cfg, tensors)
    load.ignored = [n for n in load.ignored if not (method == "eagle3" and n == "t2d")]  # vLLM skips t2d by design
    if load.bad_shapes:
        raise LkspecError(f"tensors with shapes vLLM's {method} would reject: {_short(load.bad_shapes)}")
    if load.missing:
        raise LkspecError(f"vLLM's {method} would find no tensor for: {_short(load.missing)} "
                          f"(\"weights were not initialized from checkpoint\"); write every stage")
    silently_dropped = []
    for name in load.ignored:
        src = tied_source(name) if method == "mlp_speculator" and cfg.get("tie_weights") else None
        if src is None or src not in tensors or not torch.equal(tensors[name], tensors[src]):
            silently_dropped.append(name)
    if silently_dropped:
        hint = "; set medusa_fc_bias true" if all(n.endswith(".bias") for n in silently_dropped) else ""
        raise LkspecError(f"vLLM's {method} would silently ignore tensors {_short(silently_dropped)}{hint}")
    return load


def _check_eagle3(cfg: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
    v = eagle3_view(cfg)
    if SPECULATORS_ARCH in (cfg.get("architectures") or []) and "model_type" in cfg:
        raise LkspecError("a speculators config.json must have no top-level model_type (vLLM reads the format "
                          "from its absence); remove it")
    for key in ("draft_vocab_size", "norm_before_residual", "hidden_size", "num_attention_heads", "intermediate_size"):
        if key not in v:
            raise LkspecError(f"an EAGLE-3 config.json must say {key} (vLLM's defaults differ from lkspec's); write it")
    ids = v["aux_layer_ids"]
    if not ids or len(ids) != int(v.get("num_aux_hidden_states") or len(ids)):
        raise LkspecError("an EAGLE-3 config.json must name eagle_aux_hidden_state_layer_ids (else vLLM takes "
                          "its own default layers, which need not be the ones the draft was trained on)")
    if "d2t" in tensors and tensors["d2t"].dtype != torch.int64:
        raise LkspecError(f"d2t must be int64 (vLLM adds it to the draft ids), got {tensors['d2t'].dtype}")
