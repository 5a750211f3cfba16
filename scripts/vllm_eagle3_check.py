"""Load lkspec's EAGLE-3 exports (native and speculators layouts) with vLLM's own Eagle3LlamaForCausalLM on CPU.

Run by scripts/vllm_check.py (through scripts/check_vllm_load.sh). vLLM's attention kernel cannot run on this CPU
build, so the one module without weights, `Attention`, is replaced by plain softmax attention over a cache it keeps
(causal over the context, then one query per drafted step, as vLLM's proposer runs it); every module with weights
(fc, the norms, the stacked qkv and gate_up projections, RoPE, o_proj, the MLP, lm_head, LogitsProcessor, d2t) is
vLLM's own. Checked: every vLLM parameter loaded from our tensors (t2d is skipped by vLLM's loader by design), none
of ours ignored, and vLLM's logits of step 1 at every position and of a whole K-step chain at one anchor equal
lkspec's teacher-forced heads.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import torch

from lkspec.drafts import build_draft, load_draft
from lkspec.export import export_draft
from lkspec.targets import TargetIdentity

# (label, draft config, export dtype, format)
CASES = [
    ("EAGLE-3 native, full vocab", {}, "fp32", "vllm"),
    ("EAGLE-3 native, token map", {"draft_vocab_size": 300}, "fp32", "vllm"),
    ("EAGLE-3 speculators, token map", {"draft_vocab_size": 300}, "fp32", "speculators"),
    ("EAGLE-3 native bf16", {"draft_vocab_size": 300}, "bf16", "vllm"),
]


class CachedAttention(torch.nn.Module):
    """Stands in for vLLM's `Attention` (no weights): softmax attention of q over the cached keys and its own."""

    cache: tuple[torch.Tensor, torch.Tensor] | None = None
    mode = "context"  # "context": the N tokens are positions 0..N-1, causal, and become the cache
    anchor = 0  # "chain": one query that sees the cache up to the anchor plus the chain's own earlier keys
    chain: list[tuple[torch.Tensor, torch.Tensor]] = []  # noqa: RUF012 (shared by every layer's instance)

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None, **_: object):
        super().__init__()
        self.nh, self.d, self.scale, self.nkv = num_heads, head_size, scale, num_kv_heads or num_heads

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        N = q.shape[0]
        rep = self.nh // self.nkv
        q = q.view(N, self.nh, self.d).transpose(0, 1)
        k = k.view(N, self.nkv, self.d).transpose(0, 1).repeat_interleave(rep, 0)
        v = v.view(N, self.nkv, self.d).transpose(0, 1).repeat_interleave(rep, 0)
        cls = type(self)
        if cls.mode == "context":
            cls.cache, cls.chain = (k, v), []
            mask = torch.ones(N, N, dtype=torch.bool).tril()
        else:
            ck, cv = cls.cache  # type: ignore[misc]
            cls.chain.append((k, v))
            k = torch.cat([ck[:, : cls.anchor + 1], *(c[0] for c in cls.chain)], 1)
            v = torch.cat([cv[:, : cls.anchor + 1], *(c[1] for c in cls.chain)], 1)
            mask = torch.ones(N, k.shape[1], dtype=torch.bool)
        s = (q @ k.transpose(-1, -2)) * self.scale
        o = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v
        return o.transpose(0, 1).reshape(N, self.nh * self.d)


def random_eagle3(hidden: int, vocab: int, cfg: dict, seed: int):
    d = build_draft("eagle3", hidden_size=hidden, vocab_size=vocab, seed=seed, num_heads=4, aux_layers=[2, 5, 8],
                    num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, intermediate_size=2 * hidden,
                    rope_theta=50000.0, rms_norm_eps=1e-5, **cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.2 if p.dim() > 1 else 0.3) + (1.0 if p.dim() == 1 else 0))
    if d.token_map is not None:
        d.set_token_map(torch.randperm(vocab, generator=g)[: d.config.head_rows])
    return d


def vllm_slice(name: str, model) -> torch.Tensor | None:
    """The part of vLLM's parameter our tensor `name` was loaded into (its stacked qkv / gate_up included)."""
    params = dict(model.named_parameters())
    if name == "d2t":
        return params.get("draft_id_to_target_id")
    n = name.replace("midlayer.", "layers.0.", 1)
    n = n if n.startswith("lm_head") else "model." + n
    attn = model.model.layers[0].self_attn
    for part, (stacked, rows) in {
        ".q_proj.": (".qkv_proj.", (0, attn.q_size)),
        ".k_proj.": (".qkv_proj.", (attn.q_size, attn.q_size + attn.kv_size)),
        ".v_proj.": (".qkv_proj.", (attn.q_size + attn.kv_size, attn.q_size + 2 * attn.kv_size)),
    }.items():
        if part in n:
            return params[n.replace(part, stacked)][rows[0] : rows[1]]
    mlp = model.model.layers[0].mlp.gate_up_proj
    half = mlp.weight.shape[0] // 2
    if ".gate_proj." in n:
        return params[n.replace(".gate_proj.", ".gate_up_proj.")][:half]
    if ".up_proj." in n:
        return params[n.replace(".up_proj.", ".gate_up_proj.")][half:]
    return params.get(n)


def run_eagle3_case(label: str, cfg: dict, dtype: str, fmt: str, work: Path, hidden: int, vocab: int,
                    seed: int) -> dict:
    import vllm.model_executor.models.llama as vllm_llama
    from safetensors.torch import load_file
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.model_loader.weight_utils import safetensors_weights_iterator
    from vllm.model_executor.models.llama_eagle3 import Eagle3LlamaForCausalLM
    from vllm.transformers_utils.config import get_config

    t0 = time.time()
    tag = label.lower().replace(" ", "-").replace(",", "")
    target = TargetIdentity(name="smollm2-135m-instruct", vocab_size=vocab, hidden_size=hidden, tokenizer_hash="0" * 64)
    src = random_eagle3(hidden, vocab, cfg, seed)
    run = src.save(work / f"run-{tag}", target=target)
    out = work / f"export-{tag}"
    export_draft(run, out, dtype=dtype, fmt=fmt, base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
                 base_model_archs=["LlamaForCausalLM"])
    files = sorted(out.glob("*.safetensors"))
    ours = {k: v for f in files for k, v in load_file(str(f)).items()}
    hf = get_config(str(out), trust_remote_code=False)
    vllm_llama.Attention = CachedAttention  # the only module without weights (see the module docstring)
    vc = VllmConfig()
    draft_model = SimpleNamespace(hf_config=hf, quantization=None, hf_text_config=hf)
    vc.speculative_config = SimpleNamespace(draft_model_config=draft_model, parallel_drafting=False)  # type: ignore
    vc.model_config = SimpleNamespace(get_total_num_hidden_layers=lambda: 30, get_vocab_size=lambda: vocab,  # type: ignore
                                      dtype=torch.float32, head_dtype=torch.float32)
    problems: list[str] = []
    with set_current_vllm_config(vc):
        model = Eagle3LlamaForCausalLM(vllm_config=vc).float()
        params = dict(model.named_parameters())
        with torch.no_grad():  # its load_weights returns nothing here: a parameter still NaN was not loaded
            for t in params.values():
                t.fill_(-(2**40)) if not t.is_floating_point() else t.fill_(float("nan"))
        model.load_weights(safetensors_weights_iterator([str(f) for f in files], use_tqdm_on_load=False))
        missing = [n for n, t in params.items()
                   if (t.isnan().any() if t.is_floating_point() else (t == -(2**40)).any())]
        if missing:
            problems.append(f"not loaded: {missing}")
        loaded = [n for n in params if n not in missing]
        took = {n for n in ours if n != "t2d"}
        for name in sorted(took):  # and every tensor of ours is in a vLLM parameter, values equal
            value, where = ours[name].float(), vllm_slice(name, model)
            if where is None or not torch.equal(where[: value.shape[0]].float(), value):  # vLLM pads vocab rows
                problems.append(f"our {name} is not what vLLM loaded ({'no parameter' if where is None else 'values'})")
        for module in model.modules():
            qm = getattr(module, "quant_method", None)
            if qm is not None and hasattr(qm, "process_weights_after_loading"):
                qm.process_weights_after_loading(module)
        g = torch.Generator().manual_seed(seed + 1)
        T, K, anchor = 12, src.num_heads, 6
        aux = torch.randn(T, 3 * hidden, generator=g)
        ids = torch.randint(0, vocab, (1, T + K), generator=g)
        ref = load_draft(out)  # lkspec's import of the same directory (the weights as exported)
        with torch.no_grad():
            lk = ref(aux[None], ids[:, :T])  # head k -> [1, T-k, V]
            CachedAttention.mode = "context"
            x = model.model.fc(aux)
            pos = torch.arange(T - 1)
            # step 1 at positions 0..T-2, pairs (aux_t, y_{t+1}); the undecorated forward (no torch.compile)
            post, pre = model.model.forward(ids[0, 1:T], pos, x[: T - 1])
            theirs1 = model.compute_logits(post)
            chain = [theirs1[anchor]]
            CachedAttention.mode, CachedAttention.anchor = "chain", anchor
            h = pre[anchor : anchor + 1]
            for j in range(2, K + 1):  # teacher-forced: step j reads y_{anchor+j} at position anchor + j - 1
                post, h = model.model.forward(ids[0, anchor + j : anchor + j + 1], torch.tensor([anchor + j - 1]), h)
                chain.append(model.compute_logits(post)[0])
    kept = src.token_map if src.token_map is not None else torch.arange(vocab)
    a1, b1 = lk[0][0][:, kept], theirs1[:, kept]
    gaps = [((a1 - b1).abs().max() / a1.abs().max()).item()]
    for k in range(2, K + 1):
        a, b = lk[k - 1][0, anchor, kept], chain[k - 1][kept]
        gaps.append(((a - b).abs().max() / a.abs().max()).item())
    gap = max(gaps)
    if src.token_map is not None:
        off = torch.ones(vocab, dtype=torch.bool)
        off[kept] = False
        if torch.isfinite(theirs1[:, off]).any():
            problems.append("vLLM gives a finite logit to a token outside the token map")
    if gap > 1e-4:
        problems.append(f"vLLM vs lkspec import: rel gap {gap:.2e} (per head {[f'{x:.1e}' for x in gaps]})")
    return {"case": label, "method": "eagle3", "format": fmt, "dtype": dtype, "heads": K, "vllm_params": len(params),
            "loaded": len(loaded), "our_tensors": len(ours), "ignored_tied_copies": len(ours) - len(took),
            "rel_gap_vs_lkspec_import": gap, "rel_gap_vs_source_draft": float("nan"), "ok": not problems,
            "problems": problems, "seconds": round(time.time() - t0, 2)}
