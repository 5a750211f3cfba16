"""`lkspec generate`: stream lossless speculative output for prompts, with tau and the speed-up over the target.

The engine is `lkspec.specdec.SpeculativeGenerator`; this module is what a user runs: which proposer
(a trained draft, the n-gram lookup, or both), how to sample, and a comparison with plain decoding of the
same prompt. The settings are one model, so the command's flags and their defaults live in one place.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field

from lkspec.config import StrictModel, flag
from lkspec.data.benchmarks import load_benchmark
from lkspec.drafts import load_draft
from lkspec.errors import LkspecError
from lkspec.proposers import NGRAM, NgramSettings
from lkspec.specdec import GenerationResult, SpeculativeGenerator, plain_generate
from lkspec.targets import Target, load_target


class GenerateSettings(StrictModel):
    proposer: Literal["draft", "ngram", "ngram+draft"] = Field(
        "draft", description="What drafts each round: the trained draft, the n-gram prompt lookup (no draft needed), "
        "or the n-gram continuation where the context has a match and the draft after it.", **flag())
    k: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        None, description="Tokens drafted per round (K); default: the draft's heads (6 for the n-gram lookup alone). "
        "auto: measure this machine's target pass costs (a few seconds) and choose each round's K, up to that "
        "default, for the most tokens per second by the acceptance seen so far (lkspec.speed).", **flag("--k", "-k"))
    temperature: float = Field(1.0, ge=0, description="Sampling temperature; 0 = greedy.",
                               **flag("--temperature", "-t"))
    top_k: int = Field(0, ge=0, description="Top-k filter applied identically to p and q (0 = off).", **flag())
    top_p: float = Field(1.0, gt=0, le=1, description="Top-p filter applied identically to p and q (1 = off).",
                         **flag())
    greedy_draft: bool = Field(False, description="vLLM's rule at T > 0: drafts are argmax q and q counts as one-hot "
                               "(still lossless, lower acceptance).", **flag("--greedy-draft/--sampled-draft"))
    max_new_tokens: int = Field(256, ge=1, description="Stop after this many new tokens (or at EOS).", **flag())
    seed: int = Field(0, description="Seed of the draft and acceptance draws (prompt i uses seed + i).", **flag())
    ngram: NgramSettings = Field(default_factory=NgramSettings)


def _warm_up(target: Target) -> None:
    """One tiny forward: the first call into a model pays one-time setup that must not count as speed."""
    with torch.no_grad():
        target.hidden_states(torch.tensor([[target.pad_token_id, target.pad_token_id]]))


def run_generate(target_spec: str, draft_path: str | Path | None, settings: GenerateSettings, *,
                 prompts: Sequence[str] = (), benchmark: str | None = None, limit: int = 3, stream: bool = True,
                 compare: bool = True, device: str | None = None,
                 echo: Callable[..., None] = print) -> list[GenerationResult]:
    """Stream each prompt's speculative output, then tau and speed vs the target."""
    s = settings
    target = load_target(target_spec, device=device)
    if draft_path is None and s.proposer != NGRAM:
        raise LkspecError(f"proposer {s.proposer!r} needs a draft directory; pass one, or --proposer ngram")
    draft = load_draft(draft_path, target=target.identity, device=target.device,
                                  tables=target.init_tensors) if draft_path else None
    gen = SpeculativeGenerator(target, draft, k=s.k, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                               rule="greedy" if s.greedy_draft else "sampled", proposer=s.proposer, ngram=s.ngram)
    messages = [[{"role": "user", "content": p}] for p in prompts]
    if benchmark:
        messages += [r.messages for r in load_benchmark(benchmark, limit=limit)]
    if not messages:
        raise LkspecError("nothing to generate; pass --prompt TEXT or --benchmark NAME")
    tok = target.tokenizer
    _warm_up(target)
    if gen.auto_k:
        echo(f"--k auto: timing target passes over 1..{gen.k + 1} tokens on {target.device} ...")
        rel = ", ".join(f"{c:.2f}" for c in gen.costs().relative())
        echo(f"  cost relative to one token: [{rel}]; K is chosen per round, at most {gen.k}")
    results = []
    spec_s = plain_s = 0.0
    spec_n = plain_n = 0
    for i, msgs in enumerate(messages):
        ids = target.render_chat(msgs)
        echo(f"\n── prompt {i + 1}/{len(messages)}: {msgs[-1]['content'][:100]!r}")
        shown: list[int] = []
        printed = ""

        def show(new: list[int], shown: list[int] = shown) -> None:
            nonlocal printed
            shown.extend(new)
            text = tok.decode(shown, skip_special_tokens=True)
            echo(text[len(printed) :], nl=False)
            printed = text

        res = gen.generate(ids, max_new_tokens=s.max_new_tokens, seed=s.seed + i, on_tokens=show if stream else None)
        if not stream:
            echo(tok.decode(res.tokens, skip_special_tokens=True), nl=False)
        echo("")
        results.append(res)
        spec_s += res.seconds
        spec_n += len(res.tokens)
        acc = ", ".join(f"{a:.2f}" for a in res.acceptance)
        line = (f"[spec] {len(res.tokens)} tokens in {res.rounds} rounds: tau {res.tau:.3f}; acceptance by "
                f"position [{acc}]; {res.tokens_per_second:.1f} tok/s")
        if gen.auto_k and res.drafted:
            line += f"; --k auto drafted {sum(res.drafted) / len(res.drafted):.2f} tokens a round"
        if compare:
            plain, seconds = plain_generate(target, ids, max_new_tokens=s.max_new_tokens, temperature=s.temperature,
                                            top_k=s.top_k, top_p=s.top_p, seed=s.seed + i)
            plain_s += seconds
            plain_n += len(plain)
            rate = len(plain) / seconds if seconds > 0 else float("nan")
            line += (f"; plain HF generate {rate:.1f} tok/s ({len(plain)} tokens); "
                     f"speed-up {res.tokens_per_second / rate:.2f}x")
            if s.temperature == 0 and plain != res.tokens:
                line += " (WARNING: greedy outputs differ; numerical ties?)"
        echo(line)
    if len(results) > 1:
        rounds = sum(r.rounds for r in results)
        spec_rate = spec_n / spec_s
        summary = f"\n[total] {spec_n} tokens in {rounds} rounds: tau {spec_n / rounds:.3f}; {spec_rate:.1f} tok/s"
        if compare and plain_s > 0:
            plain_rate = plain_n / plain_s
            summary += f" vs plain {plain_rate:.1f} tok/s: speed-up {spec_rate / plain_rate:.2f}x"
        echo(summary)
    return results
