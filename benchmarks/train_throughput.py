"""Training throughput (tokens/s) and MFU of the real training step, MLP-Speculator vs MEDUSA.

    python benchmarks/train_throughput.py                     # embedded shapes (H 576, V 49152) on CPU
    python benchmarks/train_throughput.py --shapes llama8b    # H 4096, V 128256 (needs a GPU)
    python benchmarks/train_throughput.py --tokens 1024 --steps 5 --inner-dim 256

Each configuration runs `StepRunner.accumulate` (teacher logits from a frozen lm_head, draft trunk, heads
one at a time, loss, backward) plus an AdamW step on random features, exactly as `lkspec train` does,
side by side in one process; times are medians over --steps after one warm-up step.

FLOPs per training token (stated, counted for the matmuls only):
    6 * (P_trunk + P_heads)  +  2 * H * V
where P_heads = sum_k V * D_k (each head's vocabulary projection, D_k = inner_dim or H), P_trunk = the
trunk's matmul weights (MLP: H*inner + (K-1)*inner^2; MEDUSA: K * layers * H^2), the factor 6 = 2 (a
multiply-add) x 3 (forward + two backward matmuls), and 2*H*V is the frozen target lm_head (forward only).
Embedding lookups, norms and the softmax-type loss work are not counted (they are memory-bound), so MFU
understates the time the loss takes. MFU = achieved FLOP/s / peak: on CPU the peak is *measured* (an fp32
2048^3 matmul in the same process); on a GPU it is the vendor's dense bf16 peak where known.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass

import torch

from lkspec.drafts import build_draft
from lkspec.train.batching import MicroBatch
from lkspec.train.step import StepRunner, head_modules

SHAPES = {"embedded": (576, 49152), "llama8b": (4096, 128256)}
GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "L4": 121e12}


@dataclass
class LMHead:
    """A random frozen lm_head standing in for the target's (only `logits_from_hidden` is used)."""

    weight: torch.Tensor

    def logits_from_hidden(self, h: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(h.to(self.weight.dtype), self.weight).float()


def flops_per_token(arch: str, H: int, V: int, K: int, inner: int, layers: int) -> float:
    if arch == "mlp_speculator":
        trunk, heads = H * inner + (K - 1) * inner * inner, K * V * inner
    else:
        trunk, heads = K * layers * H * H, K * V * H
    return 6.0 * (trunk + heads) + 2.0 * H * V


def peak_flops(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in GPU_PEAK_BF16.items():
            if key in name:
                return peak, f"{name} dense bf16 spec"
    n = 2048 if device.type == "cpu" else 8192
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(3):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times), f"measured {dtype} {n}^3 matmul"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(arch: str, impl: str, *, H: int, V: int, K: int, inner: int, layers: int, tokens: int, steps: int,
          device: torch.device, autocast: torch.dtype | None) -> dict[str, float]:
    opts = {"inner_dim": inner} if arch == "mlp_speculator" else {"num_layers": layers}
    draft = build_draft(arch, seed=0, hidden_size=H, vocab_size=V, num_heads=K, **opts).to(device)
    g = torch.Generator().manual_seed(0)
    head = LMHead((torch.randn(V, H, generator=g) / H**0.5).to(device, autocast or torch.float32))
    mb = MicroBatch(hidden=torch.randn(1, tokens, H, generator=g), input_ids=torch.randint(0, V, (1, tokens),
                    generator=g), loss_mask=torch.ones(1, tokens, dtype=torch.bool),
                    doc_ids=torch.zeros(1, tokens, dtype=torch.int64), own=torch.ones(1, tokens, dtype=torch.bool))
    runner = StepRunner(draft, head, head_modules(draft), loss="lk_hybrid", eta=3.0, gamma=0.8, temperature=1.0,
                        impl=impl, micro_batch_tokens=tokens, device=device, autocast_dtype=autocast)
    opt = torch.optim.AdamW(draft.parameters(), lr=1e-4, betas=(0.9, 0.95))
    times = []
    for i in range(steps + 1):
        sync(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        sums = runner.accumulate([mb])
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 0.5)
        opt.step()
        sync(device)
        if i:  # the first step warms up allocators and kernels
            times.append(time.perf_counter() - t0)
    anchors = sum(sums.counts()) / K  # valid anchors per head ~ tokens
    dt = statistics.median(times)
    return {"seconds": dt, "tokens_per_s": anchors / dt,
            "flops_per_s": flops_per_token(arch, H, V, K, inner, layers) * anchors / dt,
            "params": float(draft.num_parameters())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", choices=[*SHAPES, "auto"], default="auto",
                    help="auto: embedded on CPU, embedded + llama8b on a GPU")
    ap.add_argument("--tokens", type=int, default=512, help="tokens per step (one micro-batch)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after 1 warm-up)")
    ap.add_argument("--inner-dim", type=int, default=256, help="MLP-Speculator stage width at embedded shapes")
    ap.add_argument("--inner-dim-8b", type=int, default=1024, help="MLP-Speculator stage width at Llama-8B shapes")
    ap.add_argument("--layers", type=int, default=1, help="MEDUSA residual blocks per head")
    ap.add_argument("--heads", type=int, default=6, help="K")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    shapes = ["embedded", "llama8b"] if args.shapes == "auto" and device.type == "cuda" else (
        ["embedded"] if args.shapes == "auto" else [args.shapes])
    if "llama8b" in shapes and device.type != "cuda":
        raise SystemExit("llama8b shapes need a GPU (a CPU step would take minutes); use --shapes embedded")
    if args.shapes == "auto" and device.type != "cuda":
        print("llama8b shapes (H 4096, V 128256) skipped: no CUDA device; they run (with MFU) on a GPU")
    autocast = torch.bfloat16 if device.type == "cuda" else None
    peak, peak_note = peak_flops(device)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, "
          f"{torch.get_num_threads()} threads), precision {'bf16 autocast' if autocast else 'fp32'}, "
          f"peak {peak / 1e9:.1f} GFLOP/s ({peak_note})")
    rows = []
    for shape in shapes:
        H, V = SHAPES[shape]
        inner = args.inner_dim if shape == "embedded" else args.inner_dim_8b
        for arch, impl in (("mlp_speculator", "chunked"), ("mlp_speculator", "reference"), ("medusa", "chunked")):
            r = bench(arch, impl, H=H, V=V, K=args.heads, inner=inner, layers=args.layers, tokens=args.tokens,
                      steps=args.steps, device=device, autocast=autocast)
            r.update(shape=shape, arch=arch, impl=impl, mfu=r["flops_per_s"] / peak)
            rows.append(r)
            print(f"{shape:9s} {arch:15s} {impl:9s} {r['tokens_per_s']:9.1f} tok/s  "
                  f"{r['flops_per_s'] / 1e9:8.1f} GFLOP/s  MFU {100 * r['mfu']:5.1f}%  "
                  f"({r['params'] / 1e6:.1f}M params, {r['seconds']:.2f} s/step)")
        by = {(r["shape"], r["arch"], r["impl"]): r for r in rows if r["shape"] == shape}
        mlp, ref, med = (by[(shape, "mlp_speculator", "chunked")], by[(shape, "mlp_speculator", "reference")],
                         by[(shape, "medusa", "chunked")])
        print(f"{shape}: MLP/MEDUSA tokens/s {mlp['tokens_per_s'] / med['tokens_per_s']:.2f}x; "
              f"chunked/reference loss tokens/s {mlp['tokens_per_s'] / ref['tokens_per_s']:.2f}x")
    print(json.dumps({"device": str(device), "peak_flops": peak, "tokens": args.tokens, "rows": rows}))


if __name__ == "__main__":
    main()
