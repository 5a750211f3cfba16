"""Training: config, packing exactness, a tiny run that learns, checkpoints, init-from, bad inputs."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import pytest
import torch

from lkspec.alignment import head_mask, head_targets
from lkspec.data.features import Doc, FeatureStore, FeatureWriter
from lkspec.drafts import build_draft, load_draft
from lkspec.errors import LkspecError
from lkspec.io import read_json
from lkspec.losses import draft_head_term, draft_loss
from lkspec.targets import LMHead, Target, load_lm_head
from lkspec.train import build_config, train
from lkspec.train.batching import plan_data, survey
from lkspec.train.config import TrainConfig, changed_keys, config_dict
from lkspec.train.loop import Trainer
from lkspec.train.metrics import HeadSums
from lkspec.train.step import StepRunner, head_modules


# ------------------------------------------------------------------------------------------------
# helpers shared with test_train_parallel.py and test_train_embedded.py
# ------------------------------------------------------------------------------------------------
def make_docs(target: Target, n_docs: int = 24, *, min_len: int = 10, max_len: int = 40, prompt: int = 4,
              seed: int = 0) -> list[Doc]:
    """Random token sequences, their real (tiny) target hidden states, loss on all but a short prompt."""
    g = torch.Generator().manual_seed(seed)
    docs = []
    for row in range(n_docs):
        L = int(torch.randint(min_len, max_len + 1, (1,), generator=g))
        ids = torch.randint(3, target.vocab_size, (L,), generator=g)
        mask = torch.zeros(L, dtype=torch.bool)
        mask[prompt:] = True
        docs.append(Doc(row, ids, mask, target.hidden_states(ids[None])[0]))
    return docs


def write_features(path: Path, identity: Any, docs: list[Doc], shards: int = 2, dtype: str = "float32") -> Path:
    w = FeatureWriter(path, identity, dtype=dtype, meta={"source": "test"})
    per = -(-len(docs) // shards)
    for i in range(0, len(docs), per):
        w.write_shard(docs[i : i + per])
    return path


def tiny_overrides(features: Path, target_dir: Path, **extra: Any) -> dict[str, Any]:
    base = {
        "features": str(features), "target": str(target_dir), "epochs": 3, "data.batch_size": 4,
        "draft.inner_dim": 16, "optim.lr": 3e-3, "optim.warmup_steps": 2, "checkpoint_every": 3,
        "log_every": 1, "data.heldout_fraction": 0.1, "progress": False,
    }
    return {**base, **extra}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread is faster, and steadier on a shared 2-core machine."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def tiny_docs(tiny_target: Target) -> list[Doc]:
    return make_docs(tiny_target)


@pytest.fixture(scope="module")
def features(tiny_target: Target, tiny_docs: list[Doc], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_features(tmp_path_factory.mktemp("features") / "f", tiny_target.identity, tiny_docs)


def tiny_config(features: Path, target_dir: Path, **extra: Any) -> TrainConfig:
    return build_config(None, tiny_overrides(features, target_dir, **extra))


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------
def test_defaults_are_the_papers_recipe() -> None:
    c = TrainConfig().resolved()
    assert (c.optim.lr, c.optim.betas, c.optim.warmup_steps, c.optim.schedule, c.optim.grad_clip) == (
        4e-4, (0.9, 0.95), 100, "cosine", 0.5)
    assert (c.data.batch_size, c.epochs, c.draft.num_heads, c.loss.gamma, c.loss.temperature) == (64, 10, 6, 0.8, 1.0)
    assert (c.loss.name, c.loss.eta, c.loss.impl, c.draft.arch) == ("lk_hybrid", 3.0, "chunked", "mlp_speculator")
    assert build_config(None, {"draft.arch": "medusa"}).eta == 10.0
    assert build_config(None, {"draft.arch": "medusa", "loss.eta": 4}).eta == 4.0


def test_yaml_flags_and_strictness(tmp_path: Path) -> None:
    y = tmp_path / "c.yaml"
    y.write_text("epochs: 3\noptim:\n  lr: 1.0e-3\n  warmup_steps: 5\ndraft:\n  inner_dim: 64\n")
    c = build_config(y, {"optim.lr": "2e-3", "draft.tie_weights": True})
    assert (c.epochs, c.optim.lr, c.optim.warmup_steps, c.draft.inner_dim, c.draft.tie_weights) == (
        3, 2e-3, 5, 64, True)
    y.write_text("optim:\n  lrr: 1\n")
    with pytest.raises(LkspecError, match=r"unknown key 'optim\.lrr'") as e:
        build_config(y)
    assert "\n" not in str(e.value)
    with pytest.raises(LkspecError, match="medusa has no option inner_dim"):
        build_config(None, {"draft.arch": "medusa", "draft.inner_dim": 8})
    with pytest.raises(LkspecError, match="unknown loss"):
        build_config(None, {"loss.name": "ce"})
    a, b = config_dict(TrainConfig()), config_dict(build_config(None, {"optim.lr": 1e-3, "progress": False}))
    assert changed_keys(a, b) == ["optim.lr: 0.0004 -> 0.001"]


# ------------------------------------------------------------------------------------------------
# the step: packing, windows and micro-batches change nothing
# ------------------------------------------------------------------------------------------------
def _reference_loss(draft, target: Target, docs: list[Doc], name: str, eta: float) -> torch.Tensor:
    """The plain path: each document alone through draft.forward, heads pooled, one draft_loss call."""
    K = draft.num_heads
    zs: list[list[torch.Tensor]] = [[] for _ in range(K)]
    ps: list[list[torch.Tensor]] = [[] for _ in range(K)]
    for d in docs:
        h, ids = d.hidden.float()[None], d.input_ids[None]
        logits, teacher = draft(h, ids), target.logits_from_hidden(h)
        for k in range(1, K + 1):
            m = head_mask(d.loss_mask[None], k)
            zs[k - 1].append(logits[k - 1][m])
            ps[k - 1].append(head_targets(teacher, k)[m])
    z = [torch.cat(x) for x in zs]
    zp = [torch.cat(x) for x in ps]
    total, _ = draft_loss(name, z, zp, [torch.ones(len(x), dtype=torch.bool) for x in z], eta=eta)
    return total


@pytest.mark.parametrize("arch", ["mlp_speculator", "medusa"])
def test_packed_windowed_accumulated_step_equals_plain_loss(tiny_target: Target, tiny_docs: list[Doc],
                                                            arch: str) -> None:
    opts = {"inner_dim": 16} if arch == "mlp_speculator" else {"num_layers": 2}
    draft = build_draft(arch, seed=1, hidden_size=tiny_target.hidden_size, vocab_size=tiny_target.vocab_size,
                        num_heads=4, **opts)
    if arch == "medusa":  # zero-init blocks would hide the trunk's gradient
        torch.nn.init.normal_(draft.blocks[0].layers[0].weight, std=0.1)
    docs = tiny_docs[:8]
    eta = 3.0
    _reference_loss(draft, tiny_target, docs, "lk_hybrid", eta).backward()
    ref = {n: p.grad.clone() for n, p in draft.named_parameters()}
    for micro in (4096, 24):  # one packed row (lambda inline) / windows + several micro-batches (alpha pre-pass)
        draft.zero_grad(set_to_none=True)
        runner = StepRunner(draft, tiny_target, head_modules(draft), loss="lk_hybrid", eta=eta, gamma=0.8,
                            temperature=1.0, impl="chunked", micro_batch_tokens=micro)
        mbs = runner.pack(docs)
        assert (len(mbs) == 1) == (micro == 4096)
        assert max(mb.num_tokens for mb in mbs) <= micro
        sums = runner.accumulate(mbs)
        plain_counts = [sum(int(head_mask(d.loss_mask[None], k).sum()) for d in docs) for k in range(1, 5)]
        assert sums.counts() == plain_counts  # every anchor counted exactly once
        for n, p in draft.named_parameters():
            torch.testing.assert_close(p.grad, ref[n], rtol=2e-4, atol=2e-6, msg=f"{arch} {micro} {n}")


@pytest.mark.parametrize("arch", ["mlp_speculator", "medusa"])
def test_packing_drops_the_prompt_a_position_wise_draft_never_reads(tiny_target: Target, arch: str) -> None:
    """Documents start at their first anchor for a draft that reads only its anchor's chain: fewer positions through
    the trunk, the same loss and gradients as the plain per-document path."""
    docs = make_docs(tiny_target, 6, min_len=24, max_len=40, prompt=15, seed=3)
    opts = {"inner_dim": 16} if arch == "mlp_speculator" else {"num_layers": 1}
    draft = build_draft(arch, seed=2, hidden_size=tiny_target.hidden_size, vocab_size=tiny_target.vocab_size,
                        num_heads=4, **opts)
    if arch == "medusa":
        torch.nn.init.normal_(draft.blocks[0].layers[0].weight, std=0.1)
    _reference_loss(draft, tiny_target, docs, "kl", 3.0).backward()
    ref = {n: p.grad.clone() for n, p in draft.named_parameters()}
    draft.zero_grad(set_to_none=True)
    runner = StepRunner(draft, tiny_target, head_modules(draft), loss="kl", eta=3.0, gamma=0.8, temperature=1.0,
                        impl="chunked", micro_batch_tokens=4096)
    mbs = runner.pack(docs)
    assert sum(mb.num_tokens for mb in mbs) == sum(len(d) - (15 - 4 - 1) for d in docs)  # from prompt - K - 1 on
    runner.accumulate(mbs)
    for n, p in draft.named_parameters():
        torch.testing.assert_close(p.grad, ref[n], rtol=2e-4, atol=2e-6, msg=f"{arch} {n}")


def test_alpha_mean_callback_reduces_before_lambda() -> None:
    z, zp = torch.randn(5, 11, requires_grad=True), torch.randn(5, 11)
    seen = []

    def reduce(local: torch.Tensor) -> torch.Tensor:
        seen.append(float(local))
        return torch.tensor(0.5)

    term = draft_head_term("lk_hybrid", 2, z, zp, eta=3.0, count=10, alpha_mean=reduce)
    assert seen == [pytest.approx(term.stats.alpha_sum)]
    assert term.stats.lam == pytest.approx(float(torch.exp(torch.tensor(-1.5))))
    empty = draft_head_term("lk_hybrid", 1, z[:0], zp[:0], eta=3.0, alpha_mean=reduce)
    assert len(seen) == 2 and empty.stats.count == 0  # empty ranks still take part in the collective


def test_head_sums_match_draft_loss_stats() -> None:
    z, zp = torch.randn(40, 30), torch.randn(40, 30) * 2
    chain = 0.5 + torch.rand(40)
    for name in ("kl", "tv", "lk_alpha", "lk_hybrid", "lk_hybrid_token", "lk_tau"):
        term = draft_head_term(name, 2, z, zp, eta=3.0, chain=chain)
        c = term.chain  # the head's c_t: its chain weight relative to gamma^(k-1)
        assert c is not None and torch.allclose(c, chain / 0.8)
        sums = HeadSums(1)
        sums.add(1, term.kl[:25], term.alpha[:25], 3.0, c[:25])
        sums.add(1, term.kl[25:], term.alpha[25:], 3.0, c[25:])
        s = sums.summary(name, 3.0)
        assert s.loss[0] == pytest.approx(term.stats.loss, rel=1e-5), name
        assert s.alpha[0] == pytest.approx(term.stats.alpha, rel=1e-6)


# ------------------------------------------------------------------------------------------------
# a tiny run
# ------------------------------------------------------------------------------------------------
def test_tiny_run_learns_and_checkpoints_load_back(tiny_target: Target, tiny_target_dir: Path, features: Path,
                                                   tmp_path: Path) -> None:
    run = tmp_path / "run"
    res = train(tiny_config(features, tiny_target_dir), run, target=tiny_target)
    steps = [r for r in res.history if r["kind"] == "step"]
    epochs = [r for r in res.history if r["kind"] == "epoch"]
    assert len(epochs) == 3 and res.step == steps[-1]["step"] == 3 * 6  # 22 train docs / batch 4
    # the loss falls: first step (untrained weights) vs the last epoch, and held-out epoch 1 vs epoch 3
    assert epochs[-1]["train"]["tau"] > steps[0]["train"]["tau"]
    assert sum(epochs[-1]["heldout"]["loss"]) < sum(epochs[0]["heldout"]["loss"])
    assert steps[-1]["loss"] < 0.9 * steps[0]["loss"]
    for r in epochs:
        assert set(r["heldout"]) >= {"alpha", "lambda", "loss", "kl", "tau"} and len(r["heldout"]["alpha"]) == 6
    # RUN is a draft directory holding the best held-out tau, with the contract's metadata
    best = max(epochs, key=lambda r: r["heldout"]["tau"])
    meta = read_json(run / "config.json")["lkspec"]
    assert meta["heldout"]["tau"] == pytest.approx(best["heldout"]["tau"])
    assert (meta["step"], meta["epoch"]) == (best["step"], best["epoch"])
    assert meta["train"]["loss"]["eta"] == 3.0 and meta["train"]["optim"]["lr"] == 3e-3
    assert meta["data"]["num_docs"] == 24 and meta["data"]["source"] == {"source": "test"}
    assert meta["data"]["heldout_docs"] == 3
    assert (run / "train_config.yaml").is_file() and (run / "trainer_state" / "state.json").is_file()
    # checkpoints load back into drafts whose outputs equal the trained ones
    h, ids = torch.randn(2, 9, tiny_target.hidden_size), torch.randint(0, tiny_target.vocab_size, (2, 9))
    last = load_draft(run / "last", target=tiny_target.identity)
    for a, b in zip(last(h, ids), res.draft(h, ids), strict=True):
        assert torch.equal(a, b)
    loaded_best = load_draft(run, target=tiny_target.identity)
    if best is epochs[-1]:
        assert all(torch.equal(a, b) for a, b in zip(loaded_best(h, ids), res.draft(h, ids), strict=True))


def test_token_budget_batches_and_medusa(tiny_target: Target, tiny_target_dir: Path, features: Path,
                                         tmp_path: Path) -> None:
    cfg = tiny_config(features, tiny_target_dir, epochs=1, **{
        "draft.arch": "medusa", "draft.inner_dim": None, "data.batch_tokens": 120, "loss.name": "kl"})
    res = train(cfg, tmp_path / "run", target=tiny_target)
    steps = [r for r in res.history if r["kind"] == "step"]
    assert all(r["perf"]["tokens"] >= 120 for r in steps[:-1])
    assert read_json(tmp_path / "run" / "config.json")["lkspec"]["arch"] == "medusa"
    assert steps[0]["train"]["lambda"] == [None] * 6  # kl has no lambda


def test_resume_continues_and_refuses_changed_config(tiny_target: Target, tiny_target_dir: Path, features: Path,
                                                     tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = tiny_config(features, tiny_target_dir, epochs=2, max_steps=4)
    first = train(cfg, run, target=tiny_target)
    assert first.step == 4 and read_json(run / "trainer_state" / "state.json")["step"] == 4
    with pytest.raises(LkspecError, match="already holds a training run; pass --resume"):
        train(cfg, run, target=tiny_target)
    changed = tiny_config(features, tiny_target_dir, epochs=2, max_steps=4, **{"optim.lr": 1e-2, "seed": 3})
    with pytest.raises(LkspecError, match=r"different config \(optim\.lr: 0\.003 -> 0\.01; seed: 0 -> 3\)"):
        train(changed, run, target=tiny_target, resume=True)
    done = train(tiny_config(features, tiny_target_dir, epochs=2), run, target=tiny_target, resume=True)
    assert done.step == 12 and done.epoch == 2


def test_resume_from_another_folder_refuses_other_documents(tiny_target: Target, tiny_target_dir: Path,
                                                             tiny_docs: list[Doc], tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative features path resolved again in another folder must not silently train on other data."""
    here, there = tmp_path / "here", tmp_path / "there"
    write_features(here / "data" / "features", tiny_target.identity, tiny_docs)
    write_features(there / "data" / "features", tiny_target.identity, tiny_docs[:8], shards=1)
    run = tmp_path / "run"
    monkeypatch.chdir(here)
    cfg = tiny_config(Path("data/features"), tiny_target_dir, epochs=1, max_steps=2)
    train(cfg, run, target=tiny_target)
    monkeypatch.chdir(there)
    with pytest.raises(LkspecError, match=rf"trained on the documents in {here / 'data' / 'features'}, but the "
                                          r"features given .* hold different ones; resume with --features"):
        train(tiny_config(Path("data/features"), tiny_target_dir, epochs=1), run, target=tiny_target, resume=True)
    done = train(tiny_config(here / "data" / "features", tiny_target_dir, epochs=1), run, target=tiny_target,
                 resume=True)
    assert done.epoch == 1 and read_json(run / "config.json")["lkspec"]["data"]["heldout_docs"] > 1


def test_init_from_warm_starts_weights_only(tiny_target: Target, tiny_target_dir: Path, features: Path,
                                            tmp_path: Path) -> None:
    train(tiny_config(features, tiny_target_dir, epochs=1, max_steps=2), tmp_path / "a", target=tiny_target)
    src = load_draft(tmp_path / "a" / "last")
    t = Trainer(tiny_config(features, tiny_target_dir, seed=5), tmp_path / "b", store=None, target=tiny_target,
                resume=False, init_from=tmp_path / "a" / "last")
    try:
        for (n, p), q in zip(t.draft.state_dict().items(), src.state_dict().values(), strict=True):
            assert torch.equal(p, q), n
        assert t.step == 0 and not t.optimizer.state  # fresh optimizer and schedule
    finally:
        t.close()
    with pytest.raises(LkspecError, match="differs from this run's draft options; set draft"):
        Trainer(tiny_config(features, tiny_target_dir, **{"draft.inner_dim": 8}), tmp_path / "c", store=None,
                target=tiny_target, resume=False, init_from=tmp_path / "a" / "last")


# ------------------------------------------------------------------------------------------------
# bad input
# ------------------------------------------------------------------------------------------------
def test_features_for_another_target(tiny_target: Target, tiny_target_dir: Path, tiny_docs: list[Doc],
                                     tmp_path: Path) -> None:
    other = tiny_target.identity.model_copy(update={"name": "other-model", "tokenizer_hash": "0" * 64})
    f = write_features(tmp_path / "f", other, tiny_docs[:6])
    with pytest.raises(LkspecError, match=r"made for target 'other-model'.*rebuild it"):
        train(tiny_config(f, tiny_target_dir), tmp_path / "run", target=tiny_target)
    assert not (tmp_path / "run").exists()


def test_empty_and_too_small_datasets(tiny_target: Target, tiny_target_dir: Path, tiny_docs: list[Doc],
                                      tmp_path: Path) -> None:
    FeatureWriter(tmp_path / "empty", tiny_target.identity)
    with pytest.raises(LkspecError, match="holds no documents; build features first"):
        train(tiny_config(tmp_path / "empty", tiny_target_dir), tmp_path / "r1", target=tiny_target)
    one = write_features(tmp_path / "one", tiny_target.identity, tiny_docs[:1], shards=1)
    with pytest.raises(LkspecError, match=r"too few for a held-out split.*heldout_fraction=0"):
        train(tiny_config(one, tiny_target_dir), tmp_path / "r2", target=tiny_target)
    res = train(tiny_config(one, tiny_target_dir, epochs=1, **{"data.heldout_fraction": 0}), tmp_path / "r3",
                target=tiny_target)
    assert res.history[-1]["heldout"] is None and res.history[-1]["selected_by"] == "train"


def test_k_larger_than_the_data_allows(tiny_target: Target, tiny_target_dir: Path, tiny_docs: list[Doc],
                                       tmp_path: Path) -> None:
    short = [Doc(d.row, d.input_ids[:6], d.loss_mask[:6], d.hidden[:6]) for d in tiny_docs[:10]]
    f = write_features(tmp_path / "short", tiny_target.identity, short)
    # 6 tokens, response at positions 4 and 5: head k needs anchor t = 4-k or 3-k >= 0, so K <= 4
    plan = plan_data(survey(FeatureStore(f), 4), num_heads=4, heldout_fraction=0, heldout_max_docs=1,
                     batch_size=4, batch_tokens=None, where="x")
    assert plan.train_counts == [20, 20, 20, 10]
    with pytest.raises(LkspecError, match=r"long enough for head 6 .*use draft\.num_heads <= 4"):
        train(tiny_config(f, tiny_target_dir), tmp_path / "run", target=tiny_target)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_target: Target, tiny_target_dir: Path,
                                                              features: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    # warmup 1: step 1 runs at lr 0 (a checkpoint exists), step 2 at 1e30 (issue 13: the divergence check now
    # stops the run as soon as the weights blow up, before the loss turns non-finite a step later)
    cfg = tiny_config(features, tiny_target_dir, checkpoint_every=1, **{
        "optim.lr": 1e30, "optim.warmup_steps": 1, "optim.grad_clip": 0})
    with pytest.raises(LkspecError, match=r"(non-finite at step (\d+) in head (\d)|diverged at step (\d+)).*; the "
                                          r"last good checkpoint \(step (\d+)\)") as e:
        train(cfg, run, target=tiny_target)
    assert "\n" not in str(e.value)
    step = int(str(e.value).split("at step ")[1].split()[0].rstrip(":"))
    state = read_json(run / "trainer_state" / "state.json")
    assert state["step"] == step - 1
    last = load_draft(run / "last")
    assert all(torch.isfinite(p).all() for p in last.parameters())


def test_full_disk_keeps_previous_checkpoint(tiny_target: Target, tiny_target_dir: Path, features: Path,
                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import lkspec.train.checkpoint as ckpt

    real = ckpt.save_tensors
    calls = {"n": 0}

    def flaky(path: Any, tensors: Any, metadata: Any = None, **kw: Any) -> None:
        calls["n"] += 1
        if calls["n"] > 3:  # the first checkpoint writes 3 files; the second one hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, tensors, metadata, **kw)

    monkeypatch.setattr(ckpt, "save_tensors", flaky)
    run = tmp_path / "run"
    with pytest.raises(LkspecError, match=r"disk is full while saving the checkpoint at step 6 \(the checkpoint "
                                          r"of step 3 is intact\); free space and rerun with --resume"):
        train(tiny_config(features, tiny_target_dir), run, target=tiny_target)
    assert read_json(run / "trainer_state" / "state.json")["step"] == 3
    assert not list(run.glob(".*.tmp")) and not list((run / "trainer_state").glob(".*"))
    monkeypatch.setattr(ckpt, "save_tensors", real)
    assert train(tiny_config(features, tiny_target_dir), run, target=tiny_target, resume=True).step == 18


def test_cli_reports_bad_input_in_one_line(tiny_target_dir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    from lkspec.cli import main

    with pytest.raises(SystemExit) as e:
        main(["train", "--out", str(tmp_path / "run"), "--features", str(tmp_path / "nope"), "--target",
              str(tiny_target_dir), "--set", "optim.lr=1e-3"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "lkspec data features" in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["train", "--out", str(tmp_path / "run"), "--set", "optim.lrr=1"])
    assert "unknown key 'optim.lrr'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# the lm_head-only target loader (targets.load_lm_head)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tied", [False, True])
def test_lm_head_only_equals_the_whole_target(tiny_target_dir: Path, tmp_path: Path, tied: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lkspec.targets import load_target

    src = tiny_target_dir
    if tied:
        model = AutoModelForCausalLM.from_pretrained(tiny_target_dir)
        model.config.tie_word_embeddings = True
        model.tie_weights()
        src = tmp_path / "tied"
        model.save_pretrained(src)
        AutoTokenizer.from_pretrained(tiny_target_dir).save_pretrained(src)
    whole = load_target(src, device="cpu")
    head = load_lm_head(src, device="cpu")
    assert isinstance(head, LMHead) and head.identity == whole.identity
    h = torch.randn(3, 5, whole.hidden_size)
    assert torch.equal(head.logits_from_hidden(h), whole.logits_from_hidden(h))
