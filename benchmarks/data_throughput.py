"""Data-stage throughput on the embedded target: regeneration batched vs one-at-a-time, feature extraction.

    python benchmarks/data_throughput.py          # 16 prompts x 48 new tokens: 4.5 min on 2 heavily loaded cores
    python benchmarks/data_throughput.py --batch-size 32 --max-new-tokens 96 --singles 4   # 13.6 min loaded

Regeneration: the stage itself (`regenerate`, one length-sorted left-padded batch of `--batch-size`
ShareGPT prompts, T = 1) against `--singles` of the same prompts generated one at a time through the same
`hf_generate`, half of them before and half after the batched run so that a change in machine load hits
both sides. The ratio of generated tokens/s is what to read (target, issue 3: >= 5x on CPU). Feature
extraction then runs `extract_features` over the tokens dataset just made and reports tokens/s.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from lkspec.data.features import extract_features
from lkspec.data.prompts import load_prompts
from lkspec.data.regenerate import RegenConfig, derive_seed, hf_generate, regenerate, resolve_sampling
from lkspec.targets import EMBEDDED_NAME, load_target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default=EMBEDDED_NAME, help="target spec (default: the embedded SmolLM2)")
    ap.add_argument("--batch-size", type=int, default=16, help="prompts in the batched run (one batch)")
    ap.add_argument("--singles", type=int, default=2, help="of those, prompts generated one at a time")
    ap.add_argument("--max-new-tokens", type=int, default=48, help="response limit")
    ap.add_argument("--max-chars", type=int, default=300, help="longest prompt (characters) drawn from ShareGPT")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    target = load_target(args.target, device=args.device)
    prompts = load_prompts(max_chars=args.max_chars, limit=args.batch_size, seed=0).records
    cfg = RegenConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    sampling = resolve_sampling(target, cfg)
    ids = sorted((target.render_chat(r.messages) for r in prompts), key=len)
    singles = ids[:: max(1, len(ids) // args.singles)][: args.singles]  # spread over the prompt lengths
    single = [0, 0.0]

    def run_singles(batch: list[list[int]], offset: int) -> None:
        for i, p in enumerate(batch):
            t0 = time.perf_counter()
            out = hf_generate(target, [p], sampling, args.max_new_tokens, derive_seed(1, offset + i))
            single[0] += len(out[0].response)
            single[1] += time.perf_counter() - t0
        print(f"one at a time: {single[0]} tok in {single[1]:.1f} s", flush=True)

    half = len(singles) // 2
    run_singles(singles[:half], 0)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        meta = regenerate(target, prompts, Path(tmp) / "tok", cfg, progress=False)
        batched_s = time.perf_counter() - t0
        batched_tokens = meta["counts"]["response_tokens"]
        print(f"batched: {batched_tokens} tok in {batched_s:.1f} s", flush=True)
        run_singles(singles[half:], half)
        t0 = time.perf_counter()
        store = extract_features(target, Path(tmp) / "tok", Path(tmp) / "feat", progress=False)
        feat_s = time.perf_counter() - t0
    rate = {"batched": batched_tokens / batched_s, "single": single[0] / single[1]}
    result = {
        "device": str(target.device), "threads": torch.get_num_threads(), "batch_size": args.batch_size,
        "singles": len(singles), "max_new_tokens": args.max_new_tokens,
        "regen_batched_tok_s": round(rate["batched"], 2), "regen_single_tok_s": round(rate["single"], 2),
        "batched_over_single": round(rate["batched"] / rate["single"], 2),
        "finished_eos": meta["counts"]["finished_eos"], "prompt_tokens": meta["counts"]["prompt_tokens"],
        "features_tok_s": round(store.num_tokens / feat_s, 1), "features_tokens": store.num_tokens,
    }
    print(json.dumps(result, indent=2))
    print(f"regeneration: batched {rate['batched']:.1f} tok/s vs one-at-a-time {rate['single']:.1f} tok/s "
          f"= {result['batched_over_single']:.2f}x (target >= 5x); feature extraction {result['features_tok_s']} tok/s")


if __name__ == "__main__":
    main()
