"""EAGLE-3's training step on a packed row: scores per document against scores over the whole row.

    python benchmarks/eagle3_step.py                       # embedded shapes, 2048-token rows of 256-token documents
    python benchmarks/eagle3_step.py --doc-tokens 128 512 --steps 5

A micro-batch packs several documents into one row. Until 2026-12-07 `Eagle3.head_states` scored every query
against every key of the row and masked the other documents out: [T, T] scores per head and step, as if the row
were one document. It now scores each document against itself (`llama_layer.document_attention`). The row-sized
case is exactly the old cost, so this runs the same draft, features and loss on the same row twice: once
declared as one document (the old work) and once cut into documents of --doc-tokens (the demo's documents
average ~250 tokens with the prompt). `StepRunner.accumulate` plus an AdamW step, as `lkspec train` runs it
(lk_hybrid, the fused loss kernel, an 8192-token map, the target-initialised draft's frozen head and fc);
medians over --steps after one warm-up step, configurations interleaved round-robin; ratios against the first
--precision's whole-row case.

`--precision fp32 bf16` shows what bf16 autocast gives on a CPU with AMX at these fixed shapes (1.77x on the
2-core reference host, 2026-12-07). In real training every step and head has other row counts, and oneDNN builds
its bf16 kernels per shape: the demo's EAGLE-3 training ran 2.56 s/step in bf16 against ~1.7 in fp32, so the demo
keeps fp32.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per packed row (data.micro_batch_tokens)")
    ap.add_argument("--doc-tokens", type=int, nargs="+", default=[256], help="document lengths to cut the row into")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=8192, help="draft vocabulary (token map) size")
    ap.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32"],
                    help="train.precision: bf16 is autocast, fast on CPUs with AMX or AVX512-BF16")
    args = ap.parse_args()
    H, V = 576, 49152
    head = RandomHead(V, H)
    d = build_draft("eagle3", seed=0, hidden_size=H, vocab_size=V, num_heads=6, draft_vocab_size=args.vocab,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, intermediate_size=1536,
                    aux_layers=[2, 15, 27])
    d.set_token_map(torch.randperm(V, generator=torch.Generator().manual_seed(1))[: args.vocab])
    for p in d.vocab_parameters():
        p.requires_grad_(False)
    runners = {p: StepRunner(d, head, head_modules(d), loss="lk_hybrid", eta=3.0, gamma=0.8, temperature=1.0,
                             impl="fused", micro_batch_tokens=args.tokens,
                             autocast_dtype=torch.bfloat16 if p == "bf16" else None) for p in args.precision}
    opt = torch.optim.AdamW([p for p in dict.fromkeys(d.parameters()) if p.requires_grad], lr=1e-4)
    base = random_micro_batch(args.tokens, H, V, head)
    base.aux = torch.randn(1, args.tokens, 3 * H, generator=torch.Generator().manual_seed(2))
    rows = {args.tokens: base}
    for n in args.doc_tokens:
        mb = random_micro_batch(args.tokens, H, V, head)
        mb.aux, mb.doc_ids = base.aux, (torch.arange(args.tokens) // n)[None]
        rows[n] = mb
    cases = [(p, n) for p in args.precision for n in rows]
    times: dict[tuple[str, int], list[float]] = {c: [] for c in cases}
    for step in range(args.steps + 1):
        for p, n in cases:
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            runners[p].accumulate([rows[n]])
            opt.step()
            if step:
                times[(p, n)].append(time.perf_counter() - t0)
    whole = args.tokens / statistics.median(times[(args.precision[0], args.tokens)])
    print(f"EAGLE-3 (H {H}, 9 heads / 3 KV, MLP 1536, {args.vocab}-token map, frozen head and fc), lk_hybrid fused, "
          f"{args.tokens}-token rows, median of {args.steps} steps, {torch.get_num_threads()} threads")
    out = []
    for (p, n), ts in times.items():
        tps = args.tokens / statistics.median(ts)
        label = "one document (the old cost)" if n == args.tokens else f"documents of {n} tokens"
        out.append({"precision": p, "doc_tokens": n, "tokens_per_s": tps, "vs_first": tps / whole})
        print(f"{p:5s} {label:30s} {tps:8.1f} tok/s  {tps / whole:5.2f}x")
    print(json.dumps({"tokens": args.tokens, "rows": out}))


if __name__ == "__main__":
    main()
