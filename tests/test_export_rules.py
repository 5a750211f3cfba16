"""vLLM 0.32's loader rules, re-derived (names, config asserts, renaming, prefix stripping, coverage), and
the known traps refused. scripts/check_vllm_load.sh checks the same against vLLM's own classes."""

from __future__ import annotations

import pytest
import torch

from lkspec.drafts import build_draft
from lkspec.errors import LkspecError
from lkspec.export.layouts import layout, truncate
from lkspec.export.vllm_rules import (
    check_servable,
    medusa_view,
    mlp_view,
    simulate_load,
    vllm_param_name,
    vllm_parameters,
)

H, V = 16, 100


def _draft(arch: str, seed: int = 1, **kw):
    d = build_draft(arch, hidden_size=H, vocab_size=V, seed=0, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return d


def _export(arch: str, **kw):
    cfg, tensors = layout(_draft(arch, **kw), dtype=torch.float32, base_model="org/base")
    return cfg, dict(tensors)


def test_mlp_parameter_names_are_vllm_0_32s() -> None:
    """named_parameters() as printed by vLLM 0.32.0's MLPSpeculator (tied: shared modules once, a head per stage)."""
    cfg = {"model_type": "mlp_speculator", "vocab_size": 1000, "emb_dim": 64, "inner_dim": 48, "n_predict": 6,
           "top_k_tokens_per_head": [1] * 6, "tie_weights": True}
    assert list(vllm_parameters(cfg).items()) == [
        ("emb.0.weight", (1000, 48)), ("proj.0.weight", (48, 64)), ("proj.1.weight", (48, 48)),
        *[(f"head.{i}.weight", (1000, 48)) for i in range(6)], ("ln.0.weight", (48,)), ("ln.0.bias", (48,)),
    ]
    untied = vllm_parameters({**cfg, "tie_weights": False})
    assert len(untied) == 6 * 5 and untied["proj.0.weight"] == (48, 64) and untied["proj.3.weight"] == (48, 48)
    assert vllm_parameters({**cfg, "inner_dim": 0})["emb.0.weight"] == (1000, 64)  # inner_dim 0 -> emb_dim


def test_num_speculative_tokens_sets_the_stage_count() -> None:
    cfg = {"model_type": "mlp_speculator", "vocab_size": V, "emb_dim": H, "n_predict": 6,
           "top_k_tokens_per_head": [1] * 6}
    assert {n for n in vllm_parameters(cfg, 4) if n.startswith("head.")} == {f"head.{i}.weight" for i in range(4)}
    assert "head.11.weight" in vllm_parameters(cfg, 12)  # divisible: builds 12 stages (a 6-stage file misses some)
    with pytest.raises(LkspecError, match="not divisible by n_predict=6"):
        vllm_parameters(cfg, 9)
    med = {"model_type": "medusa", "hidden_size": H, "vocab_size": V, "num_heads": 6, "num_hidden_layers": 1}
    assert "lm_heads.2.weight" in vllm_parameters(med, 3) and "lm_heads.3.weight" not in vllm_parameters(med, 3)


def test_medusa_config_renaming_and_defaults() -> None:
    fd = medusa_view({"medusa_num_heads": 3, "medusa_num_layers": 2, "base_model_name_or_path": "x"})
    assert (fd["num_heads"], fd["num_hidden_layers"]) == (3, 2)
    assert "medusa_num_heads" not in fd
    assert fd["vocab_size"] == 32001 and fd["truncated_vocab_size"] == 32001  # why vocab_size must be written
    # the trap: any "num…heads" key lands on num_heads; the last one wins
    clobbered = medusa_view({"num_heads": 6, "num_attention_heads": 0, "num_hidden_layers": 1})
    assert clobbered["num_heads"] == 0
    assert medusa_view({"num_heads": 6, "num_key_value_heads": 2})["num_heads"] == 2


def test_mlp_config_assert_on_top_k_length() -> None:
    assert mlp_view({"n_predict": 3})["top_k_tokens_per_head"] == [5, 4, 3]  # vLLM's default
    with pytest.raises(LkspecError, match="top_k_tokens_per_head has 3 entries but n_predict is 6"):
        mlp_view({"n_predict": 6})  # missing list -> [5,4,3] -> assert
    with pytest.raises(LkspecError, match="has 4 entries but n_predict is 6"):
        mlp_view({"n_predict": 6, "top_k_tokens_per_head": [4, 3, 2, 2]})


def test_name_mapping() -> None:
    assert vllm_param_name("mlp_speculator", "speculator.head.3.weight", {}) == "head.3.weight"
    assert vllm_param_name("mlp_speculator", "ln.0.bias", {}) == "ln.0.bias"
    m = {"model_type": "medusa"}
    assert vllm_param_name("medusa", "medusa_heads.blocks.1.layers.0.weight", m) == "blocks.1.layers.0.weight"
    assert vllm_param_name("medusa", "2.0.linear.weight", m) == "blocks.2.layers.0.weight"
    assert vllm_param_name("medusa", "2.0.linear.bias", m) == "blocks.2.layers.0.bias"
    assert vllm_param_name("medusa", "2.1.weight", m) == "lm_heads.2.weight"
    assert vllm_param_name("medusa", "lm_heads.0.weight", {**m, "original_lm_head": True}) == "lm_head.weight"


@pytest.mark.parametrize(("arch", "kw"), [
    ("mlp_speculator", {"inner_dim": 24}), ("mlp_speculator", {"inner_dim": 24, "tie_weights": True}),
    ("mlp_speculator", {"tie_weights": True, "scale_input": True}), ("medusa", {"num_layers": 2, "bias": True}),
    ("medusa", {"bias": False}),
])
def test_exports_cover_every_vllm_parameter(arch: str, kw: dict) -> None:
    cfg, tensors = _export(arch, **kw)
    load = check_servable(cfg, tensors)
    assert set(load.loaded) == set(load.params) and not load.missing and not load.bad_shapes
    if kw.get("tie_weights"):
        # vLLM 0.32 takes emb.0 / proj.1 / ln.0 for every stage; the copies it skips are equal to them
        want = {f"emb.{i}.weight" for i in range(1, 6)} | {f"proj.{i}.weight" for i in range(2, 6)} | {
            f"ln.{i}.{w}" for i in range(1, 6) for w in ("weight", "bias")}
        assert set(load.ignored) == want
    else:
        assert load.ignored == []


def test_truncated_export_is_servable() -> None:
    d = truncate(_draft("mlp_speculator", inner_dim=24, tie_weights=True), 3)
    cfg, tensors = layout(d, dtype=torch.bfloat16)
    assert check_servable(cfg, tensors).params.keys() >= {"head.2.weight"}
    assert cfg["n_predict"] == 3 and cfg["top_k_tokens_per_head"] == [1, 1, 1]


# ----- the known traps are refused ---------------------------------------------------------------
def test_trap_num_attention_heads_in_medusa_config() -> None:
    cfg, tensors = _export("medusa")
    with pytest.raises(LkspecError, match=r"\['num_attention_heads'\].*renames every key containing 'num' and 'heads'"):
        check_servable({**cfg, "num_attention_heads": 0}, tensors)
    with pytest.raises(LkspecError, match="medusa_num_heads"):
        check_servable({**cfg, "medusa_num_heads": 6}, tensors)


def test_trap_top_k_list_of_wrong_length() -> None:
    cfg, tensors = _export("mlp_speculator", inner_dim=24)
    with pytest.raises(LkspecError, match="asserts they are equal"):
        check_servable({**cfg, "top_k_tokens_per_head": [1] * 5}, tensors)
    with pytest.raises(LkspecError, match="asserts"):
        check_servable({k: v for k, v in cfg.items() if k != "top_k_tokens_per_head"}, tensors)


def test_trap_biases_with_medusa_fc_bias_false() -> None:
    cfg, tensors = _export("medusa", bias=True)
    with pytest.raises(LkspecError, match=r"ignore tensors blocks\.0\.layers\.0\.bias.*set medusa_fc_bias true"):
        check_servable({**cfg, "medusa_fc_bias": False}, tensors)
    with pytest.raises(LkspecError, match="must say medusa_fc_bias"):
        check_servable({k: v for k, v in cfg.items() if k != "medusa_fc_bias"}, tensors)
    cfg0, tensors0 = _export("medusa", bias=False)
    with pytest.raises(LkspecError, match=r"would find no tensor for: blocks\.0\.layers\.0\.bias"):
        check_servable({**cfg0, "medusa_fc_bias": True}, tensors0)


def test_trap_tied_export_missing_later_heads() -> None:
    """Writing shared tensors once (the fms convention) leaves vLLM 0.32's head.1..5 unloaded."""
    cfg, tensors = _export("mlp_speculator", inner_dim=24, tie_weights=True)
    once = {k: v for k, v in tensors.items() if k.split(".")[1] in ("0", "1") and not
            (k.startswith(("emb.", "head.", "ln.")) and k.split(".")[1] == "1")}
    assert sorted(once) == ["emb.0.weight", "head.0.weight", "ln.0.bias", "ln.0.weight", "proj.0.weight",
                            "proj.1.weight"]
    load = simulate_load(cfg, once)
    assert load.missing == [f"head.{i}.weight" for i in range(1, 6)]
    with pytest.raises(LkspecError, match=r"no tensor for: head\.1\.weight, head\.2\.weight"):
        check_servable(cfg, once)


def test_trap_tied_copy_that_differs_and_stray_tensors() -> None:
    cfg, tensors = _export("mlp_speculator", inner_dim=24, tie_weights=True)
    with pytest.raises(LkspecError, match=r"silently ignore tensors emb\.3\.weight"):
        check_servable(cfg, {**tensors, "emb.3.weight": tensors["emb.3.weight"] + 1})
    with pytest.raises(LkspecError, match=r"silently ignore tensors extra\.weight"):
        check_servable(cfg, {**tensors, "extra.weight": torch.zeros(2)})


def test_trap_layout_errors() -> None:
    cfg, tensors = _export("mlp_speculator", inner_dim=24)
    with pytest.raises(LkspecError, match="one-element list"):
        check_servable({**cfg, "architectures": "MLPSpeculatorPreTrainedModel"}, tensors)
    with pytest.raises(LkspecError, match="lacks vocab_size"):
        check_servable({k: v for k, v in cfg.items() if k != "vocab_size"}, tensors)
    with pytest.raises(LkspecError, match="model_type"):
        check_servable({**cfg, "model_type": "llama"}, tensors)
    with pytest.raises(LkspecError, match=r"shapes vLLM's mlp_speculator would reject: head\.2\.weight"):
        check_servable(cfg, {**tensors, "head.2.weight": torch.zeros(V + 1, 24)})
    with pytest.raises(LkspecError, match="n_predict > 1 when tie_weights"):
        vllm_parameters({**cfg, "n_predict": 1, "top_k_tokens_per_head": [1], "tie_weights": True})
