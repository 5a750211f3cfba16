"""The demo draft's training step with and without its two shortcuts, side by side in one process.

    python benchmarks/train_paths.py                    # embedded shapes, the demo's MLP-Speculator, 1024 tokens/step
    python benchmarks/train_paths.py --tokens 2048 --steps 5

The demo trains a target-initialised MLP-Speculator (inner 2 x hidden, tied, frozen vocabulary tensors, an
8192-token map) with lk_hybrid. Two things make its step cheaper than its shapes suggest:

* `MirroredHead`: a target-initialised head is [A, -A], so W s = A (s_1 - s_2) costs half the multiply-adds. The
  "full" rows give the same draft one nudged head entry, which breaks the form and so runs the full projection
  with exactly the same shapes.
* `loss.impl fused`: the (KL, alpha) kernel compiled by torch.compile instead of the eager chunked twin.

Each configuration runs `StepRunner.accumulate` plus an AdamW step on the same random features, exactly as
`lkspec train` does; medians over --steps after one warm-up step (which also compiles the fused kernel),
configurations interleaved round-robin so a busy machine slows them alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lkspec.drafts import build_draft
from lkspec.train.step import StepRunner, head_modules
from vocab_throughput import RandomHead, random_micro_batch


def demo_draft(H: int, V: int, N: int, mirrored: bool) -> torch.nn.Module:
    d = build_draft("mlp_speculator", seed=0, hidden_size=H, vocab_size=V, num_heads=6, draft_vocab_size=N,
                    inner_dim=2 * H, tie_weights=True)
    d.set_token_map(torch.randperm(V, generator=torch.Generator().manual_seed(1))[:N])
    with torch.no_grad():  # the target-initialised form of the (tied) head
        a = d.head[0].weight[:, :H].clone()
        d.head[0].weight.copy_(torch.cat([a, -a], 1))
        if not mirrored:
            d.head[0].weight[0, 0] += 1e-3
    for p in d.vocab_parameters():
        p.requires_grad_(False)
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per step (one micro-batch)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192, help="draft vocabulary (token map) size")
    args = ap.parse_args()
    H, V = 576, 49152
    head = RandomHead(V, H)
    mb = random_micro_batch(args.tokens, H, V, head)
    runs = {}
    for mirrored in (False, True):
        for impl in ("chunked", "fused"):
            d = demo_draft(H, V, args.vocab, mirrored)
            params = [p for p in dict.fromkeys(d.parameters()) if p.requires_grad]
            runner = StepRunner(d, head, head_modules(d), loss="lk_hybrid", eta=3.0, gamma=0.8, temperature=1.0,
                                impl=impl, micro_batch_tokens=args.tokens)
            runs[(mirrored, impl)] = (runner, torch.optim.AdamW(params, lr=1e-4), [])
    for step in range(args.steps + 1):
        for runner, opt, times in runs.values():
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            runner.accumulate([mb])
            opt.step()
            if step:
                times.append(time.perf_counter() - t0)
    base = args.tokens / statistics.median(runs[(False, "chunked")][2])
    print(f"demo MLP-Speculator (H {H}, inner {2 * H}, tied, frozen, {args.vocab}-token map), lk_hybrid, "
          f"{args.tokens} tokens/step, median of {args.steps} steps, {torch.get_num_threads()} threads")
    rows = []
    for (mirrored, impl), (_, _, times) in runs.items():
        tps = args.tokens / statistics.median(times)
        rows.append({"head": "mirrored" if mirrored else "full", "loss_impl": impl, "tokens_per_s": tps,
                     "vs_full_chunked": tps / base})
        print(f"head {'mirrored' if mirrored else 'full':8s}  loss {impl:7s}  {tps:8.1f} tok/s  {tps / base:5.2f}x")
    print(json.dumps({"tokens": args.tokens, "vocab": args.vocab, "rows": rows}))


if __name__ == "__main__":
    main()
