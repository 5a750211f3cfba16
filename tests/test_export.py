"""Export: round trips (both architectures, tied/untied, with/without bias, every dtype), config keys and
types, head truncation, model card, provenance, and bad input."""

from __future__ import annotations

import hashlib
import json
import math
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from helpers import run_cli
from lkspec.cli import main
from lkspec.drafts import build_draft, load_draft
from lkspec.errors import LkspecError
from lkspec.export import export_draft
from lkspec.export.card import git_state, license_note
from lkspec.targets import TargetIdentity

H, V, T = 16, 100, 12  # V = 100 is not a multiple of 64: vLLM pads it, our files must not
TARGET = TargetIdentity(name="smollm2-135m-instruct", vocab_size=V, hidden_size=H, tokenizer_hash="t" * 64)
TRAIN = {"loss": "lk_hybrid", "eta": 3.0, "gamma": 0.8, "epochs": 10, "lr": 4e-4, "batch": 64, "seed": 0}
DATA = {"features": "/data/feats", "num_docs": 1234, "num_tokens": 567890,
        "source": {"dataset": "sharegpt", "max_new_tokens": 512, "temperature": 1.0}}
DRAFTS = {
    "mlp": ("mlp_speculator", {"inner_dim": 24}),
    "mlp-tied": ("mlp_speculator", {"inner_dim": 24, "tie_weights": True}),
    "mlp-tied-scaled": ("mlp_speculator", {"inner_dim": 24, "tie_weights": True, "scale_input": True}),
    "medusa-bias": ("medusa", {"num_layers": 2, "bias": True}),
    "medusa": ("medusa", {"num_layers": 1, "bias": False}),
}
TOL = {"fp32": 0.0, "bf16": 2e-2, "fp16": 3e-3}  # relative to the largest logit


def make_run(root: Path, key: str, *, seed: int = 1, target: TargetIdentity | None = TARGET, **meta) -> Path:
    """A training-run-like draft directory: random non-trivial weights + the metadata `lkspec train` records."""
    arch, kw = DRAFTS[key]
    d = build_draft(arch, hidden_size=H, vocab_size=V, seed=0, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    extra = {"train": TRAIN, "data": DATA, "step": 900, "epoch": 9, "heldout": {"alpha": [0.6] * 6, "tau": 2.2}}
    extra.update(meta)
    return d.save(root / f"run-{key}", target=target, extra=extra)


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, T, H, generator=g), torch.randint(0, V, (2, T), generator=g)


def max_rel_gap(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(((x - y).abs().max() / x.abs().max()).item() for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("key", list(DRAFTS))
def test_roundtrip_every_arch_and_dtype(tmp_path: Path, key: str, dtype: str) -> None:
    run = make_run(tmp_path, key)
    src = load_draft(run)
    export_draft(run, tmp_path / "out", dtype=dtype)
    back = load_draft(tmp_path / "out", target=TARGET)  # the target check reads provenance.json
    assert back.config == src.config
    hidden, ids = inputs()
    ours, theirs = src(hidden, ids), back(hidden, ids)
    if dtype == "fp32":
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))
    else:
        assert 0 < max_rel_gap(ours, theirs) < TOL[dtype]
        # exactly what the weights rounded to the dtype compute
        with torch.no_grad():
            for p in src.parameters():
                p.copy_(p.to({"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]).float())
        assert all(torch.equal(a, b) for a, b in zip(src(hidden, ids), theirs, strict=True))
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    want = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    assert {t.dtype for t in tensors.values()} == {want}
    prov = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert prov["roundtrip"]["reloads_identically"] is True
    assert (prov["roundtrip"]["max_rel_logit_gap_vs_source"] == 0.0) == (dtype == "fp32")


def test_mlp_config_keys_and_types(tmp_path: Path) -> None:
    export_draft(make_run(tmp_path, "mlp"), tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    types = {"model_type": str, "architectures": list, "vocab_size": int, "emb_dim": int, "inner_dim": int,
             "n_predict": int, "top_k_tokens_per_head": list, "n_candidates": int, "tie_weights": bool,
             "scale_input": bool, "torch_dtype": str, "base_model_name_or_path": str}
    assert set(cfg) == set(types)  # the pure vLLM layout: provenance lives in provenance.json
    assert all(type(cfg[k]) is t for k, t in types.items())
    assert cfg["model_type"] == "mlp_speculator" and cfg["architectures"] == ["MLPSpeculatorPreTrainedModel"]
    assert (cfg["vocab_size"], cfg["emb_dim"], cfg["inner_dim"], cfg["n_predict"]) == (V, H, 24, 6)
    assert len(cfg["top_k_tokens_per_head"]) == cfg["n_predict"]
    assert all(type(x) is int for x in cfg["top_k_tokens_per_head"])
    assert cfg["torch_dtype"] == "bfloat16"
    assert cfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"  # embedded -> its hub id


@pytest.mark.parametrize("key", ["medusa", "medusa-bias"])
def test_medusa_config_keys_and_types(tmp_path: Path, key: str) -> None:
    export_draft(make_run(tmp_path, key), tmp_path / "out", dtype="fp16")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    types = {"model_type": str, "architectures": list, "hidden_size": int, "vocab_size": int, "num_heads": int,
             "num_hidden_layers": int, "medusa_fc_bias": bool, "truncated_vocab_size": type(None),
             "torch_dtype": str, "base_model_name_or_path": str}
    assert set(cfg) == set(types)
    assert all(type(cfg[k]) is t for k, t in types.items())
    assert cfg["model_type"] == "medusa" and cfg["architectures"] == ["MedusaModel"]
    assert (cfg["hidden_size"], cfg["vocab_size"], cfg["num_heads"]) == (H, V, 6)
    bias = key == "medusa-bias"
    assert cfg["num_hidden_layers"] == (2 if bias else 1)
    names = set(load_file(str(tmp_path / "out" / "model.safetensors")))
    assert cfg["medusa_fc_bias"] is bias is any(n.endswith(".bias") for n in names)
    assert not [k for k in cfg if "num" in k and "heads" in k and k != "num_heads"]


def test_tied_export_writes_every_stage(tmp_path: Path) -> None:
    """DESIGN §6: vLLM 0.32 keeps a head.i per stage even when tied, so every stage's tensors are written."""
    export_draft(make_run(tmp_path, "mlp-tied"), tmp_path / "out")
    tensors = load_file(str(tmp_path / "out" / "model.safetensors"))
    for i in range(6):
        for name in (f"emb.{i}.weight", f"proj.{i}.weight", f"head.{i}.weight", f"ln.{i}.weight", f"ln.{i}.bias"):
            assert name in tensors
        assert torch.equal(tensors[f"head.{i}.weight"], tensors["head.0.weight"])
    assert torch.equal(tensors["proj.5.weight"], tensors["proj.1.weight"])
    assert not torch.equal(tensors["proj.0.weight"][:, :16], tensors["proj.1.weight"][:, :16])


def _vllm_formula(out: Path, hidden: torch.Tensor, ids: torch.Tensor) -> list[torch.Tensor]:
    """vLLM's MLPSpeculator math on the exported files, with its constants from the exported n_predict."""
    cfg = json.loads((out / "config.json").read_text())
    sd = {k: v.double() for k, v in load_file(str(out / "model.safetensors")).items()}
    n, inner = cfg["n_predict"], cfg["inner_dim"]
    sw = 0.5 ** (0.5 / n)
    ew = math.sqrt((1 - sw**2) * inner / 2)
    s, res = hidden.double(), []
    for i in range(n):
        m = T - (i + 1)
        s = s[:, :m] @ sd[f"proj.{i}.weight"].T + (ew / sw) * sd[f"emb.{i}.weight"][ids[:, i + 1 : i + 1 + m]]
        s = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6) * sd[f"ln.{i}.weight"] + sd[f"ln.{i}.bias"]
        s = torch.nn.functional.gelu(s)
        res.append(s @ sd[f"head.{i}.weight"].T)
    return res


@pytest.mark.parametrize("key", ["mlp", "mlp-tied", "medusa-bias"])
def test_fewer_heads_keep_the_first_heads_unchanged(tmp_path: Path, key: str) -> None:
    run = make_run(tmp_path, key)
    src = load_draft(run)
    export_draft(run, tmp_path / "out", dtype="fp32", num_speculative_tokens=4)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg.get("n_predict", cfg.get("num_heads")) == 4
    back = load_draft(tmp_path / "out")
    hidden, ids = inputs()
    full, cut = src(hidden, ids)[:4], back(hidden, ids)
    assert len(cut) == 4 and max_rel_gap(full, cut) < 1e-5
    if key.startswith("mlp"):
        # vLLM derives state_weight from n_predict = 4: the rescaled embeddings compensate exactly
        assert max_rel_gap([x.double() for x in full], _vllm_formula(tmp_path / "out", hidden, ids)) < 1e-5
        # and without the rescale the heads would have moved (the check is not vacuous)
        prov = json.loads((tmp_path / "out" / "provenance.json").read_text())
        assert prov["export"]["emb_rescale"] != pytest.approx(1.0, abs=1e-3)


def test_one_head_of_a_tied_mlp_exports_untied(tmp_path: Path) -> None:
    run = make_run(tmp_path, "mlp-tied")
    export_draft(run, tmp_path / "out", dtype="fp32", num_speculative_tokens=1)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (cfg["n_predict"], cfg["tie_weights"]) == (1, False)
    hidden, ids = inputs()
    assert max_rel_gap(load_draft(run)(hidden, ids)[:1], load_draft(tmp_path / "out")(hidden, ids)) < 1e-5


def test_arctic_format(tmp_path: Path) -> None:
    export_draft(make_run(tmp_path, "mlp"), tmp_path / "out", fmt="arctic")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["architectures"] == ["ArcticMLPSpeculatorPreTrainedModel"]
    assert cfg["base_model_archs"] == ["LlamaForCausalLM"] and cfg["model_type"] == "mlp_speculator"
    card = (tmp_path / "out" / "README.md").read_text()
    assert '"method": "arctic"' in card and "ARCTIC_INFERENCE_ENABLED=1" in card
    # re-imports like any MLP-Speculator
    hidden, ids = inputs()
    assert max_rel_gap(load_draft(tmp_path / "run-mlp")(hidden, ids), load_draft(tmp_path / "out")(hidden, ids)) < 2e-2


def _eval_file(path: Path, draft_path: Path, label: str = "lk", target: TargetIdentity = TARGET) -> Path:
    rows = []
    for b, base in (("mtbench", 2.0), ("humaneval", 2.5), ("gsm8k", 2.2), ("mean", 2.233)):
        for t, rule, shift in ((0.0, "sampled", 0.0), (0.0, "greedy", 0.0), (1.0, "sampled", -0.1),
                               (1.0, "greedy", -0.3)):
            rows.append({"draft": label, "draft_path": str(draft_path), "benchmark": b, "temperature": t,
                         "rule": rule, "tau": base + shift, "ci95": [base + shift - 0.05, base + shift + 0.05],
                         "num_prompts": 10, "num_tokens": 640, "acceptance": [0.5] * 6,
                         "acceptance_cumulative": [0.5] * 6, "alpha": [0.5] * 6})
    rows.append({**rows[0], "draft": "other", "draft_path": "/elsewhere", "tau": 9.99, "ci95": [9.9, 9.99]})
    path.write_text(json.dumps({"format": "lkspec-eval/1", "target": target.model_dump(), "k": 6,
                                "max_new_tokens": 64, "seed": 0, "rows": rows}))
    return path


def test_model_card_and_provenance(tmp_path: Path) -> None:
    run = make_run(tmp_path, "medusa-bias")
    results = _eval_file(tmp_path / "eval.json", run)
    export_draft(run, tmp_path / "out", eval_results=results, repo_id="me/medusa-smollm2")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "license: apache-2.0" in card and "Apache-2.0" in card
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "MEDUSA, 6 heads × 2 residual layer(s)" in card and "with biases" in card
    assert "1,234 documents, 567,890 tokens" in card and "`sharegpt` prompts at T = 1, ≤ 512 new tokens" in card
    assert "Hybrid LK loss with adaptive λ scheduling (η = 3)" in card and "γ = 0.8" in card
    assert "10 epochs from random initialization; selected checkpoint: epoch 9, step 900" in card and "K = 6" in card
    spec = '{"method": "medusa", "model": "me/medusa-smollm2", "num_speculative_tokens": 6}'
    assert f"speculative_config={spec}" in card and f"--speculative-config '{spec}'" in card
    assert "vllm serve HuggingFaceTB/SmolLM2-135M-Instruct" in card
    # the τ table: one T = 0 column (rules coincide), both T = 1 rules, every benchmark and the mean, CIs
    header = next(line for line in card.splitlines() if line.startswith("| benchmark"))
    assert header == "| benchmark | T = 0 | T = 1, sampled drafts | T = 1, greedy drafts |"
    assert "| humaneval | 2.50 [2.45, 2.55] | 2.40 [2.35, 2.45] | 2.20 [2.15, 2.25] |" in card
    assert "| **mean** | 2.23" in card and "9.99" not in card  # another draft's row stays out
    # serving matrix as the issue states it
    assert "MEDUSA runs on vLLM 0.10–0.32 (drafts greedy at T > 0)" in card
    assert "MLP-Speculator runs on vLLM ≤ 0.9.2\n(V0 engine) or the ArcticInference plugin" in card
    assert "vLLM 0.33 dropped both" in card and "lkspec's own generator runs both with\nsampled drafts" in card
    prov = json.loads((tmp_path / "out" / "provenance.json").read_text())
    assert prov["format"] == "lkspec-export/1" and prov["lkspec_version"]
    # no local path travels with an export: absolute paths keep only their last component
    assert prov["training"]["train"] == TRAIN and prov["data"] == {**DATA, "features": "feats"}
    assert prov["target"] == TARGET.model_dump()
    assert prov["export"]["dtype"] == "bf16" and prov["export"]["eval_rows"] == 16
    for name, digest in prov["files"].items():
        assert hashlib.sha256((tmp_path / "out" / name).read_bytes()).hexdigest() == digest


def test_license_notes() -> None:
    assert license_note("HuggingFaceTB/SmolLM2-135M-Instruct")[0] == "apache-2.0"
    assert "Llama 3.1 Community License" in license_note("meta-llama/Llama-3.1-8B-Instruct")[1]
    assert "Llama 3.1 Community License" in license_note("meta-llama/Meta-Llama-3.1-70B-Instruct")[1]
    assert license_note("Qwen/Qwen2.5-7B-Instruct")[1].startswith("See the base model's license")


def test_git_commit_is_this_checkout() -> None:
    commit, _ = git_state()
    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    import lkspec

    if Path(lkspec.__file__).resolve().parents[1] != root / "src":
        pytest.skip("lkspec is imported from another tree")
    assert commit == head and re.fullmatch(r"[0-9a-f]{40}", commit)


def test_eval_selection_by_label_and_errors(tmp_path: Path) -> None:
    run = make_run(tmp_path, "mlp")
    results = _eval_file(tmp_path / "eval.json", Path("/not/this/run"), label="lk")
    with pytest.raises(LkspecError, match=r"several drafts \['lk', 'other'\].*--eval-draft"):
        export_draft(run, tmp_path / "a", eval_results=results)
    export_draft(run, tmp_path / "b", eval_results=results, eval_draft="lk")
    assert "2.50 [2.45, 2.55]" in (tmp_path / "b" / "README.md").read_text()
    with pytest.raises(LkspecError, match="no rows for draft 'nope'"):
        export_draft(run, tmp_path / "c", eval_results=results, eval_draft="nope")
    other = TargetIdentity(name="other", vocab_size=V, hidden_size=H, tokenizer_hash="x" * 64)
    with pytest.raises(LkspecError, match="was made for target 'other'"):
        export_draft(run, tmp_path / "d", eval_results=_eval_file(tmp_path / "e2.json", run, target=other))
    (tmp_path / "bad.json").write_text('{"rows": []}')
    with pytest.raises(LkspecError, match="not an lkspec eval results file"):
        export_draft(run, tmp_path / "e", eval_results=tmp_path / "bad.json")
    assert not any((tmp_path / x).exists() for x in "acde")


# ----- bad input ---------------------------------------------------------------------------------
def test_more_heads_than_the_run_has(tmp_path: Path) -> None:
    with pytest.raises(LkspecError, match=r"the draft has 6 heads but 7 were asked for; use --num-speculative"):
        export_draft(make_run(tmp_path, "mlp"), tmp_path / "out", num_speculative_tokens=7)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key", ["mlp", "medusa-bias"])
def test_non_finite_weight_is_refused(tmp_path: Path, key: str) -> None:
    run = make_run(tmp_path, key)
    tensors = load_file(str(run / "model.safetensors"))
    name = sorted(tensors)[3]
    tensors[name][0, ...] = float("nan")
    save_file(tensors, str(run / "model.safetensors"))
    with pytest.raises(LkspecError, match=rf"draft tensor {re.escape(name)} has non-finite values"):
        export_draft(run, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_fp16_overflow_is_refused(tmp_path: Path) -> None:
    run = make_run(tmp_path, "medusa")
    tensors = load_file(str(run / "model.safetensors"))
    tensors["lm_heads.2.weight"][0, 0] = 1e6
    save_file(tensors, str(run / "model.safetensors"))
    with pytest.raises(LkspecError, match=r"lm_heads.2.weight overflows float16 .* --dtype bf16"):
        export_draft(run, tmp_path / "out", dtype="fp16")
    export_draft(run, tmp_path / "out", dtype="bf16")  # fine in bf16


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    run = make_run(tmp_path, "mlp")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LkspecError, match=r"already exists; pass --overwrite"):
        export_draft(run, out)
    assert (out / "keep.txt").read_text() == "mine"
    with pytest.raises(LkspecError, match=r"--overwrite replaces only a previous lkspec export"):
        export_draft(run, out, overwrite=True)  # a folder lkspec did not export is never deleted (issue 13)
    assert (out / "keep.txt").read_text() == "mine"
    out = tmp_path / "export"
    export_draft(run, out)
    (out / "keep.txt").write_text("stale")
    export_draft(run, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp dirs left behind
    with pytest.raises(LkspecError, match="would replace the draft being exported"):
        export_draft(run, run, overwrite=True)


def test_other_bad_input(tmp_path: Path) -> None:
    run = make_run(tmp_path, "medusa")
    with pytest.raises(LkspecError, match="--format arctic is the ArcticInference layout for MLP-Speculator"):
        export_draft(run, tmp_path / "o1", fmt="arctic")
    with pytest.raises(LkspecError, match="unknown export dtype 'int8'"):
        export_draft(run, tmp_path / "o2", dtype="int8")
    with pytest.raises(LkspecError, match="unknown export format 'tgi'"):
        export_draft(run, tmp_path / "o3", fmt="tgi")
    anon = make_run(tmp_path / "anon", "mlp", target=None)
    with pytest.raises(LkspecError, match="does not record its target model; pass --base-model"):
        export_draft(anon, tmp_path / "o4")
    with pytest.raises(LkspecError, match="pass --base-model-arch"):
        export_draft(anon, tmp_path / "o5", base_model="org/unknown-model", fmt="arctic")
    export_draft(anon, tmp_path / "o6", base_model="org/unknown-model")
    assert "See the base model's license" in (tmp_path / "o6" / "README.md").read_text()


def test_cli_export_and_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path, "mlp-tied")
    main(["export", "--draft", str(run), "--out", str(tmp_path / "out"), "--dtype", "fp16", "-k", "5"])
    printed = capsys.readouterr().out
    assert '"method": "mlp_speculator"' in printed and '"num_speculative_tokens": 5' in printed
    assert json.loads((tmp_path / "out" / "config.json").read_text())["n_predict"] == 5
    with pytest.raises(SystemExit) as exc:
        main(["export", "--draft", str(run), "--out", str(tmp_path / "out")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--overwrite" in err and len(err.splitlines()) == 1
    try:
        main(["export", "--help"])
    except SystemExit as done:
        assert done.code == 0
    helptext = capsys.readouterr().out
    for flag in ("--draft", "--out", "--dtype", "--format", "--num-speculative-tokens", "--base-model",
                 "--base-model-arch", "--eval", "--eval-draft", "--model-id", "--overwrite"):
        assert flag in helptext


def test_a_full_disk_during_export_is_one_line_and_leaves_no_partial_export(
        tmp_path: Path, small_disk: Callable[[int], Path]) -> None:
    """A real full disk (a 64 KiB tmpfs) under `lkspec export`: before, the Rust writer's error escaped as a
    traceback; now one line says where and how much room there is, and no half-written export is left."""
    run = make_run(tmp_path, "mlp")
    disk = small_disk(64 * 1024)
    r = run_cli("export", "--draft", str(run), "--out", str(disk / "out"))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr
    assert re.match(rf"error: the disk is full writing to {re.escape(str(disk))} \(\d+ MiB free there\); what "
                    r"finished before is intact .* rerun the same command", lines[0]), lines[0]
    assert list(disk.iterdir()) == []  # the export's temporary folder went with the failure


def test_card_metadata_parses_with_huggingface_hub_and_holds_the_taus(tmp_path: Path) -> None:
    """The card's model-index front matter is what the hub reads: huggingface_hub's own ModelCard parser finds one
    acceptance-length result per benchmark and temperature, with the eval file's values."""
    from huggingface_hub import ModelCard

    run = make_run(tmp_path, "mlp")
    results = _eval_file(tmp_path / "eval.json", run)
    export_draft(run, tmp_path / "out", eval_results=results, repo_id="me/mlp-smollm2")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    got = {(r.dataset_name, r.metric_config): r.metric_value for r in card.data.eval_results}
    rows = json.loads(results.read_text())["rows"]
    want = {({"mtbench": "MT-Bench", "humaneval": "HumanEval", "gsm8k": "GSM8K"}[r["benchmark"]],
             f"temperature={r['temperature']:g}"): round(r["tau"], 3)
            for r in rows if r["draft"] == "lk" and r["benchmark"] != "mean" and r["rule"] == "sampled"}
    assert got == want and len(got) == 6 == len(card.data.eval_results)  # no (benchmark, T) listed twice
    assert {r.task_type for r in card.data.eval_results} == {"speculative-decoding"}
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.license == "apache-2.0"
    assert "@inproceedings{samarin2026lk" in card.text and "arXiv:2404.19124" in card.text


def test_exported_files_hold_no_local_absolute_path(tmp_path: Path) -> None:
    """Cards and provenance are published: neither the export's nor the data's nor the run's path may appear."""
    run = make_run(tmp_path, "medusa-bias")
    results = _eval_file(tmp_path / "eval.json", run)
    out = tmp_path / "out"
    export_draft(run, out, eval_results=results)
    text = {f.name: f.read_text() for f in out.iterdir() if f.suffix in (".md", ".json")}
    for name, body in text.items():
        for path in (str(out.resolve()), str(tmp_path.resolve()), str(run.resolve()), DATA["features"]):
            assert path not in body, (name, path)
    assert '"model": "."' in text["README.md"] and "is the folder holding this card" in text["README.md"]


def test_card_compares_every_draft_of_the_evaluation(tmp_path: Path) -> None:
    """An eval file with several drafts (kl, lk, ngram) puts them side by side on the card, with the paired
    difference of this draft against the others and whether its CI excludes zero."""
    run = make_run(tmp_path, "mlp")
    results = _eval_file(tmp_path / "eval.json", run)
    data = json.loads(results.read_text())
    for lab, shift in (("kl", -0.2), ("ngram", -0.5)):
        data["rows"] += [{**r, "draft": lab, "draft_path": f"/x/{lab}", "tau": r["tau"] + shift,
                          "ci95": [r["ci95"][0] + shift, r["ci95"][1] + shift]}
                         for r in data["rows"] if r["draft"] == "lk"]
    data["differences"] = [{"draft": "lk", "baseline": "kl", "benchmark": "mean", "temperature": 1.0,
                            "rule": "sampled", "delta_tau": 0.2, "ci95": [0.15, 0.25]}]
    results.write_text(json.dumps(data))
    export_draft(run, tmp_path / "out", eval_results=results, eval_draft="lk")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "| **lk** (this draft) | 2.233 [2.18, 2.28] |" in card
    assert "| `kl` | 2.033 [1.98, 2.08] |" in card and "| `ngram` |" in card
    assert "`lk` − `kl` = +0.2000 tokens, 95% CI [+0.1500, +0.2500] (excludes 0)" in card


def test_the_card_says_which_benchmark_prompts_trained_the_draft() -> None:
    from lkspec.export.card_facts import data_words

    part = {"prompts": {"source": "bench:mtbench,gsm8k", "skip": 40}, "settings": {"temperature": 0.0},
            "counts": {"rows": 60}}
    words = data_words({"source": {"parts": [part, {"prompts": {"source": "sharegpt"}, "counts": {"rows": 5}}]},
                        "num_docs": 65, "num_tokens": 1000}, "T")
    assert "60 T's own answers to `bench:mtbench,gsm8k` prompts past the first 40 at T = 0" in words
    assert "5 T's own answers to `sharegpt` prompts —" in words  # no skip, no "past"
