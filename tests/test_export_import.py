"""Import of outside checkpoints through `load_draft`: IBM fms (prefix, shards, tied stored once),
FasterDecoding MEDUSA, vLLM-native dirs, `medusa_heads.` files; pickle-only and mismatched dirs refused."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lkspec.drafts import build_draft, load_draft, read_draft_config
from lkspec.errors import LkspecError
from lkspec.export import export_draft, read_checkpoint
from lkspec.targets import TargetIdentity

H, V, T = 16, 100, 10


def _draft(arch: str, **kw):
    d = build_draft(arch, hidden_size=H, vocab_size=V, seed=0, **kw)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in d.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return d


def _same(a, b) -> None:
    g = torch.Generator().manual_seed(0)
    hidden, ids = torch.randn(2, T, H, generator=g), torch.randint(0, V, (2, T), generator=g)
    la, lb = a(hidden, ids), b(hidden, ids)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


def _write(d: Path, config: dict, files: dict[str, dict[str, torch.Tensor]]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(config))
    for name, tensors in files.items():
        save_file({k: v.contiguous().clone() for k, v in tensors.items()}, str(d / name))
    return d


IBM_CONFIG = {"architectures": ["MLPSpeculatorPreTrainedModel"], "model_type": "mlp_speculator", "emb_dim": H,
              "inner_dim": 24, "n_candidates": 5, "n_predict": 4, "top_k_tokens_per_head": [4, 3, 2, 2],
              "torch_dtype": "float16", "transformers_version": "4.40.0", "vocab_size": V}


def test_ibm_fms_sharded_with_prefix(tmp_path: Path) -> None:
    src = _draft("mlp_speculator", inner_dim=24, num_heads=4)
    sd = {f"speculator.{k}": v for k, v in src.state_dict().items()}
    names = sorted(sd)
    shard1, shard2 = dict(sorted(sd.items())[: len(names) // 2]), dict(sorted(sd.items())[len(names) // 2 :])
    d = _write(tmp_path / "ibm", IBM_CONFIG, {"model-00001-of-00002.safetensors": shard1,
                                              "model-00002-of-00002.safetensors": shard2})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        **{k: "model-00001-of-00002.safetensors" for k in shard1},
        **{k: "model-00002-of-00002.safetensors" for k in shard2}}}))
    back = load_draft(d)
    assert back.config.num_heads == 4 and not back.config.tie_weights
    _same(src, back)
    assert read_checkpoint(d).layout == "fms"


def test_ibm_fms_tied_stored_once_is_expanded(tmp_path: Path) -> None:
    src = _draft("mlp_speculator", inner_dim=24, num_heads=5, tie_weights=True, scale_input=True)
    sd = src.state_dict()
    once = {f"speculator.{k}": sd[k] for k in ("emb.0.weight", "head.0.weight", "ln.0.weight", "ln.0.bias",
                                              "proj.0.weight", "proj.1.weight")}
    cfg = {**IBM_CONFIG, "n_predict": 5, "top_k_tokens_per_head": [4, 3, 2, 2, 2], "tie_weights": True,
           "scale_input": True}
    d = _write(tmp_path / "ibm-tied", cfg, {"model.safetensors": once})
    back = load_draft(d)
    assert back.config.tie_weights and back.config.scale_input and back.num_heads == 5
    _same(src, back)
    # re-export writes every stage (vLLM 0.32 needs head.1..4)
    export_draft(d, tmp_path / "out", base_model="ibm/llama-accelerator", dtype="fp32")
    assert {f"head.{i}.weight" for i in range(5)} <= set(load_file(str(tmp_path / "out" / "model.safetensors")))
    _same(src, load_draft(tmp_path / "out"))


def test_tied_checkpoint_with_different_stages_is_refused(tmp_path: Path) -> None:
    src = _draft("mlp_speculator", inner_dim=24, tie_weights=True)
    sd = {k: v.clone() for k, v in src.state_dict().items()}
    sd["head.4.weight"] += 1
    d = _write(tmp_path / "d", {**IBM_CONFIG, "n_predict": 6, "top_k_tokens_per_head": [1] * 6, "tie_weights": True},
               {"model.safetensors": sd})
    with pytest.raises(LkspecError, match=r"tie_weights is true but head\.4\.weight differs from head\.0\.weight"):
        load_draft(d)


def _fasterdecoding(src, layers: int) -> dict[str, torch.Tensor]:
    sd = src.state_dict()
    out = {}
    for h in range(src.num_heads):
        for layer in range(layers):
            out[f"{h}.{layer}.linear.weight"] = sd[f"blocks.{h}.layers.{layer}.weight"]
            out[f"{h}.{layer}.linear.bias"] = sd[f"blocks.{h}.layers.{layer}.bias"]
        out[f"{h}.{layers}.weight"] = sd[f"lm_heads.{h}.weight"]
    return out


@pytest.mark.parametrize("layers", [1, 2])
def test_fasterdecoding_medusa(tmp_path: Path, layers: int) -> None:
    src = _draft("medusa", num_layers=layers, bias=True, num_heads=3)
    cfg = {"base_model_name_or_path": "lmsys/vicuna-7b-v1.3", "medusa_num_heads": 3, "medusa_num_layers": layers,
           "transformers_version": "4.31.0"}
    d = _write(tmp_path / "fd", cfg, {"medusa_lm_head.safetensors": _fasterdecoding(src, layers)})
    config, _ = read_draft_config(d)  # shapes come from the safetensors header
    assert (config.hidden_size, config.vocab_size, config.num_heads, config.num_layers, config.bias) == (
        H, V, 3, layers, True)
    _same(src, load_draft(d))
    # converting it with lkspec fixes vLLM's silent bias drop: medusa_fc_bias true, vLLM names
    export_draft(d, tmp_path / "out", dtype="fp32")
    cfg_out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg_out["medusa_fc_bias"] is True and cfg_out["base_model_name_or_path"] == "lmsys/vicuna-7b-v1.3"
    assert "blocks.2.layers.0.bias" in load_file(str(tmp_path / "out" / "model.safetensors"))
    _same(src, load_draft(tmp_path / "out"))


def test_fasterdecoding_misstated_head_count_trusts_the_weights(tmp_path: Path, caplog) -> None:
    src = _draft("medusa", bias=True, num_heads=5)
    d = _write(tmp_path / "fd", {"medusa_num_heads": 2, "medusa_num_layers": 1},
               {"medusa_lm_head.safetensors": _fasterdecoding(src, 1)})
    with caplog.at_level(logging.WARNING):
        back = load_draft(d)
    assert back.num_heads == 5 and "config says 2 heads but the weights hold 5" in caplog.text
    _same(src, back)


def test_pickle_only_checkpoint_is_refused_without_unpickling(tmp_path: Path) -> None:
    d = tmp_path / "fd"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"medusa_num_heads": 5, "medusa_num_layers": 1}))
    (d / "medusa_lm_head.pt").write_bytes(b"not a pickle at all")  # would raise if anything tried to unpickle it
    with pytest.raises(LkspecError) as exc:
        load_draft(d)
    msg = str(exc.value)
    assert "\n" not in msg and "never unpickles" in msg and "weights_only=True" in msg
    assert "medusa_lm_head.safetensors" in msg and "save_file" in msg


def test_vllm_native_with_medusa_heads_prefix(tmp_path: Path) -> None:
    """abhigoyal/vllm-medusa-* style: vLLM config, no medusa_fc_bias, bias-free, here with a prefix."""
    src = _draft("medusa", bias=False)
    cfg = {"architectures": ["MedusaModel"], "hidden_size": H, "model_type": "medusa", "num_heads": 6,
           "num_hidden_layers": 1, "truncated_vocab_size": None, "vocab_size": V}
    d = _write(tmp_path / "native", cfg,
               {"model.safetensors": {f"medusa_heads.{k}": v for k, v in src.state_dict().items()}})
    _same(src, load_draft(d))


def test_biases_without_medusa_fc_bias_true_are_listed(tmp_path: Path) -> None:
    src = _draft("medusa", bias=True)
    cfg = {"model_type": "medusa", "hidden_size": H, "vocab_size": V, "num_heads": 6, "num_hidden_layers": 1,
           "medusa_fc_bias": False}
    d = _write(tmp_path / "d", cfg, {"model.safetensors": src.state_dict()})
    with pytest.raises(LkspecError, match=r"unknown \[blocks\.0\.layers\.0\.bias.*set it true in config\.json"):
        load_draft(d)


def test_unknown_and_missing_tensors_are_listed(tmp_path: Path) -> None:
    src = _draft("mlp_speculator", inner_dim=24)
    sd = {f"speculator.{k}": v for k, v in src.state_dict().items()}
    del sd["speculator.head.5.weight"], sd["speculator.ln.2.bias"]
    sd["speculator.mystery.weight"] = torch.zeros(3)
    d = _write(tmp_path / "d", {**IBM_CONFIG, "n_predict": 6, "top_k_tokens_per_head": [1] * 6},
               {"model.safetensors": sd})
    with pytest.raises(LkspecError) as exc:
        load_draft(d)
    msg = str(exc.value)
    assert "missing [head.5.weight, ln.2.bias]" in msg and "unknown [speculator.mystery.weight]" in msg
    assert "\n" not in msg


def test_unreadable_dirs(tmp_path: Path) -> None:
    with pytest.raises(LkspecError, match=r"has no config\.json"):
        load_draft(tmp_path)
    d = _write(tmp_path / "llama", {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, {})
    with pytest.raises(LkspecError, match="is not a draft lkspec can read"):
        load_draft(d)
    d = _write(tmp_path / "empty", IBM_CONFIG, {})
    with pytest.raises(LkspecError, match=r"has no \*\.safetensors weights"):
        load_draft(d)
    d = _write(tmp_path / "nokey", {k: v for k, v in IBM_CONFIG.items() if k != "emb_dim"},
               {"model.safetensors": {"x": torch.zeros(1)}})
    with pytest.raises(LkspecError, match="lacks 'emb_dim'"):
        load_draft(d)


def test_export_reload_keeps_the_target_check(tmp_path: Path) -> None:
    ident = TargetIdentity(name="org/target", vocab_size=V, hidden_size=H, tokenizer_hash="a" * 64)
    run = _draft("medusa").save(tmp_path / "run", target=ident)
    export_draft(run, tmp_path / "out")
    assert "lkspec" not in json.loads((tmp_path / "out" / "config.json").read_text())
    load_draft(tmp_path / "out", target=ident)
    other = ident.model_copy(update={"tokenizer_hash": "b" * 64})
    with pytest.raises(LkspecError, match="was made for target 'org/target'"):
        load_draft(tmp_path / "out", target=other)
    # an export of an export carries the provenance on
    export_draft(tmp_path / "out", tmp_path / "again", dtype="fp32")
    prov = json.loads((tmp_path / "again" / "provenance.json").read_text())
    assert prov["target"] == ident.model_dump() and prov["source"]["layout"] == "lkspec-export"
