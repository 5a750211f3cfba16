"""The round-by-round lossless speculative generator (the engine), and the user-facing `generate`.

One round, with the target's KV cache holding every position before the last emitted token:

1. the draft proposes K tokens from its context (`Draft.propose_in`): for a local draft, h (the target's
   post-norm state that produced the last emitted token) and that token; for EAGLE-3, its KV cache over every
   accepted position, extended after each round with the target's aux states there;
2. ONE target pass over [last token, d_1 .. d_K] gives p at the K+1 positions;
3. Leviathan et al.: accept d_i with probability min(1, p(d_i)/q(d_i)); at the first rejection emit a
   token from norm(max(0, p - q)) and stop; if all K pass, emit a bonus token from p;
4. crop the cache back to the accepted prefix (HF `DynamicCache.crop`).

p and q are warped by the same temperature/top-k/top-p (`lkspec.sampling.warp_probs`), so the output is
distributed exactly as the target's own sampling; at T = 0 everything is argmax and the output equals
the target's greedy decoding. `rule="greedy"` is vLLM's behaviour at T > 0: drafts are argmax q and q is
treated as one-hot (accept d w.p. p(d), else resample from p with d removed) - still lossless, but with
per-position acceptance p(argmax q) instead of sum min(p, q).

The first round starts at the first response token: the prompt minus its last token is prefilled, and
the last prompt token plays the role of "last emitted token". Every round therefore costs one target
pass and emits 1..K+1 tokens, which is what tau counts and what the coupling replay predicts.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lkspec.cpu_paths import use_cpu_linears
from lkspec.drafts import Draft, check_draft_target
from lkspec.errors import LkspecError
from lkspec.proposers import NGRAM, PROPOSER_KINDS, NgramIndex, NgramSettings
from lkspec.sampling import check_temperature, sample, warp_probs
from lkspec.speed import AUTO, AdaptiveK, Costs, measure_pass_costs
from lkspec.targets import Target, cached_decoder, crop_cache, select_features

GEN_RULES = ("sampled", "greedy")
# A round's time, split: prefill (the prompt, once), propose (the draft's forward and draws, or the n-gram
# lookup), verify (the target pass over last + drafts and its lm_head), accept (warping p, the tests and
# draws), bookkeeping (cache crop, n-gram index, EOS and streaming). Everything but the passes is overhead.
PHASES = ("prefill", "propose", "verify", "accept", "bookkeeping")


@dataclass
class GenerationResult:
    """One speculative generation: the tokens and the counts tau and per-position acceptance come from."""

    prompt_ids: list[int]
    tokens: list[int]
    rounds: int
    finished: bool  # ended with an EOS token
    seconds: float
    k: int
    round_log: list[tuple[int, int]] = field(default_factory=list)  # (boundary b, accepted drafts) per round
    # Where `seconds` went (PHASES): the target and draft forward passes, and the round's own overhead.
    phases: dict[str, float] = field(default_factory=dict)
    drafted: list[int] = field(default_factory=list)  # tokens drafted per round (varies with n-gram, --k auto)

    @property
    def tau(self) -> float:
        return len(self.tokens) / self.rounds if self.rounds else float("nan")

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else float("nan")

    def position_counts(self) -> tuple[list[int], list[int]]:
        """(tried, accepted) per draft position, counting only positions inside the final response.

        Same convention as the replay: a drafted position beyond the end (EOS or max tokens) does not count.
        """
        n = len(self.tokens)
        tried, accepted = [0] * self.k, [0] * self.k
        for b, j in self.round_log:
            for i in range(self.k):
                if b + i >= n:
                    break
                if i <= j:
                    tried[i] += 1
                if i < j:
                    accepted[i] += 1
        return tried, accepted

    @property
    def acceptance(self) -> list[float]:
        tried, acc = self.position_counts()
        return [a / t if t else float("nan") for a, t in zip(acc, tried, strict=True)]

    @property
    def acceptance_cumulative(self) -> list[float]:
        _, acc = self.position_counts()
        return [a / self.rounds if self.rounds else float("nan") for a in acc]


class SpeculativeGenerator:
    """Lossless speculative decoding of one sequence with a target and a draft (batch size 1).

        gen = SpeculativeGenerator(target, draft, temperature=1.0)
        result = gen.generate(prompt_ids, max_new_tokens=128, seed=0)
        result.tokens, result.tau
    """

    def __init__(self, target: Target, draft: Draft | None, *, k: int | str | None = None, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0, rule: str = "sampled", proposer: str = "draft",
                 ngram: NgramSettings | None = None) -> None:
        check_temperature(temperature)
        if rule not in GEN_RULES:
            raise LkspecError(f"unknown acceptance rule {rule!r}; choose from {', '.join(GEN_RULES)}")
        if proposer not in PROPOSER_KINDS:
            raise LkspecError(f"unknown proposer {proposer!r}; choose from {', '.join(PROPOSER_KINDS)}")
        if not 0 < top_p <= 1:
            raise LkspecError(f"top_p must be in (0, 1], got {top_p}")
        if top_k < 0:
            raise LkspecError(f"top_k must be >= 0 (0 disables it), got {top_k}")
        self.uses_draft = proposer != NGRAM
        self.uses_ngram = proposer != "draft"
        if isinstance(k, str) and k != AUTO:
            raise LkspecError(f"K must be a number of tokens or {AUTO!r}, got {k!r}")
        self.auto_k, k = k == AUTO, None if k == AUTO else k  # auto: K chosen per round, at most the default
        self._costs: Costs | None = None
        if self.uses_draft:
            if draft is None:
                raise LkspecError(f"proposer {proposer!r} needs a trained draft; pass one, or use --proposer ngram")
            check_draft_target(draft.config, target.identity)
            self.k = draft.num_heads if k is None else k
            draft = draft.with_num_heads(max(self.k, draft.num_heads))  # a recurrent draft drafts any K
            draft = draft.to(target.device).eval()
            use_cpu_linears(draft)  # it proposes a token at a time (lkspec.cpu_paths; CPU only)
        else:
            self.k = 6 if k is None else k
        if self.k < 1:
            raise LkspecError(f"K = {self.k}: a round drafts at least one token; use --k 1 or more")
        self.target, self.draft = target, draft
        self.layers = tuple(draft.aux_layers) if self.uses_draft and draft is not None else ()
        self.ngram = ngram or NgramSettings()
        self.proposer = proposer
        self.temperature, self.top_k, self.top_p, self.rule = float(temperature), top_k, top_p, rule

    def costs(self) -> Costs:
        """This machine's pass costs for K up to self.k (measured once, a few seconds: `--k auto`)."""
        if self._costs is None:
            self._costs = Costs(measure_pass_costs(self.target, self.k + 1))
        return self._costs

    @torch.no_grad()
    def measure_costs(self, passes: tuple[float, ...], *, reps: int = 15) -> Costs:
        """Costs of this generator's round on this machine without generating: `passes` (the target's, shared
        by every proposer), plus the median proposal of K tokens and the median acceptance step, each timed on
        a round of the real shapes (a random hidden state, random logits, a 200-token n-gram context that
        rarely matches, so the draft proposes the whole round). Bookkeeping (the cache crop, list appends,
        1-2 % of a round in benchmarks/generate_speed.py) is left out."""
        target, K, dev = self.target, self.k, self.target.device
        g = torch.Generator(device=dev)
        g.manual_seed(0)
        cpu = torch.Generator().manual_seed(0)
        context = torch.randint(0, target.vocab_size, (200,), generator=cpu).tolist()
        ctx = None
        if self.draft is not None:
            ctx = self.draft.new_context()
            self.draft.extend(ctx, torch.randn(1, 200, self.draft.input_width, generator=cpu).to(dev, target.dtype),
                              torch.tensor([context], device=dev))
        index = NgramIndex(self.ngram, context) if self.uses_ngram else None
        propose, accept = [], []
        for _ in range(reps + 1):  # the first is a warm-up
            t0 = time.perf_counter()
            drafts, q = self._propose(ctx, index.propose(K) if index is not None else [], K, g)
            drafts.tolist()  # waits for the device, as a round does
            t1 = time.perf_counter()
            if drafts.shape[0] < K:  # no n-gram match: time the acceptance step of a full round anyway
                drafts = torch.randint(0, target.vocab_size, (K,), generator=cpu).to(dev)
                q = torch.nn.functional.one_hot(drafts, target.vocab_size).float()
            logits = target.logits_from_hidden(torch.randn(K + 1, target.hidden_size, generator=cpu)
                                               .to(dev, target.dtype))
            t2 = time.perf_counter()
            self._greedy_round(logits, drafts) if self.temperature == 0 else self._round(logits, drafts, q, g)
            propose.append(t1 - t0)
            accept.append(time.perf_counter() - t2)
        return Costs(passes, statistics.median(propose[1:]) / K, statistics.median(accept[1:]))

    def _propose(self, ctx: Any, lookup: list[int], k: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """(m <= k drafted tokens [m], the distributions they were drawn from [m, V]) for one round; `lookup` is
        the n-gram continuation (empty: no match, or no lookup), of which the round takes the first k."""
        V, dev = self.target.vocab_size, self.target.device
        prefix = lookup[:k]
        if not self.uses_draft or len(prefix) == k:
            toks = torch.tensor(prefix, dtype=torch.long, device=dev)
            return toks, torch.nn.functional.one_hot(toks, V).float()
        assert self.draft is not None
        greedy = self.rule == "greedy" or self.temperature == 0
        prop = self.draft.propose_in(ctx, temperature=0.0 if greedy else self.temperature, top_k=self.top_k,
                                     top_p=self.top_p, num_tokens=k, generator=g,
                                     **({"prefix": prefix} if prefix else {}))
        return prop.tokens[0].to(dev), prop.probs[0].to(dev)

    @staticmethod
    def accept(p: torch.Tensor, q: torch.Tensor, token: int, g: torch.Generator) -> bool:
        """Leviathan's test: keep the draft token with probability min(1, p(token) / q(token))."""
        ratio = float(p[token]) / max(float(q[token]), 1e-30)
        return ratio >= 1.0 or float(torch.rand((), generator=g, device=g.device)) < ratio

    @staticmethod
    def correction(p: torch.Tensor, q: torch.Tensor, g: torch.Generator) -> int:
        """The token emitted after a rejection: a draw from norm(max(0, p - q))."""
        resid = (p - q).clamp_min(0.0)
        if float(resid.sum()) <= 0.0:  # only when p == q, where a rejection cannot happen; p is then exact
            resid = p
        return int(sample(resid / resid.sum(), g))

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int = 256,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        on_tokens: Callable[[list[int]], None] | None = None,
    ) -> GenerationResult:
        """Generate up to `max_new_tokens` tokens (stopping after an EOS); `on_tokens` sees each round's output."""
        from transformers import DynamicCache

        if max_new_tokens < 1:
            raise LkspecError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        prompt = list(prompt_ids)
        if len(prompt) < 2:
            raise LkspecError("the prompt needs at least 2 tokens (render it with the target's chat template)")
        target, dev, K = self.target, self.target.device, self.k
        g = generator
        if g is None:
            g = torch.Generator(device=dev)
            g.manual_seed(seed if seed is not None else torch.seed())
        eos = set(target.eos_token_ids)
        decoder = cached_decoder(target.model)
        kinds = ("match", "no match") if self.uses_ngram else ("draft",)  # see AdaptiveK
        auto = {kind: AdaptiveK(self.costs(), K) for kind in kinds} if self.auto_k else {}
        clock = _Clock(dev)
        cache = DynamicCache(config=target.model.config)
        ids = torch.tensor([prompt], device=dev)
        layers, wide = self.layers, {"output_hidden_states": True} if self.layers else {}
        ctx = self.draft.new_context() if self.uses_draft else None  # type: ignore[union-attr]
        pre = decoder(input_ids=ids[:, :-1], cache=cache, use_cache=True, **wide)
        if ctx is not None:  # the draft's context: the target's features at each prompt position, the token after
            self.draft.extend(ctx, select_features(pre, layers), ids[:, 1:])  # type: ignore[union-attr]
        last = ids[:, -1]
        index = NgramIndex(self.ngram, prompt) if self.uses_ngram else None
        out: list[int] = []
        log: list[tuple[int, int]] = []
        drafted: list[int] = []
        n_drafted, finished = 0, False
        clock.lap("prefill")
        while len(out) < max_new_tokens and not finished:
            lookup = index.propose(K) if index is not None else []  # its first k tokens are propose(k)
            adapt = auto.get(kinds[0] if index is None or lookup else kinds[1])
            drafts, q = self._propose(ctx, lookup, adapt.k if adapt else K, g)
            base = cache.get_seq_length()  # position of `last`
            clock.lap("propose")
            passed = decoder(input_ids=torch.cat([last[:, None], drafts[None]], 1), cache=cache, use_cache=True,
                             **wide)
            logits = self.target.logits_from_hidden(passed.last_hidden_state[0])  # [m+1, V]
            clock.lap("verify")
            j, new = self._greedy_round(logits, drafts) if self.temperature == 0 else self._round(logits, drafts, q, g)
            clock.lap("accept")
            crop_cache(cache, base + 1 + j)  # keep `last` and the accepted drafts
            last = torch.tensor([new[-1]], device=dev)
            if ctx is not None:  # pairs at `last`'s old position and the accepted drafts' (the draft's own are gone)
                clock.lap("bookkeeping")
                self.draft.extend(ctx, select_features(passed, layers)[:, : j + 1],  # type: ignore[union-attr]
                                  torch.tensor([new], device=dev))
                clock.lap("propose")  # the draft's forward over the new context (EAGLE-3's KV), as in propose
            log.append((len(out), j))
            drafted.append(int(drafts.shape[0]))
            new = new[: max_new_tokens - len(out)]
            for i, tok in enumerate(new):
                if tok in eos:
                    new, finished = new[: i + 1], True
                    break
            out.extend(new)
            if index is not None:
                index.extend(new)
            if on_tokens is not None:
                on_tokens(new)
            clock.lap("bookkeeping")
            if adapt is not None:
                n_drafted += drafted[-1]
                costs = Costs.measured(adapt.costs.passes, clock.phases, len(log), n_drafted)
                for a in auto.values():
                    a.costs = costs
                adapt.update(drafted[-1], j)
        return GenerationResult(prompt, out, len(log), finished, clock.total, K, log, dict(clock.phases),
                                drafted)

    def _round(self, logits: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor,
               g: torch.Generator) -> tuple[int, list[int]]:
        """(accepted drafts j, the round's tokens) by Leviathan's rule over the warped p [m+1, V]."""
        p = warp_probs(logits, self.temperature, self.top_k, self.top_p)
        new: list[int] = []
        for i, d in enumerate(drafts.tolist()):
            if not self.accept(p[i], q[i], d, g):
                return i, [*new, self.correction(p[i], q[i], g)]
            new.append(d)
        return len(new), [*new, int(sample(p[-1], g))]

    @staticmethod
    def _greedy_round(logits: torch.Tensor, drafts: torch.Tensor) -> tuple[int, list[int]]:
        """T = 0: `_round` with one-hot p, in one argmax. A draft is kept while it is the target's argmax
        (p(d)/q(d) is 1 or 0); the token after the first miss, or the bonus, is the argmax (the residual
        max(0, p − q) of two one-hots is p). No V-wide one-hot is built and no random draw is made."""
        best = logits.argmax(-1).tolist()
        j = 0
        for d in drafts.tolist():
            if d != best[j]:
                break
            j += 1
        return j, best[: j + 1]


class _Clock:
    """Seconds per phase of `generate`, from consecutive laps (one perf_counter call each).

    On CUDA a lap first waits for the device: kernels launch asynchronously, so without the wait a phase's
    GPU time lands on whichever later phase first reads a result (the split would be wrong, the total not)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device if device.type == "cuda" else None  # the target's GPU, not just the current one
        self.start = self.mark = time.perf_counter()
        self.phases = dict.fromkeys(PHASES, 0.0)

    def lap(self, phase: str) -> None:
        if self.cuda is not None:
            torch.cuda.synchronize(self.cuda)
        now = time.perf_counter()
        self.phases[phase] += now - self.mark
        self.mark = now

    @property
    def total(self) -> float:
        return self.mark - self.start


@torch.no_grad()
def plain_generate(target: Target, prompt_ids: Sequence[int], *, max_new_tokens: int, temperature: float,
                   top_k: int = 0, top_p: float = 1.0, seed: int = 0) -> tuple[list[int], float]:
    """The baseline: the target alone through HF `generate` (tokens, seconds)."""
    from transformers import GenerationConfig

    sampled = temperature > 0
    cfg = GenerationConfig(  # top_k 0 / top_p 1 disable the filters, as in lkspec.sampling
        max_new_tokens=max_new_tokens, do_sample=sampled, temperature=temperature if sampled else None,
        top_k=top_k if sampled else None, top_p=top_p if sampled else None,
        eos_token_id=target.eos_token_ids, pad_token_id=target.pad_token_id,
    )
    ids = torch.tensor([list(prompt_ids)], device=target.device)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    out = target.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
    tokens = out[0, ids.shape[1] :].tolist()  # inside the clock: on a GPU the last step may still be running
    return tokens, time.perf_counter() - t0
