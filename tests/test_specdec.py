"""The lossless speculative generator (the engine): exactness at T = 0, distribution at T = 1, agreement
with the coupling replay on identical outputs, and one-line errors for bad input.

Tiny models run single-threaded here: with torch ops this small, thread hand-offs cost more than the math.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from helpers import StubDraft
from lkspec.drafts import Draft, DraftConfig, Proposal, build_draft
from lkspec.errors import LkspecError
from lkspec.evaluate.replay import draft_traces, replay_trace, rounds_moments
from lkspec.evaluate.samples import Sample
from lkspec.specdec import PHASES, GenerationResult, SpeculativeGenerator, plain_generate
from lkspec.targets import Target

SMALL_V = 6


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
class ScriptedDraft(StubDraft):
    """Proposes the continuation of a known greedy output, found by matching the target state it is given.

    Every `wrong_every`-th absolute position is proposed wrong on purpose, so rounds end at all offsets
    and the KV-cache rollback is exercised; with `wrong_every=None` it is an oracle.
    """

    arch = "scripted"
    config_cls = DraftConfig

    def __init__(self, target: Target, ids: list[int], num_heads: int, wrong_every: int | None) -> None:
        super().__init__(DraftConfig(arch="scripted", hidden_size=target.hidden_size, vocab_size=target.vocab_size,
                                     num_heads=num_heads))
        self.ids = ids
        self.ref = target.hidden_states(torch.tensor([ids]))[0]  # state at r produced token r+1
        self.wrong_every = wrong_every

    def _token(self, pos: int) -> int:
        tok = self.ids[pos] if pos < len(self.ids) else 0
        if self.wrong_every and pos % self.wrong_every == 0:
            tok = (tok + 1) % self.config.vocab_size
        return tok

    def _position(self, h: torch.Tensor) -> int:
        return int((self.ref - h).norm(dim=-1).argmin())

    def propose_in(self, ctx: Any, *, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                   num_tokens: int | None = None, generator: Any = None) -> Proposal:
        r = self._position(ctx.hidden[0])
        assert self.ids[r + 1] == int(ctx.token[0])
        tokens = torch.tensor([[self._token(r + 2 + i) for i in range(num_tokens or self.num_heads)]])
        return Proposal(tokens, torch.nn.functional.one_hot(tokens, self.config.vocab_size).float())

    def forward(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """Teacher-forced: head k at the anchor whose state is position r proposes token r+1+k."""
        rs = [self._position(h) for h in hidden[0]]
        T, V = len(rs), self.config.vocab_size
        return [10 * torch.nn.functional.one_hot(torch.tensor([self._token(r + 1 + k) for r in rs[: T - k]]),
                                                 V).float()[None] for k in range(1, self.num_heads + 1)]



def make_small_vocab_target(seed: int = 0) -> Target:
    """A 1-layer Llama over 6 tokens with peaked next-token distributions (real attention, real KV cache)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate("abcdef")}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="a"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="f", pad_token="a", unk_token="a")
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=SMALL_V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096, eos_token_id=5,
                      pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval().requires_grad_(False)
    model.lm_head.weight.mul_(0.6 / model.lm_head.weight.std())  # peaked p: entropy ~1 nat
    target = Target("small-vocab", model, fast)
    target.__dict__["eos_token_ids"] = [SMALL_V + 1]  # never stop: one long sequence gives many samples
    return target


def small_draft(target: Target, seed: int = 1, heads: int = 3) -> Draft:
    draft = build_draft("mlp_speculator", hidden_size=target.hidden_size, vocab_size=target.vocab_size,
                        inner_dim=16, num_heads=heads, seed=seed)
    with torch.no_grad():
        for h in draft.head:
            h.weight.mul_(3.0)  # peaked q too, so rejections and residual draws are frequent
    return draft.eval()


def chi_square_ranks(target: Target, prompt: list[int], tokens: list[int], temperature: float = 1.0) -> float:
    """p-value that each emitted token was drawn from the target's own next-token distribution.

    Categories: the emitted token's rank under the exact p at its position (p recomputed teacher-forced
    along the output). Expected counts sum p over positions; small cells are pooled.
    """
    from lkspec.sampling import warp_probs

    ids = torch.tensor([prompt + tokens])
    p = warp_probs(target.logits(ids)[0, len(prompt) - 1 : -1], temperature)
    order = p.argsort(-1, descending=True)
    ranks = (order == torch.tensor(tokens)[:, None]).float().argmax(-1)
    observed = torch.bincount(ranks, minlength=p.shape[-1]).double()
    expected = p.gather(-1, order).sum(0).double()
    obs, exp = [], []
    o_acc = e_acc = 0.0
    for o, e in zip(observed.tolist(), expected.tolist(), strict=True):
        o_acc, e_acc = o_acc + o, e_acc + e
        if e_acc >= 10:
            obs.append(o_acc)
            exp.append(e_acc)
            o_acc = e_acc = 0.0
    if e_acc > 0:
        obs[-1] += o_acc
        exp[-1] += e_acc
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp, strict=True))
    df = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2)))


def replay_rounds(target: Target, draft: Draft, res: GenerationResult, temperature: float, rule: str,
                  ) -> tuple[float, float]:
    """Mean and variance of the rounds the replay predicts along the generator's own output."""
    ids = torch.tensor(res.prompt_ids + res.tokens)
    P, n = len(res.prompt_ids), len(res.tokens)
    hidden = target.hidden_states(ids[None])[0, P - 2 : P + n - 1]
    sample = Sample("x", "x", P, ids, hidden, res.finished)
    (trace,) = draft_traces([draft], target, sample, temperature=temperature, num_heads=res.k).drafts
    return rounds_moments(trace.acceptance(rule, temperature, res.k))


# ----------------------------------------------------------------------------------------------
# T = 0: exactly the target's greedy output
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3, 4])
def test_greedy_output_equals_target_greedy(tiny_target: Target, k: int) -> None:
    prompt = tiny_target.render_chat([{"role": "user", "content": "Write a short poem about the sea."}])
    ref, _ = plain_generate(tiny_target, prompt, max_new_tokens=40, temperature=0)
    draft = ScriptedDraft(tiny_target, prompt + ref, num_heads=4, wrong_every=3)
    res = SpeculativeGenerator(tiny_target, draft, k=k, temperature=0).generate(prompt, max_new_tokens=40)
    assert res.tokens == ref
    # drafts were accepted (at most 2 in a row: every third proposal is wrong), so the cache was rolled
    # back at several offsets
    assert max(j for _, j in res.round_log) == min(k, 2) and res.rounds < len(ref)
    # the random draft (almost never right) gives the same output one token per round
    rand = build_draft("mlp_speculator", hidden_size=tiny_target.hidden_size, vocab_size=tiny_target.vocab_size,
                       inner_dim=16, num_heads=4, seed=0)
    res2 = SpeculativeGenerator(tiny_target, rand, k=k, temperature=0).generate(prompt, max_new_tokens=40)
    assert res2.tokens == ref


def test_oracle_draft_reaches_k_plus_one(tiny_target: Target) -> None:
    prompt = tiny_target.render_chat([{"role": "user", "content": "def add(a, b):"}])
    n, K = 30, 4
    ref, _ = plain_generate(tiny_target, prompt, max_new_tokens=n, temperature=0)
    assert len(ref) == n, "the tiny target should not stop early on this prompt"
    draft = ScriptedDraft(tiny_target, prompt + ref, num_heads=K, wrong_every=None)
    res = SpeculativeGenerator(tiny_target, draft, temperature=0).generate(prompt, max_new_tokens=n)
    assert res.tokens == ref
    assert res.rounds == math.ceil(n / (K + 1))
    assert res.acceptance == [1.0] * K


# ----------------------------------------------------------------------------------------------
# T > 0: the output is distributed as the target's
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["sampled", "greedy"])
def test_next_token_distribution_equals_target(rule: str) -> None:
    target = make_small_vocab_target()
    draft = small_draft(target)
    gen = SpeculativeGenerator(target, draft, temperature=1.0, rule=rule)
    prompt = [1, 2, 3]
    res = gen.generate(prompt, max_new_tokens=1500, seed=0)
    assert len(res.tokens) == 1500
    assert 0 < sum(res.position_counts()[1]) < sum(res.position_counts()[0])  # both accepts and rejections
    p_value = chi_square_ranks(target, prompt, res.tokens)
    assert p_value > 1e-3, f"generator output is not distributed as the target (p = {p_value:.2e})"


def test_chi_square_catches_a_generator_that_keeps_every_draft() -> None:
    """The distribution test has teeth: skipping the rejection step is detected."""

    class KeepEverything(SpeculativeGenerator):
        @staticmethod
        def accept(p: torch.Tensor, q: torch.Tensor, token: int, g: torch.Generator) -> bool:
            return True

    target = make_small_vocab_target()
    res = KeepEverything(target, small_draft(target), temperature=1.0).generate([1, 2, 3], max_new_tokens=600,
                                                                                seed=0)
    assert chi_square_ranks(target, [1, 2, 3], res.tokens) < 1e-6


def test_top_k_top_p_apply_to_both_sides() -> None:
    """With top-k = 2 no emitted token may be outside the target's two most likely tokens."""
    target = make_small_vocab_target()
    gen = SpeculativeGenerator(target, small_draft(target), temperature=1.0, top_k=2)
    res = gen.generate([1, 2, 3], max_new_tokens=300, seed=0)
    ids = torch.tensor([[1, 2, 3, *res.tokens]])
    top2 = target.logits(ids)[0, 2:-1].topk(2, -1).indices
    assert (top2 == torch.tensor(res.tokens)[:, None]).any(-1).all()
    assert chi_square_ranks(target, [1, 2, 3], res.tokens) == pytest.approx(
        chi_square_ranks(target, [1, 2, 3], res.tokens))  # deterministic given the seed
    res_p = SpeculativeGenerator(target, small_draft(target), temperature=0.7, top_p=0.8).generate(
        [1, 2, 3], max_new_tokens=600, seed=1)
    from lkspec.sampling import warp_probs

    p = warp_probs(target.logits(torch.tensor([[1, 2, 3, *res_p.tokens]]))[0, 2:-1], 0.7, 0, 0.8)
    assert (p.gather(-1, torch.tensor(res_p.tokens)[:, None]) > 0).all()


# ----------------------------------------------------------------------------------------------
# the engine agrees with the replay on identical outputs
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule", ["sampled", "greedy"])
def test_engine_rounds_match_replay_on_the_same_outputs(rule: str) -> None:
    """Given the output y, the engine's rounds are random only through the acceptance draws, and the
    replay gives their exact mean and variance: the engine's total must sit within a few SDs (and equal
    the replay's exactly for greedy drafts, whose acceptance is 0/1 given y)."""
    target = make_small_vocab_target()
    draft = small_draft(target, heads=4)
    gen = SpeculativeGenerator(target, draft, temperature=1.0, rule=rule)
    total, mean, var = 0, 0.0, 0.0
    for seed in range(12):
        res = gen.generate([1, 2, 3 + seed % 2], max_new_tokens=60, seed=seed)
        m, v = replay_rounds(target, draft, res, 1.0, rule)
        total, mean, var = total + res.rounds, mean + m, var + v
    if rule == "greedy":  # greedy drafts: acceptance is 0/1 given y, so the rounds are determined exactly
        assert var == 0 and total == mean
        return
    assert var > 0
    z = (total - mean) / math.sqrt(var)
    assert abs(z) < 4, (total, mean, var)


def test_engine_rounds_equal_replay_at_t0(tiny_target: Target) -> None:
    """At T = 0 acceptance is 0/1 along the greedy path: the replay's rounds are the engine's, exactly."""
    prompt = tiny_target.render_chat([{"role": "user", "content": "Write a short poem about the sea."}])
    ref, _ = plain_generate(tiny_target, prompt, max_new_tokens=30, temperature=0)
    for wrong_every in (2, 3, 5):
        draft = ScriptedDraft(tiny_target, prompt + ref, num_heads=4, wrong_every=wrong_every)
        res = SpeculativeGenerator(tiny_target, draft, temperature=0).generate(prompt, max_new_tokens=30)
        mean, var = replay_rounds(tiny_target, draft, res, 0.0, "sampled")
        assert var == 0 and mean == res.rounds
        assert res.rounds < len(res.tokens)


def test_vllm_style_count_equals_the_engine_started_after_the_first_token(tiny_target: Target) -> None:
    """`--tau-count vllm`: the prefill emits the first response token, rounds start after it. The replay's count
    equals an engine run that is handed that token as part of its prompt; lkspec's count, one from the prompt."""
    prompt = tiny_target.render_chat([{"role": "user", "content": "Write a short poem about the sea."}])
    ref, _ = plain_generate(tiny_target, prompt, max_new_tokens=30, temperature=0)
    draft = ScriptedDraft(tiny_target, prompt + ref, num_heads=4, wrong_every=3)
    gen = SpeculativeGenerator(tiny_target, draft, temperature=0)
    full = gen.generate(prompt, max_new_tokens=30)
    after = gen.generate(prompt + ref[:1], max_new_tokens=29)
    assert after.tokens == ref[1:]
    ids = torch.tensor(prompt + ref)
    P, n = len(prompt), len(ref)
    sample = Sample("x", "x", P, ids, tiny_target.hidden_states(ids[None])[0, P - 2 : P + n - 1], full.finished)
    (trace,) = draft_traces([draft], tiny_target, sample, temperature=0.0, num_heads=4).drafts
    lk, vl = (replay_trace(trace, "sampled", 0.0, 4, count) for count in ("lkspec", "vllm"))
    assert (lk.tokens, lk.rounds) == (len(full.tokens), full.rounds)
    assert (vl.tokens, vl.rounds) == (len(after.tokens), after.rounds)
    assert vl.tau != lk.tau


def test_position_counts_ignore_positions_past_the_end() -> None:
    res = GenerationResult([0, 1], list(range(7)), rounds=3, finished=False, seconds=1.0, k=3,
                           round_log=[(0, 3), (4, 1), (6, 3)])
    tried, accepted = res.position_counts()
    # round at 0: 3 tried, 3 accepted; at 4: positions 4,5 tried, 1 accepted; at 6: only position 6 is inside
    assert tried == [3, 2, 1] and accepted == [3, 1, 1]
    assert res.tau == 7 / 3
    assert np.allclose(res.acceptance, [1.0, 0.5, 1.0])


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
def test_bad_input_is_one_line(tiny_target: Target) -> None:
    d = build_draft("mlp_speculator", hidden_size=tiny_target.hidden_size, vocab_size=tiny_target.vocab_size,
                    inner_dim=16, num_heads=3, seed=0)
    cases = [
        (lambda: SpeculativeGenerator(tiny_target, d, k=4), "--k 3"),
        (lambda: SpeculativeGenerator(tiny_target, d, temperature=-0.5), ">= 0"),
        (lambda: SpeculativeGenerator(tiny_target, d, rule="typical"), "sampled, greedy"),
        (lambda: SpeculativeGenerator(tiny_target, d, top_p=0.0), "top_p"),
        (lambda: SpeculativeGenerator(tiny_target, d).generate([5], max_new_tokens=4), "chat template"),
        (lambda: SpeculativeGenerator(tiny_target, d).generate([5, 6], max_new_tokens=0), "max_new_tokens"),
    ]
    other = build_draft("mlp_speculator", hidden_size=8, vocab_size=tiny_target.vocab_size, inner_dim=8,
                        num_heads=3, seed=0)
    cases.append((lambda: SpeculativeGenerator(tiny_target, other), "trained for this target"))
    for fn, hint in cases:
        with pytest.raises(LkspecError) as err:
            fn()
        msg = str(err.value)
        assert "\n" not in msg and hint in msg, msg


def test_greedy_round_is_the_sampled_round_at_t0() -> None:
    """The T = 0 shortcut (one argmax, no one-hot p, no draws) must keep exactly the tokens Leviathan's rule
    keeps with one-hot p and q, including ties broken the same way and drafts that all pass (the bonus)."""
    g = torch.Generator().manual_seed(0)
    V, m = 50, 5
    for trial in range(200):
        logits = torch.randn(m + 1, V, generator=g)
        if trial % 4 == 0:
            logits[:, :3] = logits.max()  # ties: argmax picks the first, on both paths
        best = logits.argmax(-1)
        drafts = best[:m].clone()
        cut = trial % (m + 1)
        if cut < m:
            drafts[cut] = (drafts[cut] + 1 + trial % (V - 1)) % V  # a miss at position `cut`
        q = torch.nn.functional.one_hot(drafts, V).float()
        slow = SpeculativeGenerator.__new__(SpeculativeGenerator)
        slow.temperature, slow.top_k, slow.top_p = 0.0, 0, 1.0
        assert SpeculativeGenerator._greedy_round(logits, drafts) == slow._round(logits, drafts, q, g)
        assert SpeculativeGenerator._greedy_round(logits, drafts)[0] == min(cut, m)


def test_phases_account_for_the_generation_time(tiny_target: Target) -> None:
    prompt = tiny_target.render_chat([{"role": "user", "content": "Count to ten."}])
    res = SpeculativeGenerator(tiny_target, small_draft(tiny_target), temperature=1.0).generate(
        prompt, max_new_tokens=12, seed=0)
    assert set(res.phases) == set(PHASES) and all(v >= 0 for v in res.phases.values())
    assert sum(res.phases.values()) == pytest.approx(res.seconds, rel=1e-6)
    assert res.phases["verify"] > 0 and res.phases["propose"] > 0


def test_phase_laps_wait_for_a_cuda_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA kernels launch asynchronously: a lap that did not wait would book a phase's GPU time on a later
    phase. On CPU there is nothing to wait for (and no CUDA to call)."""
    from lkspec import specdec

    waits: list[tuple[Any, ...]] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: waits.append(a))
    gpu = torch.device("cuda", 1)
    clock = specdec._Clock(gpu)
    clock.lap("propose")
    clock.lap("verify")
    assert waits == [(gpu,), (gpu,)]  # the target's GPU, which need not be the current one
    specdec._Clock(torch.device("cpu")).lap("propose")
    assert len(waits) == 2
