"""Load lkspec exports with vLLM 0.32.0's own `MLPSpeculator`, `Medusa` and `Eagle3LlamaForCausalLM` classes on CPU.

Run through scripts/check_vllm_load.sh (it builds the venv with vLLM and sets VLLM_TARGET_DEVICE=cpu).
For each case: export a random draft with `lkspec.export.export_draft`, read the directory with vLLM's own
`get_config`, build vLLM's class the way its SpeculativeConfig does (num_lookahead_tokens =
num_speculative_tokens), feed `load_weights` our safetensors file, then check

1. every vLLM parameter was loaded (its returned set covers `named_parameters()`), from our values;
2. no tensor of ours was silently ignored (only tied copies equal to the tensor vLLM loaded in their place);
3. vLLM's per-head logits equal lkspec's on the same inputs (first vocab_size columns; vLLM pads rows to 64).

vLLM 0.32's MLPSpeculator has no forward any more (serving it needs vLLM <= 0.9.2), so its heads are
recomputed with its own modules and constants exactly as 0.9.2's `generate_proposals` does, teacher-forced;
MEDUSA goes through `Medusa.forward` + `compute_logits`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

import torch

from lkspec.drafts import build_draft, load_draft
from lkspec.drafts.vllm_names import tied_source
from lkspec.export import export_draft
from lkspec.targets import TargetIdentity

# (label, arch, draft config, export dtype, exported heads)
CASES = [
    ("MLP untied", "mlp_speculator", {"inner_dim": 48}, "fp32", None),
    ("MLP tied + scale_input", "mlp_speculator", {"inner_dim": 48, "tie_weights": True, "scale_input": True},
     "fp32", None),
    ("MLP untied, 4 of 6 heads", "mlp_speculator", {"inner_dim": 48}, "fp32", 4),
    ("MLP tied, 3 of 6 heads", "mlp_speculator", {"inner_dim": 48, "tie_weights": True}, "fp32", 3),
    ("MLP untied bf16", "mlp_speculator", {"inner_dim": 48}, "bf16", None),
    ("MEDUSA bias, 2 layers", "medusa", {"num_layers": 2, "bias": True}, "fp32", None),
    ("MEDUSA no bias", "medusa", {"bias": False}, "fp32", None),
    ("MEDUSA bias, 3 of 6 heads", "medusa", {"bias": True}, "fp32", 3),
    ("MEDUSA no bias fp16", "medusa", {"bias": False}, "fp16", None),
    # a truncated draft vocabulary (token map): MLP exported as its exact full-vocabulary twin
    ("MLP tied, token map", "mlp_speculator", {"inner_dim": 48, "tie_weights": True, "draft_vocab_size": 300},
     "fp32", None),
]
# (vLLM 0.32 cannot load a token map into untied MEDUSA heads: `lkspec export` refuses that case with a message)


def random_draft(arch: str, hidden: int, vocab: int, cfg: dict, seed: int):
    d = build_draft(arch, hidden_size=hidden, vocab_size=vocab, seed=seed, **cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.parameters():  # MEDUSA starts at identity blocks: give every path non-trivial weights
            p.copy_(torch.randn(p.shape, generator=g) * 0.2 + (1.0 if p.dim() == 1 else 0.0))
    if d.token_map is not None:
        d.set_token_map(torch.randperm(vocab, generator=g)[: d.config.head_rows])
    return d


def vllm_name(method: str, name: str, model) -> str:
    """vLLM 0.32's own mapping (load_weights), applied by hand to tell which of our tensors each param took."""
    if method == "mlp_speculator":
        return name.replace("speculator.", "")
    return model._remap_old_checkpoint_key(name.replace("medusa_heads.", ""))


def mlp_heads(model, hidden: torch.Tensor, ids: torch.Tensor, n: int, vocab: int) -> list[torch.Tensor]:
    """vLLM's MLPSpeculator math with its own modules and constants (0.9.2 generate_proposals), teacher-forced."""
    B, T, _ = hidden.shape
    state = hidden
    if model.scale_input:
        state = model.ln0(state) / math.sqrt(2)
    out = []
    for i in range(n):
        m = T - (i + 1)
        z = model.emb[i](ids[:, i + 1 : i + 1 + m])
        s = model.proj[i](state[:, :m])
        s = s.add(z, alpha=model.emb_weight / model.state_weight)
        state = model.activation(model.ln[i](s))
        logits = model.logits_processor(model.head[i], state.reshape(B * m, -1))
        out.append(logits.reshape(B, m, -1)[..., :vocab])
    return out


def medusa_heads(model, hidden: torch.Tensor, n: int, vocab: int) -> list[torch.Tensor]:
    B, T, H = hidden.shape
    logits = model.compute_logits(model(hidden.reshape(B * T, H)))
    assert len(logits) == n, (len(logits), n)
    return [lg.reshape(B, T, -1)[:, : T - k, :vocab] for k, lg in enumerate(logits, 1)]


def rel_gap(a: list[torch.Tensor], b: list[torch.Tensor], cols: torch.Tensor | None = None) -> float:
    """Max relative logit gap over the heads (over the token map's columns when `cols` is given)."""
    assert len(a) == len(b), (len(a), len(b))
    if cols is not None:
        a, b = [x[..., cols] for x in a], [y[..., cols] for y in b]
    return max(((x.double() - y.double()).abs().max() / x.double().abs().max()).item()
               for x, y in zip(a, b, strict=True))


def run_case(label: str, arch: str, cfg: dict, dtype: str, heads: int | None, work: Path, hidden_size: int,
             vocab: int, seed: int) -> dict:
    from safetensors.torch import load_file
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.model_loader.weight_utils import safetensors_weights_iterator
    from vllm.model_executor.models.medusa import Medusa
    from vllm.model_executor.models.mlp_speculator import MLPSpeculator
    from vllm.transformers_utils.config import get_config

    t0 = time.time()
    tag = label.lower().replace(" ", "-").replace(",", "").replace("+", "plus")
    target = TargetIdentity(name="smollm2-135m-instruct", vocab_size=vocab, hidden_size=hidden_size,
                            tokenizer_hash="0" * 64)
    src = random_draft(arch, hidden_size, vocab, cfg, seed)
    run = src.save(work / f"run-{tag}", target=target)
    out = work / f"export-{tag}"
    export_draft(run, out, dtype=dtype, num_speculative_tokens=heads)
    n = heads or src.num_heads
    files = sorted(out.glob("*.safetensors"))
    ours = {k: v for f in files for k, v in load_file(str(f)).items()}

    hf = get_config(str(out), trust_remote_code=False)
    hf.num_lookahead_tokens = n  # what SpeculativeConfig does with num_speculative_tokens
    method = hf.model_type
    with set_current_vllm_config(VllmConfig()):
        if method == "mlp_speculator":
            model = MLPSpeculator(vllm_config=SimpleNamespace(model_config=SimpleNamespace(hf_config=hf)))
        else:
            ns = SimpleNamespace(speculative_config=SimpleNamespace(draft_model_config=SimpleNamespace(hf_config=hf)))
            model = Medusa(vllm_config=ns)
        params = dict(model.named_parameters())
        loaded = model.load_weights(safetensors_weights_iterator([str(f) for f in files], use_tqdm_on_load=False))
        problems = []
        if set(params) - set(loaded):
            problems.append(f"not loaded: {sorted(set(params) - set(loaded))}")
        ignored = []
        for name, t in ours.items():
            target_name = vllm_name(method, name, model)
            if target_name in loaded:
                p = params[target_name].data
                if not torch.equal(p[: t.shape[0]].to(t.dtype), t):
                    problems.append(f"{target_name} holds other values than our {name}")
                continue
            src_name = tied_source(name) if method == "mlp_speculator" and hf.tie_weights else None
            if src_name is None or not torch.equal(ours[name], ours[src_name]):
                problems.append(f"silently ignored: {name}")
            ignored.append(name)
        for module in model.modules():  # what vLLM's loader does after load_weights (CPU GEMM dispatch)
            qm = getattr(module, "quant_method", None)
            if qm is not None and hasattr(qm, "process_weights_after_loading"):
                qm.process_weights_after_loading(module)
        g = torch.Generator().manual_seed(seed + 1)
        B, T = 2, n + 5
        hidden = torch.randn(B, T, hidden_size, generator=g)
        ids = torch.randint(0, vocab, (B, T), generator=g)
        with torch.no_grad():
            theirs = (mlp_heads(model, hidden, ids, n, vocab) if method == "mlp_speculator"
                      else medusa_heads(model, hidden, n, vocab))
            lk = load_draft(out)(hidden, ids)  # lkspec's import of the same directory
            original = src(hidden, ids)[:n]  # the fp32 draft before export
    kept = src.token_map  # a truncated source scores only its kept tokens (the rest is -inf / -30000)
    gap = rel_gap(lk, theirs, kept)
    gap_src = rel_gap(original, theirs, kept)
    if kept is not None:  # and every other token must be out of reach in vLLM's heads too
        off = torch.ones(vocab, dtype=torch.bool)
        off[kept] = False
        worst = max(float(t[..., off].max()) for t in theirs)
        if worst > -1e3:
            problems.append(f"vLLM gives a token outside the map logit {worst:.3g}")
    tol_src = {"fp32": 1e-5, "bf16": 3e-2, "fp16": 5e-3}[dtype]
    if gap > 1e-5:
        problems.append(f"vLLM vs lkspec import: rel gap {gap:.2e}")
    if gap_src > tol_src:
        problems.append(f"vLLM vs original draft: rel gap {gap_src:.2e} > {tol_src}")
    return {"case": label, "method": method, "dtype": dtype, "heads": n, "vllm_params": len(params),
            "loaded": len(loaded), "our_tensors": len(ours), "ignored_tied_copies": len(ignored),
            "rel_gap_vs_lkspec_import": gap, "rel_gap_vs_source_draft": gap_src, "ok": not problems,
            "problems": problems, "seconds": round(time.time() - t0, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=64, help="target hidden size of the random drafts (576 = SmolLM2)")
    ap.add_argument("--vocab", type=int, default=1000, help="vocab size (not a multiple of 64: exercises padding)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    t0 = time.time()
    import vllm
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    print(f"vLLM {vllm.__version__}, torch {torch.__version__} (import {time.time() - t0:.1f} s)", flush=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with set_current_vllm_config(VllmConfig()):
        init_distributed_environment(world_size=1, rank=0, local_rank=0,
                                     distributed_init_method=f"tcp://127.0.0.1:{port}", backend="gloo")
        initialize_model_parallel(1, 1)
    results = []
    with tempfile.TemporaryDirectory(prefix="lkspec-vllm-") as tmp:
        for i, (label, arch, cfg, dtype, heads) in enumerate(CASES):
            r = run_case(label, arch, cfg, dtype, heads, Path(tmp), args.hidden, args.vocab, args.seed + i)
            results.append(r)
            status = "OK  " if r["ok"] else "FAIL"
            print(f"{status} {label:28s} loaded {r['loaded']}/{r['vllm_params']} params from {r['our_tensors']} "
                  f"tensors ({r['ignored_tied_copies']} tied copies skipped); max rel logit gap vs lkspec "
                  f"{r['rel_gap_vs_lkspec_import']:.1e}, vs source draft {r['rel_gap_vs_source_draft']:.1e}"
                  + ("" if r["ok"] else f"  {r['problems']}"), flush=True)
        sys.path.insert(0, str(Path(__file__).parent))
        from vllm_eagle3_check import CASES as EAGLE3_CASES
        from vllm_eagle3_check import run_eagle3_case

        for i, (label, cfg, dtype, fmt) in enumerate(EAGLE3_CASES):
            r = run_eagle3_case(label, cfg, dtype, fmt, Path(tmp), args.hidden, args.vocab, args.seed + 100 + i)
            results.append(r)
            print(f"{'OK  ' if r['ok'] else 'FAIL'} {label:32s} loaded {r['loaded']}/{r['vllm_params']} params from "
                  f"{r['our_tensors']} tensors (t2d skipped by vLLM: {r['ignored_tied_copies']}); max rel logit gap "
                  f"vs lkspec (step 1 everywhere, a {r['heads']}-step chain) {r['rel_gap_vs_lkspec_import']:.1e}"
                  + ("" if r["ok"] else f"  {r['problems']}"), flush=True)
    ok = all(r["ok"] for r in results)
    summary = {"vllm": vllm.__version__, "torch": torch.__version__, "hidden": args.hidden, "vocab": args.vocab,
               "ok": ok, "seconds": round(time.time() - t0, 1), "cases": results}
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{'ALL OK' if ok else 'FAILED'}: {sum(r['ok'] for r in results)}/{len(results)} cases "
          f"({time.time() - t0:.1f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
