"""Regeneration's decoding loop against HF `generate`, and the kept states against the pass they replace.

    python benchmarks/regen_loop.py                        # 64 benchmark prompts x 96 tokens, batch 32, T = 1 and 0
    python benchmarks/regen_loop.py --prompts 128 --temperatures 1

Side by side in one process on the embedded target, per temperature, each configuration over the same batches
(interleaved batch by batch, so a change in machine load hits all of them):

* `hf-generate`: stock `model.generate` (left padding, `torch.multinomial` sampling), what the `hf` backend ran
  until 2026-12-07;
* `loop`: `lkspec.targets.decode.decode_batch` as regeneration now runs it (inverse-CDF sampling, finished rows
  leave the batch);
* `loop+states`: the same keeping every position's state (one more single-token pass per row), plus the
  teacher-forced pass those states replace (`forward_docs` over the batch: what `lkspec data features` would run);
* `loop+states, HF cache`: the same with HF's `DynamicCache`, which appends by `torch.cat` of the whole cache at
  every step (what the loop used until 2026-12-08; now `lkspec.targets.kv_cache` writes into buffers in place).

Prints new tokens per second of each and the ratios; the prompts are MT-bench, HumanEval and GSM8K prompts past
the first 40 of each (the demo's training prompts).
"""

from __future__ import annotations

import argparse
import time
from unittest import mock

import torch

from lkspec.data.benchmarks import BENCHMARKS, load_benchmark
from lkspec.targets import EMBEDDED_NAME, Target, decode_batch, load_target


def hf_generate(target: Target, prompts: list[list[int]], temperature: float, max_new: int, seed: int) -> int:
    """Stock transformers `generate` on a left-padded batch; returns the new tokens up to each EOS."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), target.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    torch.manual_seed(seed)
    out = target.model.generate(input_ids=ids, attention_mask=mask, do_sample=temperature > 0, max_new_tokens=max_new,
                                temperature=temperature if temperature > 0 else None, top_k=None, top_p=None,
                                eos_token_id=list(target.eos_token_ids), pad_token_id=target.pad_token_id)
    eos = set(target.eos_token_ids)
    n = 0
    for row in out[:, width:].tolist():
        n += next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
    return n


def states_pass(target: Target, seqs: list[list[int]]) -> None:
    """The teacher-forced pass the kept states replace (right-padded, masked, as `forward_docs` runs it)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), target.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
    target.states(ids, mask)


def generators(T: float, batch: int, rows: int) -> list[torch.Generator] | None:
    """The same draws for every configuration of a batch (None: greedy)."""
    return None if T == 0 else [torch.Generator().manual_seed(1000 * batch + i) for i in range(rows)]


def hf_cache(config: object, capacity: int) -> object:
    """HF's cache, as decode_batch built it before `lkspec.targets.kv_cache`."""
    from transformers import DynamicCache

    return DynamicCache(config=config)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 0.0])
    args = ap.parse_args()
    target = load_target(EMBEDDED_NAME)
    prompts = [target.render_chat(r.messages) for b in BENCHMARKS for r in load_benchmark(b)[40:]]
    prompts = sorted(prompts, key=len, reverse=True)[: args.prompts]
    batches = [prompts[i : i + args.batch_size] for i in range(0, len(prompts), args.batch_size)]
    print(f"embedded target, {len(prompts)} prompts x <= {args.max_new_tokens} new tokens, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads")
    for T in args.temperatures:
        secs = {"hf-generate": 0.0, "loop": 0.0, "loop+states": 0.0, "hf-cache": 0.0}
        toks = dict.fromkeys(secs, 0)
        secs["pass"] = 0.0
        same = True
        for b, batch in enumerate(batches):
            gens = generators(T, b, len(batch))
            t0 = time.perf_counter()
            toks["hf-generate"] += hf_generate(target, batch, T, args.max_new_tokens, b)
            t1 = time.perf_counter()
            out = decode_batch(target, batch, temperature=T, max_new_tokens=args.max_new_tokens, generators=gens)
            t2 = time.perf_counter()
            gens = generators(T, b, len(batch))
            kept = decode_batch(target, batch, temperature=T, max_new_tokens=args.max_new_tokens, generators=gens,
                                keep="all")
            t3 = time.perf_counter()
            states_pass(target, [p + d.tokens for p, d in zip(batch, kept, strict=True)])
            t4 = time.perf_counter()
            gens = generators(T, b, len(batch))
            with mock.patch("lkspec.targets.decode.new_cache", hf_cache):
                old = decode_batch(target, batch, temperature=T, max_new_tokens=args.max_new_tokens, generators=gens,
                                   keep="all")
            t5 = time.perf_counter()
            secs["hf-cache"] += t5 - t4
            toks["hf-cache"] += sum(len(d.tokens) for d in old)
            same &= [d.tokens for d in old] == [d.tokens for d in kept]
            secs["hf-generate"] += t1 - t0
            secs["loop"] += t2 - t1
            secs["loop+states"] += t3 - t2
            secs["pass"] += t4 - t3
            toks["loop"] += sum(len(d.tokens) for d in out)
            toks["loop+states"] += sum(len(d.tokens) for d in kept)
        rate = {k: toks[k] / secs[k] for k in toks}
        print(f"T = {T:g}: hf-generate {rate['hf-generate']:.1f} tok/s, loop {rate['loop']:.1f} tok/s "
              f"({rate['loop'] / rate['hf-generate']:.2f}x), loop+states {rate['loop+states']:.1f} tok/s; "
              f"the pass the states replace: {secs['pass']:.1f} s vs {secs['loop+states'] - secs['loop']:.1f} s "
              f"of keeping them; with HF's DynamicCache {rate['hf-cache']:.1f} tok/s "
              f"(in-place buffers {rate['loop+states'] / rate['hf-cache']:.2f}x, "
              f"{'the same' if same else 'DIFFERENT'} tokens)")


if __name__ == "__main__":
    main()
