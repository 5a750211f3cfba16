"""Is `lkspec generate` faster than plain decoding? Tokens/s, τ, speed-up and where a round's time goes.

    python benchmarks/generate_speed.py --draft lkspec-demo/runs/mlp-lk_hybrid          # ~10 min on 2 cores
    python benchmarks/generate_speed.py --draft RUN_A --draft RUN_B --prompts 2 --ks 2,4,6 -t 0

Side by side in one run, on the same prompts (the first --prompts of MT-bench, HumanEval and GSM8K), batch 1:

1. the cost of a cached target pass (+ lm_head) over k + 1 new tokens relative to one token, k = 0..K:
   what a verification pass costs on this machine;
2. plain decoding: HF `generate` and a hand-written cached loop (the faster of the two is the baseline);
3. `lkspec generate` with the n-gram lookup, each draft, and each draft + n-gram, at every K of --ks and
   `--k auto`: tokens/s, τ, speed-up, ms per round split into the engine's phases (prefill, propose,
   verify, accept, bookkeeping) and the overhead share (accept + bookkeeping of the round time);
4. the cost model's prediction (lkspec.speed) for each draft and K, from the acceptance measured at the
   largest K and the pass costs of (1), beside the measured speed-up.

Ratios only mean something within one run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from lkspec.data.benchmarks import load_benchmark
from lkspec.drafts import load_draft
from lkspec.sampling import sample, warp_probs
from lkspec.specdec import PHASES, GenerationResult, SpeculativeGenerator, plain_generate
from lkspec.speed import AUTO, Costs, measure_pass_costs, predicted_speedup
from lkspec.targets import Target, cached_decoder, load_target


@torch.no_grad()
def plain_loop(target: Target, prompt: Sequence[int], max_new_tokens: int, temperature: float,
               seed: int) -> tuple[list[int], float, float]:
    """The plainest cached decoding loop: one token per target pass, no logits processors.
    (tokens, seconds, of which the prompt's prefill)."""
    from transformers import DynamicCache

    decoder, eos = cached_decoder(target.model), set(target.eos_token_ids)
    g = torch.Generator(device=target.device).manual_seed(seed)
    t0 = time.perf_counter()
    cache = DynamicCache(config=target.model.config)
    x = torch.tensor([list(prompt)], device=target.device)
    out: list[int] = []
    prefill = 0.0
    while len(out) < max_new_tokens:
        h = decoder(input_ids=x, cache=cache, use_cache=True).last_hidden_state[0, -1:]
        logits = target.logits_from_hidden(h)
        tok = int(logits.argmax(-1)) if temperature == 0 else int(sample(warp_probs(logits, temperature)[0], g))
        out.append(tok)
        prefill = prefill or time.perf_counter() - t0
        if tok in eos:
            break
        x = torch.tensor([[tok]], device=target.device)
    return out, time.perf_counter() - t0, prefill


def run_plain(target: Target, prompts: list[list[int]], n: int, T: float) -> dict[str, float]:
    """Both plain decoders on every prompt: tokens/s end to end, and the loop's decode rate after prefill."""
    hf = loop = tokens = decode_s = decode_tok = 0.0
    for i, p in enumerate(prompts):
        out, s = plain_generate(target, p, max_new_tokens=n, temperature=T, seed=i)
        out2, s2, pre = plain_loop(target, p, n, T, i)
        hf, loop, tokens = hf + s, loop + s2, tokens + len(out)
        decode_s, decode_tok = decode_s + s2 - pre, decode_tok + len(out2) - 1
    return {"hf": tokens / hf, "loop": tokens / loop, "decode": decode_tok / decode_s}


def run_spec(gen: SpeculativeGenerator, prompts: list[list[int]], n: int) -> list[GenerationResult]:
    return [gen.generate(p, max_new_tokens=n, seed=i) for i, p in enumerate(prompts)]


def summary(results: list[GenerationResult]) -> dict[str, float | list[float]]:
    tokens = sum(len(r.tokens) for r in results)
    rounds = sum(r.rounds for r in results)
    seconds = sum(r.seconds for r in results)
    phases = {ph: sum(r.phases[ph] for r in results) for ph in PHASES}
    accepted = [sum(col) / rounds for col in zip(*(r.position_counts()[1] for r in results), strict=True)]
    loop = seconds - phases["prefill"]
    return {"tokens": tokens, "rounds": rounds, "seconds": seconds, "tau": tokens / rounds,
            "rate": tokens / seconds, "cumulative": accepted, "decode_rate": tokens / (seconds - phases["prefill"]),
            "drafted": sum(sum(r.drafted) for r in results), "phases": phases,
            **{f"ms_{ph}": 1e3 * v / rounds for ph, v in phases.items()},
            "overhead": (phases["accept"] + phases["bookkeeping"]) / loop if loop > 0 else float("nan")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", default="smollm2-135m-instruct")
    ap.add_argument("--draft", action="append", default=[], help="a draft dir (repeat); none: n-gram only")
    ap.add_argument("--prompts", type=int, default=3, help="prompts per benchmark")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--ks", default="1,2,3,4,6", help="K values to time (the largest also feeds the cost model)")
    ap.add_argument("-t", "--temperatures", default="0,1")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ks = sorted({int(k) for k in args.ks.split(",")})
    temps = [float(t) for t in args.temperatures.split(",")]
    target = load_target(args.target)
    drafts = {Path(d).name: load_draft(d, target=target.identity, device=target.device) for d in args.draft}
    prompts = [target.render_chat(r.messages) for b in ("mtbench", "humaneval", "gsm8k")
               for r in load_benchmark(b, limit=args.prompts)]
    n = args.max_new_tokens
    print(f"target {target.name} on {target.device}, {torch.get_num_threads()} threads; {len(prompts)} prompts, "
          f"<= {n} new tokens, batch 1; K in {ks}")
    plain_generate(target, prompts[0], max_new_tokens=4, temperature=0)  # warm-up

    passes = measure_pass_costs(target, max(ks) + 1)
    print("\n1. target pass over k+1 new tokens / one token (after 200 cached tokens, + lm_head):")
    print("   " + "  ".join(f"k={k}: {c / passes[0]:.2f}" for k, c in enumerate(passes)) +
          f"   (one token: {1e3 * passes[0]:.1f} ms)")

    for T in temps:
        plain = run_plain(target, prompts, n, T)
        print(f"\n2-4. T = {T:g}: plain HF generate {plain['hf']:.1f} tok/s, plain cached loop {plain['loop']:.1f} "
              f"tok/s; after the prefill {plain['decode']:.1f} tok/s")
        print("   speed-up: end to end over the faster plain decoder; decode: after the prefill, over the loop's "
              "decode rate (what the cost model predicts). Plain decoding is timed again after each proposer and each "
              "proposer's rows use the mean of the timings before and after it, so a machine that drifts in speed "
              "over the minutes of a run does not pass for a speed-up.")
        print(f"   {'proposer':26s} {'K':>4s} {'tok/s':>6s} {'tau':>5s} {'speed-up':>8s} {'decode':>7s} "
              f"{'predicted':>9s} {'ms/round':>8s} | " + " ".join(f"{ph:>7s}" for ph in PHASES) + " | overhead")
        configs = [("ngram", None)] + [(f"{kind}:{name}", d) for name, d in drafts.items()
                                       for kind in ("draft", "ngram+draft")]
        for label, draft in configs:
            kind = label.split(":")[0]
            rows = {}
            for k in [*ks, AUTO]:
                heads = draft.num_heads if draft is not None else max(ks)
                if k != AUTO and k > heads:
                    continue
                gen = SpeculativeGenerator(target, draft, k=k, temperature=T, proposer=kind)
                rows[k] = summary(run_spec(gen, prompts, n))
            after = run_plain(target, prompts, n, T)
            base = {key: (plain[key] + after[key]) / 2 for key in plain}
            plain_rate = max(base["hf"], base["loop"])
            print(f"   {label}: plain decoding before / after it {max(plain['hf'], plain['loop']):.1f} / "
                  f"{max(after['hf'], after['loop']):.1f} tok/s -> baseline {plain_rate:.1f} tok/s")
            plain = after
            top = max(k for k in rows if k != AUTO)
            plain_s = 1.0 / base["decode"]
            top_row = rows[top]
            costs = Costs.measured(passes, top_row["phases"], top_row["rounds"], top_row["drafted"], plain_s)
            for k, r in rows.items():
                pred = (f"{predicted_speedup(top_row['cumulative'], k, costs):.2f}x"
                        if k != AUTO and kind != "ngram" else "")
                total = 1e3 * r["seconds"] / r["rounds"]
                print(f"   {label:26s} {k!s:>4s} {r['rate']:6.1f} {r['tau']:5.2f} {r['rate'] / plain_rate:7.2f}x "
                      f"{r['decode_rate'] / base['decode']:6.2f}x {pred:>9s} {total:8.1f} | "
                      + " ".join(f"{r[f'ms_{ph}']:7.1f}" for ph in PHASES) +
                      f" | {100 * r['overhead']:5.1f} %")


if __name__ == "__main__":
    main()
