"""`lkspec eval` end to end on the tiny target: samples and their cache, oracle / never drafts, the
results file, tables and plot, paired comparisons, and one-line errors for bad input."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from helpers import StubDraft
from lkspec.cli import main
from lkspec.drafts import Draft, DraftConfig, build_draft
from lkspec.errors import LkspecError
from lkspec.evaluate import (
    DraftEntry,
    Prompt,
    SampleSettings,
    eval_settings,
    evaluate,
    load_drafts,
    run_eval,
    target_samples,
)
from lkspec.report import speed_verdict
from lkspec.specdec import plain_generate
from lkspec.speed import Costs, expected_tau, predicted_speedup
from lkspec.targets import Target, TargetIdentity

K = 3


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Samples are cached under $LKSPEC_CACHE; tests share one private cache per session."""
    root = tmp_path_factory.getbasetemp() / "lkspec-cache-eval"
    monkeypatch.setenv("LKSPEC_CACHE", str(root))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _Fixed(StubDraft):
    """A draft defined only by its teacher-forced forward (enough for the replay)."""

    arch = "fixed"
    config_cls = DraftConfig

    def __init__(self, target: Target, num_heads: int = K) -> None:
        super().__init__(DraftConfig(arch="fixed", hidden_size=target.hidden_size, vocab_size=target.vocab_size,
                                     num_heads=num_heads))
        self.target = target


class OracleDraft(_Fixed):
    """q = the target's own p at the position each head predicts (it calls the target)."""

    def forward(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> list[torch.Tensor]:
        logits = self.target.logits_from_hidden(hidden)
        return [logits[:, k:] for k in range(1, self.num_heads + 1)]


class NeverDraft(_Fixed):
    """All of q's mass on one token that the target never emitted in these samples."""

    def __init__(self, target: Target, token: int) -> None:
        super().__init__(target)
        self.token = token

    def forward(self, hidden: torch.Tensor, input_ids: torch.Tensor) -> list[torch.Tensor]:
        B, T, _ = hidden.shape
        out = []
        for k in range(1, self.num_heads + 1):
            z = torch.full((B, max(T - k, 0), self.config.vocab_size), float("-inf"))
            z[..., self.token] = 0.0
            out.append(z)
        return out


def _prompts(target: Target, n: int = 4, bench: str = "mtbench") -> dict[str, list[Prompt]]:
    from lkspec.data.benchmarks import load_benchmark

    return {bench: [Prompt(bench, r.id, target.render_chat(r.messages)) for r in load_benchmark(bench, limit=n)]}


def _mlp(target: Target, seed: int = 0, heads: int = K) -> Draft:
    return build_draft("mlp_speculator", hidden_size=target.hidden_size, vocab_size=target.vocab_size, inner_dim=16,
                       num_heads=heads, seed=seed)


# ----------------------------------------------------------------------------------------------
# target samples
# ----------------------------------------------------------------------------------------------
def test_greedy_samples_equal_hf_generate_and_hidden_states(tiny_target: Target) -> None:
    prompts = _prompts(tiny_target, 3)["mtbench"]
    assert len({len(p.ids) for p in prompts}) > 1  # left padding is exercised
    run = target_samples(tiny_target, prompts, SampleSettings(temperature=0, max_new_tokens=12), batch_size=3,
                         use_cache=False, progress=False)
    for p, s in zip(prompts, run.samples, strict=True):
        ref, _ = plain_generate(tiny_target, p.ids, max_new_tokens=12, temperature=0)
        assert s.response.tolist() == ref
        full = tiny_target.hidden_states(s.ids[None])[0]
        P = len(p.ids)
        assert s.hidden.shape == (s.n + 1, tiny_target.hidden_size)
        torch.testing.assert_close(s.hidden, full[P - 2 : P + s.n - 1], atol=1e-4, rtol=1e-4)


def test_samples_do_not_depend_on_batching_and_are_cached(tiny_target: Target) -> None:
    prompts = _prompts(tiny_target, 4)["mtbench"]
    settings = SampleSettings(temperature=1.0, seed=3, max_new_tokens=10)
    one = target_samples(tiny_target, prompts, settings, batch_size=1, use_cache=False, progress=False)
    first = target_samples(tiny_target, prompts[:2], settings, batch_size=4, progress=False)
    assert first.generated == 2
    assert [a.response.tolist() for a in one.samples[:2]] == [b.response.tolist() for b in first.samples]
    again = target_samples(tiny_target, prompts, settings, batch_size=4, progress=False)
    assert again.generated == 2  # only the two new prompts were generated; the others came from the cache
    assert [a.response.tolist() for a in one.samples] == [b.response.tolist() for b in again.samples]
    cached = target_samples(tiny_target, prompts, settings, progress=False)
    assert cached.generated == 0 and cached.seconds == 0.0
    torch.testing.assert_close(cached.samples[3].hidden, again.samples[3].hidden)
    other_seed = target_samples(tiny_target, prompts, settings.model_copy(update={"seed": 4}), progress=False)
    assert other_seed.generated == 4
    assert [s.response.tolist() for s in other_seed.samples] != [s.response.tolist() for s in cached.samples]


# ----------------------------------------------------------------------------------------------
# tau for drafts whose answer is known
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_oracle_draft_gives_k_plus_one(tiny_target: Target, temperature: float) -> None:
    prompts = _prompts(tiny_target, 4)
    s = eval_settings(benchmarks=["mtbench"], temperatures=[temperature], rules=["sampled"], max_new_tokens=12,
                      speed=False)  # a stub draft has no proposal to time
    rep = evaluate(tiny_target, [DraftEntry("oracle", "-", OracleDraft(tiny_target))], s, progress=False,
                   prompts=prompts)
    row = rep.row("oracle", "mtbench", temperature, "sampled")
    cell = rep.cells[("oracle", temperature, "sampled", "mtbench")]
    for c in cell.prompts:  # every round emits K + 1 tokens until the response ends
        assert c.rounds == pytest.approx(np.ceil(c.tokens / (K + 1)), abs=1e-4)
    assert np.allclose(row["acceptance"], 1.0, atol=1e-5) and np.allclose(row["alpha"], 1.0, atol=1e-5)
    if all(c.tokens % (K + 1) == 0 for c in cell.prompts):
        assert row["tau"] == pytest.approx(K + 1, abs=1e-4)


def test_never_draft_gives_exactly_one(tiny_target: Target) -> None:
    prompts = _prompts(tiny_target, 4)
    s = eval_settings(benchmarks=["mtbench"], temperatures=[0, 1], max_new_tokens=12, baseline=False, speed=False)
    used: set[int] = set()
    for T in (0.0, 1.0):
        run = target_samples(tiny_target, prompts["mtbench"], SampleSettings(temperature=T, max_new_tokens=12),
                             progress=False)
        for smp in run.samples:
            used.update(smp.response.tolist())
    token = next(t for t in range(tiny_target.vocab_size) if t not in used)
    rep = evaluate(tiny_target, [DraftEntry("never", "-", NeverDraft(tiny_target, token))], s, progress=False,
                   prompts=prompts)
    for row in rep.rows:
        assert row["tau"] == 1.0 and row["ci95"] == [1.0, 1.0]
        assert row["acceptance_cumulative"] == [0.0] * K


# ----------------------------------------------------------------------------------------------
# the report
# ----------------------------------------------------------------------------------------------
def test_paired_comparison_and_seeds(tiny_target: Target) -> None:
    prompts = _prompts(tiny_target, 4)
    a, b = _mlp(tiny_target, 0), _mlp(tiny_target, 1)
    s = eval_settings(benchmarks=["mtbench"], temperatures=[1], rules=["sampled"], max_new_tokens=10, seeds=[0, 1])
    rep = evaluate(tiny_target, [DraftEntry("a", "-", a), DraftEntry("b", "-", b), DraftEntry("a-again", "-", a)],
                   s, progress=False, prompts=prompts)
    ra, rb = rep.row("a", "mtbench", 1.0, "sampled"), rep.row("b", "mtbench", 1.0, "sampled")
    assert ra["num_prompts"] == 4 and ra["num_tokens"] > 40  # two seeds pooled per prompt
    assert ra["ci95"][0] <= ra["tau"] <= ra["ci95"][1]
    same = rep.difference("a-again", "a", "mtbench", 1.0, "sampled")
    assert same["delta_tau"] == 0.0 and same["ci95"] == [0.0, 0.0]  # paired: identical drafts differ by nothing
    diff = rep.difference("b", "a", "mtbench", 1.0, "sampled")
    assert diff["delta_tau"] == pytest.approx(rb["tau"] - ra["tau"])
    # the paired CI is narrower than the two marginal CIs combined
    assert diff["ci95"][1] - diff["ci95"][0] < (ra["ci95"][1] - ra["ci95"][0]) + (rb["ci95"][1] - rb["ci95"][0])


def test_predicted_speedup_is_the_cost_model_on_the_measured_acceptance(tiny_target: Target) -> None:
    """Every row carries the cost model's prediction from its own acceptance and its proposer's measured costs
    (a NaN position, never reached, accepts nothing); with free proposals and a flat pass cost an oracle's
    prediction is its tau(K) = K + 1 at the largest K; --no-speed times nothing."""
    prompts = _prompts(tiny_target, 3)
    s = eval_settings(benchmarks=["mtbench"], temperatures=[0, 1], max_new_tokens=10)
    rep = evaluate(tiny_target, [DraftEntry("mlp", "-", _mlp(tiny_target))], s, progress=False, prompts=prompts)
    speed = rep.to_json()["speed"]
    assert len(speed["pass_seconds"]) == K + 1 and min(speed["pass_seconds"]) > 0
    assert {(c["draft"], c["temperature"]) for c in speed["proposers"]} == {
        (lab, T) for lab in ("mlp", "mlp+ngram", "ngram") for T in (0.0, 1.0)}
    for row in rep.rows:
        sp, c = row["predicted_speedup"], rep.costs[(row["draft"], row["temperature"])]
        cum = [0.0 if np.isnan(v) else v for v in row["acceptance_cumulative"]]
        assert sp["at_k"] == pytest.approx(predicted_speedup(cum, K, c))
        assert 1 <= sp["best_k"] <= K and sp["at_best_k"] >= sp["at_k"] - 1e-12
    assert "Predicted speed-up of `lkspec generate`" in rep.markdown()
    lines = [line for line in speed_verdict(rep) if line.startswith("- T=")]
    for T, line in zip((0.0, 1.0), lines, strict=True):  # the demo's verdict names the fastest proposer per T
        best = max((rep.row(lab, "mean", T, "sampled") for lab in ("mlp", "mlp+ngram", "ngram")),
                   key=lambda r: r["predicted_speedup"]["at_best_k"])
        assert line.startswith(f"- T={T:g}: `{best['draft']}` {best['predicted_speedup']['at_best_k']:.2f}x"), line

    oracle = evaluate(tiny_target, [DraftEntry("oracle", "-", OracleDraft(tiny_target))],
                      s.model_copy(update={"speed": False, "baseline": False, "temperatures": [0.0]}),
                      progress=False, prompts=prompts)
    assert "speed" not in oracle.to_json() and all("predicted_speedup" not in r for r in oracle.rows)
    free = dataclasses.replace(oracle, rows=[], differences=[], costs={("oracle", 0.0): Costs((0.05,) * (K + 1))})
    row = free.row("oracle", "mtbench", 0.0, "sampled")
    assert min(row["acceptance_cumulative"]) > 0.5  # every position accepts (the last round may be cut short)
    sp = row["predicted_speedup"]
    assert sp["best_k"] == K and sp["at_best_k"] == pytest.approx(expected_tau(row["acceptance_cumulative"], K))


def test_cli_writes_results_table_and_plot(tiny_target_dir: Path, tiny_target: Target, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    d1 = _mlp(tiny_target, 0).save(tmp_path / "kl", target=tiny_target.identity)
    d2 = build_draft("medusa", hidden_size=tiny_target.hidden_size, vocab_size=tiny_target.vocab_size,
                     num_heads=4, seed=0).save(tmp_path / "lk", target=tiny_target.identity)
    out = tmp_path / "res" / "results.json"
    main(["eval", str(d1), str(d2), "--target", str(tiny_target_dir), "-b", "mtbench,gsm8k", "--limit", "3",
          "--max-new-tokens", "8", "-t", "0", "-t", "1", "--out", str(out), "--bootstrap", "200", "--no-ngram"])
    res = json.loads(out.read_text())
    assert res["format"] == "lkspec-eval/1" and res["k"] == K and res["max_new_tokens"] == 8 and res["seed"] == 0
    assert TargetIdentity.model_validate(res["target"]) == tiny_target.identity
    keys = {"draft", "draft_path", "benchmark", "temperature", "rule", "tau", "ci95", "num_prompts", "num_tokens",
            "acceptance", "acceptance_cumulative", "alpha", "predicted_speedup"}
    assert all(set(r) == keys for r in res["rows"])
    # 2 drafts x 2 temperatures x 2 rules x (2 benchmarks + mean)
    assert len(res["rows"]) == 2 * 2 * 2 * 3
    assert {r["benchmark"] for r in res["rows"]} == {"mtbench", "gsm8k", "mean"}
    for r in res["rows"]:
        assert len(r["acceptance"]) == len(r["acceptance_cumulative"]) == len(r["alpha"]) == K
        assert r["ci95"][0] <= r["tau"] + 1e-9 and r["tau"] <= r["ci95"][1] + 1e-9
    mean = next(r for r in res["rows"] if r["benchmark"] == "mean" and r["draft"] == "lk" and r["temperature"] == 1)
    parts = [r for r in res["rows"] if r["draft"] == "lk" and r["temperature"] == 1 and r["rule"] == mean["rule"]
             and r["benchmark"] != "mean"]
    assert mean["tau"] == pytest.approx(np.mean([r["tau"] for r in parts]))
    assert mean["num_prompts"] == 6
    md = out.with_suffix(".md").read_text()
    assert "| kl | sampled |" in md and "Paired difference in tau vs `kl`" in md and "T=1 GSM8K" in md
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------------------------------
def _one_line_error(fn: Any, hint: str) -> None:
    with pytest.raises(LkspecError) as err:
        fn()
    msg = str(err.value)
    assert "\n" not in msg and hint in msg, msg


def test_bad_settings_are_one_line_errors() -> None:
    _one_line_error(lambda: eval_settings(temperatures=[-1.0]), ">= 0")
    _one_line_error(lambda: eval_settings(rules=["typical"]), "sampled, greedy")
    _one_line_error(lambda: eval_settings(benchmarks=["mmlu"]), "choose from")
    _one_line_error(lambda: eval_settings(benchmarks=[]), "--benchmark")
    _one_line_error(lambda: eval_settings(benchmarks=[""]), "--benchmark")
    _one_line_error(lambda: eval_settings(temperatures=[]), "--temperature")
    _one_line_error(lambda: eval_settings(rules=[]), "--rule")
    _one_line_error(lambda: eval_settings(limit=0), "limit")
    _one_line_error(lambda: eval_settings(colour="red"), "unknown key")
    _one_line_error(lambda: eval_settings(tau_count="hf"), "lkspec, vllm")


def test_bad_drafts_are_one_line_errors(tiny_target: Target, tmp_path: Path) -> None:
    other = TargetIdentity(name="another-model", vocab_size=tiny_target.vocab_size,
                           hidden_size=tiny_target.hidden_size, tokenizer_hash="0" * 64)
    foreign = _mlp(tiny_target).save(tmp_path / "foreign", target=other)
    _one_line_error(lambda: load_drafts([foreign], tiny_target), "another-model")
    three = _mlp(tiny_target).save(tmp_path / "three", target=tiny_target.identity)
    drafts = load_drafts([three], tiny_target)
    _one_line_error(lambda: evaluate(tiny_target, drafts, eval_settings(k=4), progress=False), "--k 3")
    _one_line_error(lambda: load_drafts([], tiny_target), "draft")
    _one_line_error(lambda: load_drafts([three, three], tiny_target, labels=["x"]), "--label")
    _one_line_error(lambda: run_eval(str(tmp_path), [three], eval_settings(), out=tmp_path / "r.txt"), ".json")


def test_cli_bad_input_exits_2_with_one_line(tiny_target_dir: Path, tiny_target: Target, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    d = _mlp(tiny_target).save(tmp_path / "d", target=tiny_target.identity)
    base = ["eval", str(d), "--target", str(tiny_target_dir), "--out", str(tmp_path / "r.json")]
    for extra, hint in [(["-t", "-1"], ">= 0"), (["--rule", "typical"], "sampled"), (["-b", "mmlu"], "mtbench"),
                        (["-b", ""], "--benchmark"), (["-k", "9"], "--k 3"), (["-t", "hot"], "--temperature"),
                        (["--tau-count", "hf"], "--tau-count")]:
        with pytest.raises(SystemExit) as exc:
            main(base + extra)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]  # (after the loader's progress bar)
        assert err.startswith("error:") and "\n" not in err and hint in err, err
    assert not (tmp_path / "r.json").exists()  # nothing half-written


def test_a_draft_is_not_scored_on_the_benchmark_prompts_it_trained_on(tmp_path: Path) -> None:
    from lkspec.evaluate.run import DraftEntry, check_not_trained_on

    def run_dir(name: str, source: dict[str, Any] | None) -> DraftEntry:
        d = tmp_path / name
        d.mkdir()
        record = {"lkspec": {"data": {"source": source}}} if source is not None else {"architectures": ["x"]}
        (d / "config.json").write_text(json.dumps(record))
        return DraftEntry(name, str(d), None)  # type: ignore[arg-type]  # the check reads the record only

    combined = run_dir("combined", {"parts": [{"prompts": {"source": "sharegpt"}},
                                              {"prompts": {"source": "bench:mtbench,gsm8k", "skip": 20}}]})
    with pytest.raises(LkspecError, match=r"'combined' was trained on gsm8k prompts from prompt 20.*--limit 20"):
        check_not_trained_on(combined, ["humaneval", "gsm8k"], 40)
    check_not_trained_on(combined, ["humaneval", "gsm8k"], 20)  # the first 20 were never trained on
    check_not_trained_on(combined, ["humaneval"], None)
    single = run_dir("single", {"prompts": {"source": "bench:humaneval"}})  # one feature store, skip unset
    with pytest.raises(LkspecError, match="every prompt"):
        check_not_trained_on(single, ["humaneval"], None)
    check_not_trained_on(run_dir("outside", None), ["humaneval"], None)  # no training record: nothing to check
    exported = run_dir("exported", None)  # an lkspec export keeps the record in provenance.json
    (Path(exported.path) / "provenance.json").write_text(json.dumps(
        {"data": {"source": {"prompts": {"source": "bench:gsm8k", "skip": 5}}}}))
    with pytest.raises(LkspecError, match=r"'exported' was trained on gsm8k prompts from prompt 5"):
        check_not_trained_on(exported, ["gsm8k"], 10)
