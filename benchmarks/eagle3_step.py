"""EAGLE-3's training step on a packed row: what each way of scoring and running the chains costs.

    python benchmarks/eagle3_step.py                       # embedded shapes, 2048-token rows of 256-token documents
    python benchmarks/eagle3_step.py --doc-tokens 128 512 --answer 0.3 --steps 5

A micro-batch packs several documents into one row, each a prompt and then the answer the heads train on.
Three ways to compute the same loss, run on the same draft, features and loss:

* "whole row": every query scored against every key of the row, other documents masked out (the cost until
  2026-12-07: [T, T] scores per head and step, as if the row were one document);
* "every anchor": each document scored against itself (`llama_layer.document_attention`), but every anchor runs
  the layer and the K-step chain, prompt positions included (the cost until 2026-12-08);
* "trained anchors": the runner passes `anchors` (every anchor some head trains on), so prompt positions only
  provide step 1's keys and values (`Eagle3.head_states`). The demo's rows are 42 % answer (--answer).

`StepRunner.accumulate` plus an AdamW step, as `lkspec train` runs it (lk_hybrid, the fused loss kernel, an
8192-token map, the target-initialised draft's frozen head and fc); medians over --steps after one warm-up step,
cases interleaved round-robin; ratios against the first case.

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
from collections.abc import Callable
from typing import Any

import torch

from lkspec.drafts import Draft, build_draft
from lkspec.train.step import StepRunner, head_modules
from vocab_throughput import RandomHead, random_micro_batch


def every_anchor(draft: Draft) -> Callable[..., list[torch.Tensor]]:
    """The trunk as it was before `anchors`: every anchor's chain runs."""
    def trunk(*args: Any, anchors: torch.Tensor | None = None, **kw: Any) -> list[torch.Tensor]:
        return draft.head_states(*args, **kw)
    return trunk


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=2048, help="tokens per packed row (data.micro_batch_tokens)")
    ap.add_argument("--doc-tokens", type=int, nargs="+", default=[256], help="document lengths to cut the row into")
    ap.add_argument("--answer", type=float, default=0.42, help="the trained share of each document (its end)")
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
    trunks = {"whole row": every_anchor(d), "every anchor": every_anchor(d), "trained anchors": d.head_states}
    runners = {(p, t): StepRunner(d, head, head_modules(d), loss="lk_hybrid", eta=3.0, gamma=0.8, temperature=1.0,
                                  impl="fused", micro_batch_tokens=args.tokens, trunk=trunk,
                                  autocast_dtype=torch.bfloat16 if p == "bf16" else None)
               for p in args.precision for t, trunk in trunks.items()}
    opt = torch.optim.AdamW([p for p in dict.fromkeys(d.parameters()) if p.requires_grad], lr=1e-4)
    aux = torch.randn(1, args.tokens, 3 * H, generator=torch.Generator().manual_seed(2))
    rows = {}
    for n in [args.tokens, *args.doc_tokens]:
        mb = random_micro_batch(args.tokens, H, V, head)
        pos = torch.arange(args.tokens)
        mb.aux, mb.doc_ids = aux, (pos // n)[None]
        mb.loss_mask = (pos % n >= round(n * (1 - args.answer)))[None]  # each document's answer
        rows[n] = mb
    cases = [(p, t, n) for p in args.precision for t in trunks
             for n in ([args.tokens] if t == "whole row" else args.doc_tokens)]
    times: dict[tuple[str, str, int], list[float]] = {c: [] for c in cases}
    for step in range(args.steps + 1):
        for p, t, n in cases:
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            runners[(p, t)].accumulate([rows[n]])
            opt.step()
            if step:
                times[(p, t, n)].append(time.perf_counter() - t0)
    base = args.tokens / statistics.median(times[cases[0]])
    print(f"EAGLE-3 (H {H}, 9 heads / 3 KV, MLP 1536, {args.vocab}-token map, frozen head and fc), lk_hybrid fused, "
          f"{args.tokens}-token rows, {args.answer:.0%} answer, median of {args.steps} steps, "
          f"{torch.get_num_threads()} threads")
    out = []
    for (p, t, n), ts in times.items():
        tps = args.tokens / statistics.median(ts)
        label = f"{t} (one document)" if t == "whole row" else f"{t}, documents of {n}"
        out.append({"precision": p, "case": t, "doc_tokens": n, "tokens_per_s": tps, "vs_first": tps / base})
        print(f"{p:5s} {label:36s} {tps:8.1f} tok/s  {tps / base:5.2f}x")
    print(json.dumps({"tokens": args.tokens, "answer": args.answer, "rows": out}))


if __name__ == "__main__":
    main()
