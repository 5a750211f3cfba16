"""Training tokens/s with a truncated draft vocabulary vs the full one, side by side in one process.

    python benchmarks/vocab_throughput.py                       # embedded shapes (H 576, V 49152), the demo's drafts
    python benchmarks/vocab_throughput.py --vocab 4096 8192 16384 --tokens 1024

Each configuration runs `StepRunner.accumulate` (teacher logits from a frozen lm_head, the trunk, heads one at a
time with the loss and backward) plus an AdamW step on random features, exactly as `lkspec train` does; times are
medians over --steps after one warm-up step, configurations interleaved round-robin so a busy machine slows them
alike. Drafts are the demo's: MLP-Speculator tied with inner_dim 2 x hidden, MEDUSA with one block per head, the
vocabulary-sized tensors frozen (draft.freeze) or not. A truncated head computes N of the V logits; the
teacher's normaliser needs all V once per position, which features extracted by this version carry
(`target_lse`, so training projects only the N kept rows) and older stores do not (`--no-stored-lse` shows
that case: the full projection stays, once per position).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from lkspec.drafts import Draft, build_draft
from lkspec.train.batching import MicroBatch
from lkspec.train.step import StepRunner, head_modules


class RandomHead:
    """A random frozen lm_head standing in for the target's (only `logits_from_hidden` is used)."""

    def __init__(self, V: int, H: int) -> None:
        self.weight = torch.randn(V, H, generator=torch.Generator().manual_seed(0)) / H**0.5

    def logits_from_hidden(self, h: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        return torch.nn.functional.linear(h.float(), self.weight if rows is None else self.weight[rows])


def random_micro_batch(tokens: int, H: int, V: int, head: RandomHead, stored_lse: bool = True) -> MicroBatch:
    """One packed row of random features (every token trained on), with the teacher's stored normaliser."""
    g = torch.Generator().manual_seed(0)
    mb = MicroBatch(hidden=torch.randn(1, tokens, H, generator=g),
                    input_ids=torch.randint(0, V, (1, tokens), generator=g),
                    loss_mask=torch.ones(1, tokens, dtype=torch.bool),
                    doc_ids=torch.zeros(1, tokens, dtype=torch.int64),
                    own=torch.ones(1, tokens, dtype=torch.bool))
    if stored_lse:
        mb.target_lse = torch.logsumexp(head.logits_from_hidden(mb.hidden[0]), -1)[None]
    return mb


def make(arch: str, H: int, V: int, N: int | None, freeze: bool) -> Draft:
    opts = {"inner_dim": 2 * H, "tie_weights": True} if arch == "mlp_speculator" else {"num_layers": 1}
    d = build_draft(arch, seed=0, hidden_size=H, vocab_size=V, num_heads=6, draft_vocab_size=N, **opts)
    if N is not None:
        d.set_token_map(torch.randperm(V, generator=torch.Generator().manual_seed(1))[:N])
    if freeze:
        for p in d.vocab_parameters():
            p.requires_grad_(False)
    if arch == "medusa":  # zero blocks would make the trunk's backward trivially cheap
        torch.nn.init.normal_(d.blocks[0].layers[0].weight, std=0.02)
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, nargs="+", default=[8192], help="truncated sizes N to compare with V")
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per step (one micro-batch)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--arch", nargs="+", default=["mlp_speculator", "medusa"])
    ap.add_argument("--freeze", choices=["yes", "no", "both"], default="yes")
    ap.add_argument("--no-stored-lse", action="store_true", help="features without the stored normaliser")
    args = ap.parse_args()
    H, V, K = 576, 49152, 6
    head = RandomHead(V, H)
    mb = random_micro_batch(args.tokens, H, V, head, stored_lse=not args.no_stored_lse)
    freezes = {"yes": [True], "no": [False], "both": [True, False]}[args.freeze]
    configs = [(a, n, f) for a in args.arch for f in freezes for n in [None, *args.vocab]]
    runs = {}
    for a, n, f in configs:
        d = make(a, H, V, n, f)
        params = [p for p in dict.fromkeys(d.parameters()) if p.requires_grad]
        runner = StepRunner(d, head, head_modules(d), loss="lk_hybrid", eta=3.0, gamma=0.8, temperature=1.0,
                            impl="chunked", micro_batch_tokens=args.tokens)
        runs[(a, n, f)] = (runner, torch.optim.AdamW(params, lr=1e-4), params, [])
    for step in range(args.steps + 1):
        for runner, opt, params, times in runs.values():
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            runner.accumulate([mb])
            torch.nn.utils.clip_grad_norm_(params, 0.5)
            opt.step()
            if step:
                times.append(time.perf_counter() - t0)
    print(f"embedded shapes H {H}, V {V}, K {K}; {args.tokens} tokens/step, {torch.get_num_threads()} threads, "
          f"median of {args.steps} steps; features {'without' if args.no_stored_lse else 'with'} the stored "
          f"normaliser")
    rows = []
    for (a, n, f), (_, _, _, times) in runs.items():
        tps = args.tokens / statistics.median(times)
        full = args.tokens / statistics.median(runs[(a, None, f)][3])
        rows.append({"arch": a, "vocab": n or V, "frozen": f, "tokens_per_s": tps, "vs_full": tps / full})
        print(f"{a:15s} vocab {n or V:6d} {'frozen' if f else 'trained':7s} {tps:8.1f} tok/s   {tps / full:5.2f}x "
              f"the full vocabulary")
    print(json.dumps({"tokens": args.tokens, "rows": rows}))


if __name__ == "__main__":
    main()
