"""What a cached target pass over 1..K+1 new tokens costs with and without lkspec's CPU paths (lkspec.cpu_paths).

    python benchmarks/pass_paths.py --rounds 3

Four configurations of the same loaded target, interleaved round-robin in one process, so a drifting host
slows them alike:

* `stock`: transformers' SDPA attention (which copies the KV cache per layer to repeat grouped KV heads
  whenever a mask is given, i.e. in every multi-token pass) and `F.linear` everywhere: lkspec before
  2026-12-03;
* `linear`: every linear with <= 16 rows as `(W @ x.T).T` over an even number of rows, stock attention;
* `rows+gqa`: that and the GQA attention without the KV copy (lkspec on 2026-12-03);
* `lkspec`: the GQA attention, `W @ x.T` at 1-2 rows and oneDNN's inner product over reordered weights at
  3 rows and more: what `load_target` sets up on CPU today.

Each configuration's logits of one cached 7-token pass (masked, 7 rows: the shape both paths change) are
compared with the stock ones.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

import lkspec.targets.model as target_model
from lkspec.cpu_paths import PACKED, CpuLinear, cpu_linear, mark_for_onednn, use_cpu_linears, use_gqa_attention
from lkspec.speed import measure_pass_costs, verify_pass_logits
from lkspec.targets import Target, load_target

CONFIGS = ("stock", "linear", "rows+gqa", "lkspec")


def configure(target: Target, name: str) -> None:
    """Put the target's modules (and the lm_head projection) on one configuration's paths."""
    for m in target.model.modules():
        if type(m) is CpuLinear:
            m.__class__ = nn.Linear
    target.model.set_attn_implementation("sdpa")
    target_model.cpu_linear = nn.functional.linear if name == "stock" else cpu_linear
    if name != "stock":
        use_cpu_linears(target.model)
    for m in target.model.modules():
        if type(m) is CpuLinear:
            if hasattr(m.weight, PACKED):
                delattr(m.weight, PACKED)  # a fresh oneDNN copy, or none (the small-rows path)
            if name == "lkspec":
                mark_for_onednn(m.weight)
            else:
                setattr(m.weight, PACKED, False)
    if name in ("rows+gqa", "lkspec"):
        assert use_gqa_attention(target.model), "the GQA attention does not apply to this target"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="smollm2-135m-instruct")
    ap.add_argument("--max-tokens", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    target = load_target(args.target)
    ids = torch.randint(0, target.vocab_size, (1, 207), generator=torch.Generator().manual_seed(0))
    passes: dict[str, list[tuple[float, ...]]] = {name: [] for name in CONFIGS}
    logits = {}
    for r in range(args.rounds):
        for name in CONFIGS:
            configure(target, name)
            passes[name].append(measure_pass_costs(target, args.max_tokens, reps=11))
            logits[name] = verify_pass_logits(target, ids.to(target.device), 200)
            print(f"round {r} {name:8s} ms", [round(p * 1e3, 1) for p in passes[name][-1]], flush=True)
    configure(target, "lkspec")
    print("\nmedian over rounds, ms of a pass over 1..n new tokens, and relative to the configuration's one-token pass")
    med = {name: [statistics.median(col) for col in zip(*runs, strict=True)] for name, runs in passes.items()}
    for name, ms in med.items():
        print(f"{name:8s}", [round(p * 1e3, 1) for p in ms], "relative", [round(p / ms[0], 2) for p in ms],
              "| vs stock", [round(p / s, 2) for p, s in zip(ms, med["stock"], strict=True)])
    for name in CONFIGS:
        print("max |logit - stock|", name, float((logits[name] - logits["stock"]).abs().max()))


if __name__ == "__main__":
    main()
