"""n-gram lookup, truncated draft vocabularies and target-initialised drafts: replay and generator agree.

The generator (the engine) and the coupling replay are independent implementations of the same process,
so every new kind of proposal is checked by running both on the same outputs: at T = 0 (and for the
deterministic n-gram lookup at any T) the replay's expected rounds are the engine's rounds exactly; at
T = 1 with sampled drafts the engine's total sits within a few SDs of the replay's mean.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from lkspec.data.source import Doc
from lkspec.drafts import Draft, build_draft
from lkspec.evaluate.replay import combine, draft_traces, rounds_moments
from lkspec.evaluate.samples import Sample
from lkspec.proposers import NgramIndex, NgramSettings, ngram_proposals
from lkspec.specdec import GenerationResult, SpeculativeGenerator, plain_generate
from lkspec.targets import Target
from test_specdec import chi_square_ranks, make_small_vocab_target, small_draft

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# n-gram lookup: vLLM's rule
# ----------------------------------------------------------------------------------------------
def _vllm_rule(tokens: list[int], nmin: int, nmax: int, k: int) -> list[int]:
    """Brute force of vLLM's NgramProposer: the longest matching suffix n-gram, its earliest occurrence."""
    m = len(tokens)
    for n in range(min(nmax, m - 1), nmin - 1, -1):
        suffix = tokens[m - n :]
        for s in range(m - n):
            if tokens[s : s + n] == suffix:
                return tokens[s + n : s + n + k]
    return []


def test_ngram_index_is_vllms_rule_on_random_contexts() -> None:
    rng = random.Random(0)
    for _ in range(300):
        toks = [rng.randrange(4) for _ in range(rng.randrange(1, 40))]
        nmin, nmax, k = (*rng.choice([(1, 3), (2, 4), (1, 1), (3, 5)]), rng.randrange(1, 7))
        assert NgramIndex(NgramSettings(nmin=nmin, nmax=nmax), toks).propose(k) == _vllm_rule(toks, nmin, nmax, k)
    # the docstring example of vLLM's proposer: [1,2,3,4,2,3], n 2..3, k 4 -> [4, 2, 3]
    assert NgramIndex(NgramSettings(nmin=2, nmax=3), [1, 2, 3, 4, 2, 3]).propose(4) == [4, 2, 3]
    props = ngram_proposals([1, 2, 3], [1, 2, 9], 2, NgramSettings(nmin=1, nmax=2))
    assert props == [[], [2, 3], [3, 1]]  # b=0: no earlier 3; b=1: [1] at 0 -> 2, 3; b=2: [1, 2] at 0


def _sample_of(target: Target, res: GenerationResult) -> Sample:
    ids = torch.tensor(res.prompt_ids + res.tokens)
    P, n = len(res.prompt_ids), len(res.tokens)
    hidden = target.hidden_states(ids[None])[0, P - 2 : P + n - 1]
    return Sample("x", "x", P, ids, hidden, res.finished)


def _replay_rounds(target: Target, draft: Draft | None, res: GenerationResult, temperature: float,
                   proposer: str, rule: str = "sampled") -> tuple[float, float]:
    st = draft_traces([draft] if draft is not None else [], target, _sample_of(target, res), temperature=temperature,
                      num_heads=res.k, ngram=NgramSettings() if proposer != "draft" else None)
    trace = {"draft": lambda: st.drafts[0], "ngram": lambda: st.ngram,
             "ngram+draft": lambda: combine(st.ngram, st.drafts[0], st.ngram_lengths)}[proposer]()
    return rounds_moments(trace.acceptance(rule, temperature, res.k))


@pytest.mark.parametrize("proposer", ["ngram", "ngram+draft"])
def test_ngram_proposals_are_exact_in_the_replay_at_t0(tiny_target: Target, proposer: str) -> None:
    prompt = tiny_target.render_chat([{"role": "user", "content": "The quick brown fox jumps over the lazy dog. "
                                                                  "The quick brown fox jumps over the lazy dog."}])
    draft = build_draft("mlp_speculator", hidden_size=tiny_target.hidden_size, vocab_size=tiny_target.vocab_size,
                        inner_dim=16, num_heads=4, seed=0)
    gen = SpeculativeGenerator(tiny_target, draft if proposer != "ngram" else None, k=4, temperature=0,
                               proposer=proposer)
    res = gen.generate(prompt, max_new_tokens=40)
    ref, _ = plain_generate(tiny_target, prompt, max_new_tokens=40, temperature=0)
    assert res.tokens == ref  # lossless
    mean, var = _replay_rounds(tiny_target, draft, res, 0.0, proposer)
    assert var == 0 and mean == res.rounds
    assert res.rounds < len(res.tokens)  # the lookup accepted something on this repetitive prompt


@pytest.mark.parametrize("proposer", ["ngram", "ngram+draft"])
def test_ngram_rounds_match_the_replay_at_t1_and_stay_lossless(proposer: str) -> None:
    """n-gram tokens are accepted w.p. p(d) (q is one-hot): given y the rounds are 0/1 on those positions,
    so with the lookup alone the replay predicts the engine's rounds exactly at T = 1 as well."""
    target = make_small_vocab_target()
    draft = small_draft(target, heads=4)
    gen = SpeculativeGenerator(target, draft if proposer != "ngram" else None, k=4, temperature=1.0,
                               proposer=proposer)
    total, mean, var = 0, 0.0, 0.0
    tokens: list[int] = []
    for seed in range(10):
        res = gen.generate([1, 2, 3], max_new_tokens=80, seed=seed)
        m, v = _replay_rounds(target, draft, res, 1.0, proposer)
        total, mean, var = total + res.rounds, mean + m, var + v
        tokens = res.tokens
    if proposer == "ngram":
        assert var == 0 and total == mean
    else:
        assert abs(total - mean) < 4 * math.sqrt(max(var, 1e-12)), (total, mean, var)
    long = gen.generate([1, 2, 3], max_new_tokens=1500, seed=99)
    assert chi_square_ranks(target, [1, 2, 3], long.tokens) > 1e-3 and tokens


# ----------------------------------------------------------------------------------------------
# truncated draft vocabulary
# ----------------------------------------------------------------------------------------------
def truncated_draft(target: Target, arch: str = "mlp_speculator", keep: int = 4, heads: int = 3) -> Draft:
    kw = {"inner_dim": 16} if arch == "mlp_speculator" else {}
    d = build_draft(arch, hidden_size=target.hidden_size, vocab_size=target.vocab_size, num_heads=heads, seed=1,
                    draft_vocab_size=keep, **kw)
    d.set_token_map(torch.tensor([0, 2, 3, 4][:keep]))
    with torch.no_grad():
        for p in d.vocab_parameters():
            p.mul_(3.0)
    return d.eval()


@pytest.mark.parametrize("arch", ["mlp_speculator", "medusa"])
def test_truncated_draft_puts_no_mass_outside_its_map(arch: str) -> None:
    target = make_small_vocab_target()
    d = truncated_draft(target, arch)
    heads = d(torch.randn(1, 7, target.hidden_size), torch.randint(0, target.vocab_size, (1, 7)))
    assert all(torch.isinf(h[..., [1, 5]]).all() and torch.isfinite(h[..., [0, 2, 3, 4]]).all() for h in heads)
    prop = d.propose(torch.randn(5, target.hidden_size), torch.tensor([1, 2, 3, 4, 5]), temperature=1.0,
                     generator=torch.Generator().manual_seed(0))
    assert torch.isin(prop.tokens, torch.tensor([0, 2, 3, 4])).all()
    assert (prop.probs[..., [1, 5]] == 0).all() and torch.allclose(prop.probs.sum(-1), torch.ones(5, 3))


@pytest.mark.parametrize("rule", ["sampled", "greedy"])
def test_truncated_draft_replay_matches_the_engine(rule: str) -> None:
    target = make_small_vocab_target()
    draft = truncated_draft(target, heads=4)
    gen = SpeculativeGenerator(target, draft, temperature=1.0, rule=rule)
    total, mean, var = 0, 0.0, 0.0
    for seed in range(10):
        res = gen.generate([1, 2, 3 + seed % 2], max_new_tokens=60, seed=seed)
        m, v = _replay_rounds(target, draft, res, 1.0, "draft", rule)
        total, mean, var = total + res.rounds, mean + m, var + v
    assert abs(total - mean) <= 4 * math.sqrt(var) + 1e-9, (total, mean, var)
    res = gen.generate([1, 2, 3], max_new_tokens=1500, seed=7)
    assert chi_square_ranks(target, [1, 2, 3], res.tokens) > 1e-3  # still lossless


class _FullVocabView(torch.nn.Module):
    """The same draft seen only through its V-wide `forward` (no token map to work on)."""

    token_map = None
    aux_layers = ()

    def __init__(self, draft: Draft) -> None:
        super().__init__()
        self.draft = draft

    def forward(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> list[torch.Tensor]:
        return self.draft(hidden, input_ids)


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 3, 0.9)])
def test_replay_over_the_token_map_equals_the_full_vocabulary(temperature: float, top_k: int, top_p: float) -> None:
    target = make_small_vocab_target()
    draft = truncated_draft(target, heads=4)
    res = SpeculativeGenerator(target, None, k=4, temperature=temperature, proposer="ngram").generate(
        [1, 2, 3, 1, 2], max_new_tokens=70, seed=3)
    sample = _sample_of(target, res)
    kw = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "num_heads": 4, "chunk": 16}
    mapped, full = (draft_traces([d], target, sample, **kw).drafts[0] for d in (draft, _FullVocabView(draft)))
    for name in ("q_y", "p_y", "hit", "alpha", "alpha_greedy"):
        np.testing.assert_allclose(getattr(mapped, name), getattr(full, name), rtol=1e-6, atol=1e-7, err_msg=name)
    assert mapped.hit.sum() > 0 and (mapped.q_y == 0).any()  # both branches of the map lookup were taken


# ----------------------------------------------------------------------------------------------
# target-initialised drafts
# ----------------------------------------------------------------------------------------------
def _docs(target: Target, n: int = 12, length: int = 40, seed: int = 0) -> list[Doc]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, target.vocab_size, (length,), generator=g)
        out.append(Doc(i, ids, torch.ones(length, dtype=torch.bool), target.hidden_states(ids[None])[0]))
    return out


def test_target_init_mlp_is_exactly_the_fitted_linear_chain(tiny_target: Target) -> None:
    """GELU(x) - GELU(-x) = x: with the mirrored start, stage 1's logits are W g (v / rms v) exactly."""
    H = tiny_target.hidden_size
    d = build_draft("mlp_speculator", hidden_size=H, vocab_size=tiny_target.vocab_size, inner_dim=2 * H,
                    num_heads=3, tie_weights=True, seed=0)
    docs = _docs(tiny_target)
    t = tiny_target.init_tensors()
    d.init_from_target(t, lambda: iter(docs))
    h, ids = docs[0].hidden[None], docs[0].input_ids[None]
    z1 = d(h, ids)[0][0]
    P = d.proj[0].weight[:H] * d.state_weight
    Q = d.emb[0].weight[:, :H] * (d.emb_weight * math.sqrt(d.config.inner / 2))
    v = h[0, :-1] @ P.T + Q[ids[0, 1:]]
    expected = (v / v.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()) * t.norm_scale @ t.lm_head.T
    torch.testing.assert_close(z1, expected, rtol=2e-4, atol=2e-4)
    with pytest.raises(Exception, match="inner_dim = 2 x hidden size"):
        build_draft("mlp_speculator", hidden_size=H, vocab_size=tiny_target.vocab_size, inner_dim=H,
                    seed=0).init_from_target(t, lambda: iter(docs))


@pytest.mark.parametrize("arch", ["mlp_speculator", "medusa"])
def test_target_init_predicts_better_than_random(tiny_target: Target, arch: str) -> None:
    """On held-out documents the fitted start accepts more than a random draft (alpha of head 1)."""
    H, V = tiny_target.hidden_size, tiny_target.vocab_size
    kw = {"inner_dim": 2 * H, "tie_weights": True} if arch == "mlp_speculator" else {}
    # a learnable stream: each document repeats a short random phrase
    g = torch.Generator().manual_seed(3)
    docs = []
    for i in range(40):
        phrase = torch.randint(0, V, (5,), generator=g)
        ids = phrase.repeat(8)
        docs.append(Doc(i, ids, torch.ones(40, dtype=torch.bool), tiny_target.hidden_states(ids[None])[0]))
    train, held = docs[:32], docs[32:]

    @torch.no_grad()
    def alpha1(d: Draft) -> float:
        vals = []
        for doc in held:
            q = d(doc.hidden[None], doc.input_ids[None])[0][0].softmax(-1)
            p = tiny_target.logits_from_hidden(doc.hidden[1:]).softmax(-1)
            vals.append(torch.minimum(p, q).sum(-1).mean())
        return float(torch.stack(vals).mean())

    rand = build_draft(arch, hidden_size=H, vocab_size=V, num_heads=3, seed=0, **kw)
    fitted = build_draft(arch, hidden_size=H, vocab_size=V, num_heads=3, seed=0, **kw)
    fitted.init_from_target(tiny_target.init_tensors(), lambda: iter(train))
    assert alpha1(fitted) > alpha1(rand) + 0.05, (alpha1(fitted), alpha1(rand))
    assert np.isfinite(alpha1(fitted))


@pytest.mark.parametrize("name", ["kl", "lk_alpha"])
def test_truncated_step_runner_equals_the_plain_truncated_loss(tiny_target: Target, name: str) -> None:
    """Packed, windowed micro-batches with a token map give the gradient of the plain per-document loss
    over the kept columns (alpha with the full target normaliser, KL against the renormalised p~)."""
    from lkspec.alignment import head_mask
    from lkspec.losses import draft_head_term
    from lkspec.train.step import StepRunner, head_modules

    H, V = tiny_target.hidden_size, tiny_target.vocab_size
    draft = build_draft("mlp_speculator", seed=1, hidden_size=H, vocab_size=V, num_heads=3, inner_dim=16,
                        draft_vocab_size=V // 2)
    draft.set_token_map(torch.randperm(V, generator=torch.Generator().manual_seed(0))[: V // 2])
    docs = _docs(tiny_target, n=6, length=30)
    keep = draft.token_map
    terms, counts = [], [0.0] * 3
    for d in docs:
        for k in range(1, 4):
            counts[k - 1] += float(head_mask(d.loss_mask[None], k).sum())
    for d in docs:
        h, ids = d.hidden.float()[None], d.input_ids[None]
        states = draft.head_states(h, ids)
        full = tiny_target.logits_from_hidden(h[0])
        for k in range(1, 4):
            m = head_mask(d.loss_mask[None], k)[0]
            z = states[k - 1][0][m] @ draft.head_weight(k).T
            idx = torch.arange(len(d) - k)[m] + k
            terms.append(draft_head_term(name, k, z, full[idx][:, keep], count=counts[k - 1],
                                         target_lse=torch.logsumexp(full[idx], -1)).loss)
    sum(terms).backward()
    ref = {n: p.grad.clone() for n, p in draft.named_parameters()}
    draft.zero_grad(set_to_none=True)
    runner = StepRunner(draft, tiny_target, head_modules(draft), loss=name, eta=3.0, gamma=0.8, temperature=1.0,
                        impl="chunked", micro_batch_tokens=24)
    runner.accumulate(runner.pack(docs))
    for n, p in draft.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=2e-4, atol=2e-6, msg=n)


# ----------------------------------------------------------------------------------------------
# token maps on disk: lkspec's own directories keep them; exports express them or say why not
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["mlp_speculator", "medusa"])
def test_token_map_survives_save_and_load(tmp_path, arch: str) -> None:
    from lkspec.drafts import load_draft

    target = make_small_vocab_target()
    d = truncated_draft(target, arch)
    back = load_draft(d.save(tmp_path / "d", target=target.identity), target=target.identity)
    assert back.config == d.config and torch.equal(back.token_map, d.token_map)
    h, ids = torch.randn(1, 7, target.hidden_size), torch.randint(0, target.vocab_size, (1, 7))
    for x, y in zip(d(h, ids), back(h, ids), strict=True):
        torch.testing.assert_close(x, y)


def test_truncated_mlp_exports_as_its_exact_full_vocabulary_twin(tmp_path) -> None:
    """vLLM's MLPSpeculator has no token map: the export widens the stage by one constant channel that gives
    every token outside the map a -30000 logit, and the export loads back with the kept logits unchanged."""
    from lkspec.drafts import load_draft
    from lkspec.export import export_draft

    target = make_small_vocab_target()
    d = truncated_draft(target, "mlp_speculator")
    run = d.save(tmp_path / "run", target=target.identity)
    res = export_draft(run, tmp_path / "out", dtype="fp32", base_model="test/small")
    back = load_draft(tmp_path / "out")
    assert back.token_map is None and back.config.inner == d.config.inner + 1
    assert res.config["inner_dim"] == d.config.inner + 1
    h, ids = torch.randn(2, 8, target.hidden_size), torch.randint(0, target.vocab_size, (2, 8))
    kept, off = d.token_map, torch.tensor([1, 5])
    for x, y in zip(d(h, ids), back(h, ids), strict=True):
        torch.testing.assert_close(y[..., kept], x[..., kept], rtol=1e-5, atol=1e-5)
        assert (y[..., off] <= -1e4).all()
    prov = __import__("json").loads((tmp_path / "out" / "provenance.json").read_text())
    assert prov["export"]["full_vocab_expansion"]["max_kept_logit_gap"] < 1e-4


def test_truncated_medusa_has_no_vllm_layout_and_says_what_serves_it(tmp_path) -> None:
    from lkspec.errors import NoServedLayoutError
    from lkspec.export import export_draft

    target = make_small_vocab_target()
    run = truncated_draft(target, "medusa").save(tmp_path / "run", target=target.identity)
    with pytest.raises(NoServedLayoutError) as err:
        export_draft(run, tmp_path / "out", dtype="fp32", base_model="test/small")
    msg = str(err.value)
    assert "\n" not in msg and "lkspec generate" in msg and "vocab_size" in msg
    assert not (tmp_path / "out").exists()


def test_target_initialised_draft_replay_matches_the_engine() -> None:
    """A target-initialised MLP-Speculator (mirrored stages, exactly linear at the start) in the engine and in
    the replay: same rounds within the acceptance draws' spread at T = 1, identical at T = 0."""
    target = make_small_vocab_target()
    H = target.hidden_size
    d = build_draft("mlp_speculator", hidden_size=H, vocab_size=target.vocab_size, inner_dim=2 * H, num_heads=4,
                    tie_weights=True, seed=0)
    d.init_from_target(target.init_tensors(), lambda: iter(_docs(target, n=8, length=40)))
    d.eval()
    gen = SpeculativeGenerator(target, d, temperature=1.0)
    total, mean, var = 0, 0.0, 0.0
    for seed in range(10):
        res = gen.generate([1, 2, 3], max_new_tokens=60, seed=seed)
        m, v = _replay_rounds(target, d, res, 1.0, "draft")
        total, mean, var = total + res.rounds, mean + m, var + v
    assert sum(res.position_counts()[1]) > 0  # the fitted start gets drafts accepted
    assert abs(total - mean) <= 4 * math.sqrt(var) + 1e-9, (total, mean, var)
    res0 = SpeculativeGenerator(target, d, temperature=0).generate([1, 2, 3], max_new_tokens=40)
    mean0, var0 = _replay_rounds(target, d, res0, 0.0, "draft")
    assert var0 == 0 and mean0 == res0.rounds


def test_stored_normaliser_gives_the_same_truncated_step(tiny_target: Target) -> None:
    """Features that carry the target's full logsumexp let a truncated draft's step project only its kept rows;
    the gradient is the one computed from the full projection."""
    from dataclasses import replace

    from lkspec.data.plan import full_logsumexp
    from lkspec.train.step import StepRunner, head_modules

    H, V = tiny_target.hidden_size, tiny_target.vocab_size
    draft = build_draft("mlp_speculator", seed=2, hidden_size=H, vocab_size=V, num_heads=3, inner_dim=16,
                        draft_vocab_size=V // 3)
    draft.set_token_map(torch.randperm(V, generator=torch.Generator().manual_seed(4))[: V // 3])
    plain = _docs(tiny_target, n=5, length=30)
    stored = [replace(d, target_lse=full_logsumexp(tiny_target, d.hidden)) for d in plain]
    grads = []
    for docs in (plain, stored):
        draft.zero_grad(set_to_none=True)
        runner = StepRunner(draft, tiny_target, head_modules(draft), loss="lk_hybrid", eta=3.0, gamma=0.8,
                            temperature=1.0, impl="chunked", micro_batch_tokens=40)
        mbs = runner.pack(docs)
        assert all((mb.target_lse is not None) == (docs is stored) for mb in mbs)
        runner.accumulate(mbs)
        grads.append({n: p.grad.clone() for n, p in draft.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-6, msg=n)
