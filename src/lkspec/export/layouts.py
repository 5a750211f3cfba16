"""The served layouts: vLLM's (MLP-Speculator, MEDUSA) and the ArcticInference plugin's MLP variant.

A draft is written exactly as vLLM 0.32's loaders read it (reference/serving.md §1, DESIGN §6): every
stage's tensors, also when tied (vLLM 0.32 keeps a separate `head.i` per stage; names a loader does not
know are ignored, so writing every stage is safe for 0.9.2, fms and Arctic too), and a config.json that
holds only the keys those loaders read plus `torch_dtype` / `base_model_name_or_path`.

Exporting fewer heads than the draft has keeps the first n. For the MLP-Speculator that alone would
change the math: vLLM derives state_weight = 0.5**(0.5/n_predict) from the *exported* n_predict, and the
ratio emb_weight/state_weight that mixes token embedding and state before each norm moves with it. The
norm is scale-invariant but not ratio-invariant, so the embeddings are rescaled by the ratio of the two
constants; the first n heads then compute what they computed in the K-head draft (up to the norm's eps).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lkspec.drafts import Draft, MLPSpeculator, build_draft
from lkspec.drafts.vllm_names import ARCTIC_MLP_ARCH
from lkspec.errors import LkspecError, NoServedLayoutError

OFF_MAP_LOGIT = -30000.0  # logit of a token outside a truncated draft's map in a full-vocabulary export
CONSTANT_CHANNEL = 8.0  # LN bias of the spare channel; GELU(8) = 8 to float precision

DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FORMATS = ("vllm", "arctic", "speculators")
SPECULATORS_VERSION = "0.3.0"  # the speculators release whose Eagle3 config schema this writes


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise LkspecError(f"unknown export dtype {name!r}; choose one of {sorted(DTYPES)}") from None


def mlp_mix_ratio(num_heads: int, inner: int) -> float:
    """vLLM's emb_weight / state_weight: how strongly a stage's token embedding enters next to its state."""
    sw = 0.5 ** (0.5 / num_heads)
    return math.sqrt((1 - sw**2) * inner / 2) / sw


def truncate(draft: Draft, num_heads: int) -> Draft:
    """A draft with the first `num_heads` heads of `draft`, computing the same logits for them."""
    K = draft.num_heads
    if num_heads > K:
        raise LkspecError(f"the draft has {K} heads but {num_heads} were asked for; "
                          f"use --num-speculative-tokens {K} or less")
    if num_heads < 1:
        raise LkspecError(f"--num-speculative-tokens must be at least 1, got {num_heads}")
    if num_heads == K:
        return draft
    cfg = draft.config.model_dump()
    cfg["num_heads"] = num_heads
    if isinstance(draft, MLPSpeculator) and num_heads == 1:
        cfg["tie_weights"] = False  # one stage has nothing to share (and vLLM asserts n_predict > 1 when tied)
    arch = cfg.pop("arch")
    new = build_draft(arch, **cfg).to(next(draft.parameters()).dtype)
    src = draft.state_dict()
    scale = 1.0
    if isinstance(draft, MLPSpeculator):
        scale = mlp_mix_ratio(K, draft.config.inner) / mlp_mix_ratio(num_heads, draft.config.inner)
    with torch.no_grad():
        for name, param in new.state_dict(keep_vars=True).items():
            value = src[name]
            if isinstance(draft, MLPSpeculator) and name.startswith("emb."):
                value = value * scale
            param.copy_(value)
    return new


@torch.no_grad()
def full_vocab_mlp(draft: MLPSpeculator) -> MLPSpeculator:
    """The same draft with V-row heads and one more stage channel, for layouts that cannot hold a token map.

    vLLM's MLPSpeculator has no token map and no head bias, so a token outside the map cannot get a -inf
    logit directly. One spare channel does it: its pre-norm value is 0 (zero rows in proj and emb) and its
    norm weight 0 with bias 8, so after GELU it is the constant 8 in every stage; heads give it weight 0 in
    the kept rows and -30000/8 in all others. Widening the stage from D to D + 1 changes two constants,
    both undone exactly: the embedding scale sqrt(D/2) (embeddings rescaled by sqrt(D/(D+1))) and the
    norm's mean over D + 1 channels (norm weights rescaled the same way). Kept tokens' logits are the
    truncated draft's up to the norm's eps; others are -30000, which no sampler ever picks.
    """
    c = draft.config
    D, tm = c.inner, draft.token_map
    assert tm is not None
    wide = build_draft("mlp_speculator", **{**c.model_dump(exclude={"arch"}), "inner_dim": D + 1,
                                            "draft_vocab_size": None}).to(next(draft.parameters()).dtype)
    shrink = math.sqrt(D / (D + 1))
    for i in range(c.num_heads):
        wide.emb[i].weight.zero_()[:, :D] = draft.emb[i].weight * shrink
        wide.proj[i].weight.zero_()[:D, : draft.proj[i].weight.shape[1]] = draft.proj[i].weight
        wide.ln[i].weight.zero_()[:D] = draft.ln[i].weight * shrink
        wide.ln[i].bias.fill_(CONSTANT_CHANNEL)[:D] = draft.ln[i].bias
        head = wide.head[i].weight.zero_()
        head[:, D] = OFF_MAP_LOGIT / CONSTANT_CHANNEL
        head[tm, :D] = draft.head[i].weight
        head[tm, D] = 0.0
    return wide


def layout(draft: Draft, *, fmt: str = "vllm", dtype: torch.dtype = torch.bfloat16,
           base_model: str | None = None, base_model_archs: list[str] | None = None
           ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(config.json, tensors) of `draft` in the served layout `fmt`, tensors cast to `dtype`."""
    if fmt not in FORMATS:
        raise LkspecError(f"unknown export format {fmt!r}; choose one of {list(FORMATS)}")
    if draft.arch == "medusa" and draft.config.truncated:
        raise NoServedLayoutError(
            f"vLLM 0.32 sizes untied MEDUSA heads by the full vocabulary and cannot load a token map into them "
            f"(its loader slices the rows, then the shapes clash), so a {draft.config.head_rows}-token MEDUSA draft "
            f"has no vLLM layout; serve it with `lkspec generate`, or train MEDUSA with the full vocabulary "
            f"(leave draft.vocab_size unset) for vLLM")
    if isinstance(draft, MLPSpeculator) and draft.config.truncated:
        raise LkspecError("vLLM's MLPSpeculator layout has no token map; export the full-vocabulary twin "
                          "(lkspec.export.layouts.full_vocab_mlp, which `lkspec export` applies itself)")
    if fmt == "speculators" and draft.arch != "eagle3":
        raise LkspecError(f"--format speculators is the EAGLE-3 layout of vllm-project/speculators; export a "
                          f"{draft.arch} draft with --format vllm")
    served = draft.served_tensors()
    if fmt == "speculators":
        served = {k.replace("midlayer.", "layers.0.", 1): v for k, v in served.items()}
    tensors: dict[str, torch.Tensor] = {}
    for name, t in served.items():
        t = t.detach().cpu()
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise LkspecError(f"draft tensor {name} has non-finite values; refusing to export a broken draft "
                              f"(retrain or pick an earlier checkpoint)")
        cast = t.to(dtype) if t.is_floating_point() else t
        if cast.is_floating_point() and not torch.isfinite(cast).all():
            raise LkspecError(f"draft tensor {name} overflows {str(dtype).removeprefix('torch.')} "
                              f"(max |w| = {t.abs().max().item():.3g}); export with --dtype bf16 or fp32")
        tensors[name] = cast.contiguous()
    cfg = speculators_config(draft, base_model, base_model_archs) if fmt == "speculators" else draft.vllm_config()
    if fmt == "arctic":
        if not isinstance(draft, MLPSpeculator):
            raise LkspecError("--format arctic is the ArcticInference layout for MLP-Speculator drafts; "
                              "export MEDUSA drafts with --format vllm")
        if not base_model_archs:
            raise LkspecError("--format arctic needs the target's architecture (ArcticInference checks "
                              "base_model_archs); pass --base-model-arch, e.g. LlamaForCausalLM")
        cfg["architectures"] = [ARCTIC_MLP_ARCH]
        cfg["base_model_archs"] = list(base_model_archs)
    cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
    if base_model and fmt != "speculators":
        cfg["base_model_name_or_path"] = base_model
    return cfg, tensors


def speculators_config(draft: Draft, base_model: str | None, base_model_archs: list[str] | None) -> dict[str, Any]:
    """vllm-project/speculators' Eagle3SpeculatorConfig. No top-level model_type: that is how vLLM tells the
    format apart (its converter builds the Llama config from transformer_layer_config); norm_before_residual is
    written because vLLM and speculators default it differently."""
    c = draft.config
    return {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "speculators_version": SPECULATORS_VERSION,
        "draft_vocab_size": c.head_rows,
        "norm_before_residual": False,
        "target_hidden_size": None,
        "eagle_aux_hidden_state_layer_ids": list(getattr(c, "aux_layers", [])),
        "transformer_layer_config": draft.layer_config(),  # type: ignore[attr-defined]
        "speculators_config": {
            "algorithm": "eagle3",
            "default_proposal_method": "greedy",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": c.num_heads, "verifier_accept_k": 1,
                                  "accept_tolerance": 0.0}],
            "verifier": {"name_or_path": base_model, "architectures": list(base_model_archs or [])},
        },
    }
