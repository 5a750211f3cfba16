"""The cost model (lkspec.speed) and `--k auto`: K chosen for tokens per second, output still exact."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch
from tests.helpers import run_cli
from tests.test_specdec import chi_square_ranks, make_small_vocab_target, small_draft

from lkspec.errors import LkspecError
from lkspec.specdec import SpeculativeGenerator
from lkspec.speed import AdaptiveK, Costs, best_k, expected_tau, paired_costs, predicted_speedup

pytestmark = pytest.mark.usefixtures("one_thread")


def test_expected_tau_and_speedup_follow_the_formula() -> None:
    cum = [0.6, 0.3, 0.1]
    assert expected_tau(cum, 0) == 1.0 and expected_tau(cum, 2) == pytest.approx(1.9)
    costs = Costs((1.0, 1.1, 1.3, 2.0), propose_per_token=0.05, overhead=0.02)
    assert costs.round(2) == pytest.approx(1.3 + 0.1 + 0.02)
    assert predicted_speedup(cum, 2, costs) == pytest.approx(1.9 / 1.42)
    assert costs.relative() == pytest.approx([1.0, 1.1, 1.3, 2.0])


def test_best_k_trades_acceptance_against_pass_cost() -> None:
    flat = Costs((1.0,) * 7)  # verification as cheap as one token: draft every position that is ever accepted
    assert best_k([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], flat, 6) == 6
    steep = Costs(tuple(1.0 + 0.5 * n for n in range(7)))  # each drafted token costs half a pass
    # 1.9/1.5, 2.7/2, 3.4/2.5, 4.0/3: the fourth draft's 0.6 tokens cost more than they bring
    assert best_k([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], steep, 6) == 3
    assert best_k([0.4, 0.1, 0.02, 0.0, 0.0, 0.0], steep, 6) == 1
    assert best_k([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], steep, 2) == 2  # never above k_max


def test_adaptive_k_lowers_k_when_drafts_are_rejected_and_keeps_it_when_accepted() -> None:
    costs = Costs(tuple(1.0 + 0.3 * n for n in range(7)))
    good = AdaptiveK(costs, 6)
    assert good.k < 6  # nothing measured yet: the prior's K, not the most
    for _ in range(50):
        good.update(good.k, good.k)  # every draft accepted: unmeasured positions look as good, K grows
    assert good.k == 6
    bad = AdaptiveK(costs, 6)
    for _ in range(50):
        bad.update(bad.k, 0)  # every first draft rejected
    assert bad.k == 1
    timed = Costs.measured(costs.passes, {"propose": 6.0, "accept": 0.5, "bookkeeping": 0.5, "verify": 2.0,
                                          "prefill": 0.0}, rounds=1, drafted=6)
    assert timed.propose_per_token == pytest.approx(1.0) and timed.overhead == pytest.approx(1.0)
    assert AdaptiveK(timed, 6).update(6, 6) < good.k  # a proposal that costs a pass a token is cut back


def test_pass_costs_pair_each_size_with_the_one_token_pass_of_its_round() -> None:
    """The host slows down 3x inside round 3, after its one-token pass and before its 2-token pass: the
    sizes' separate medians land on a fast round for one size and a slow one for the other and report 6
    one-token passes; ratios within each round keep the true 2."""
    one = [1.0 * f for f in (1, 1, 1, 3, 3)]
    two = [2.0 * f for f in (1, 1, 3, 3, 3)]
    assert statistics.median(two) / statistics.median(one) == 6.0
    assert paired_costs([one, two]) == pytest.approx((1.0, 2.0))


@pytest.mark.parametrize("proposer", ["draft", "ngram+draft"])
def test_k_auto_varies_k_and_stays_distributed_as_the_target(proposer: str) -> None:
    """Lossless under --k auto: K depends only on earlier rounds (and, with the n-gram lookup, on whether the
    context has a match, which the round's draws cannot change), never on the current round's draws."""
    target = make_small_vocab_target()
    gen = SpeculativeGenerator(target, small_draft(target), k="auto", temperature=1.0, proposer=proposer)
    gen._costs = Costs(tuple(1.0 + 0.15 * n for n in range(gen.k + 1)))  # cheap enough that K sometimes grows
    prompt = [1, 2, 3]
    res = gen.generate(prompt, max_new_tokens=1500, seed=0)
    assert len(res.tokens) == 1500 and gen.auto_k and res.k == 3
    assert len(set(res.drafted)) > 1 and max(res.drafted) <= 3
    p_value = chi_square_ranks(target, prompt, res.tokens)
    assert p_value > 1e-3, f"--k auto output is not distributed as the target (p = {p_value:.2e})"


def test_k_auto_at_t0_is_the_target_greedy_output() -> None:
    target = make_small_vocab_target()
    plain = SpeculativeGenerator(target, small_draft(target), k=1, temperature=0).generate([1, 2, 3],
                                                                                           max_new_tokens=200)
    auto = SpeculativeGenerator(target, small_draft(target), k="auto", temperature=0)
    res = auto.generate([1, 2, 3], max_new_tokens=200)
    assert res.tokens == plain.tokens and len(auto.costs().passes) == 4  # measured for K up to the 3 heads


def test_bad_k_is_one_line() -> None:
    target = make_small_vocab_target()
    with pytest.raises(LkspecError, match="K must be a number of tokens or 'auto', got 'fast'"):
        SpeculativeGenerator(target, small_draft(target), k="fast")
    assert torch.is_grad_enabled()


def test_generate_k_auto_from_the_command_line(tiny_target_dir: Path) -> None:
    ok = run_cli("generate", "--proposer", "ngram", "--k", "auto", "--target", str(tiny_target_dir), "--prompt",
                 "one two one two one two", "-t", "1", "--max-new-tokens", "12", "--no-compare", "--no-stream")
    assert ok.returncode == 0, ok.stderr
    assert "cost relative to one token: [1.00, " in ok.stdout and "--k auto drafted" in ok.stdout
    bad = run_cli("generate", "--proposer", "ngram", "--k", "fast", "--target", str(tiny_target_dir), "--prompt", "x")
    assert bad.returncode != 0 and "Traceback" not in bad.stderr and "'auto'" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
