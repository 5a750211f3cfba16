"""EAGLE-3: the teacher-forced training-time test, the generator's context and the chain agree exactly."""

from __future__ import annotations

import itertools

import pytest
import torch

from lkspec.drafts import build_draft
from lkspec.errors import LkspecError

SMALL = {"hidden_size": 16, "vocab_size": 50, "num_heads": 4, "aux_layers": [1, 2, 3], "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 32, "rope_theta": 100.0}


def tiny(**kw):
    d = build_draft("eagle3", seed=0, **{**SMALL, **kw}).double()
    with torch.no_grad():  # non-trivial norms, so a swapped norm or input order shows
        for m in d.modules():
            if hasattr(m, "eps"):
                m.weight.uniform_(0.5, 1.5)
        d.embed_tokens.weight.normal_()
    return d.eval()


def data(T=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, T, 48, generator=g, dtype=torch.float64), torch.randint(0, 50, (1, T), generator=g)


def chain_logits(d, feats, ids, t, steps, *, chunks=1):
    """The generator's way: the context holds anchors 0..t (extended in `chunks` calls), then the chain runs on
    the teacher's tokens; returns the logits of each step."""
    ctx = d.new_context()
    cuts = torch.linspace(0, t + 1, chunks + 1).long().tolist()
    for a, b in itertools.pairwise(cuts):
        if b > a:
            d.extend(ctx, feats[:, a:b], ids[:, a + 1 : b + 1])
    seen = []

    def pick(logits):
        seen.append(logits)
        tok = ids[:, t + 1 + len(seen)]
        return tok, logits.softmax(-1)

    d.propose_chain(ctx, steps, pick)
    return seen


@pytest.mark.parametrize("t", [0, 3, 6])
def test_training_time_test_equals_the_generators_chain(t):
    d = tiny()
    feats, ids = data()
    heads = d(feats, ids)
    K = d.num_heads
    got = chain_logits(d, feats, ids, t, K, chunks=3 if t > 2 else 1)
    for k in range(1, K + 1):
        assert heads[k - 1].shape[1] == ids.shape[1] - k
        torch.testing.assert_close(got[k - 1], heads[k - 1][:, t], rtol=1e-9, atol=1e-9)


def test_first_only_drops_anchors_and_keeps_their_context():
    d = tiny()
    feats, ids = data()
    full, part = d(feats, ids), d(feats, ids, first=5)
    for a, b in zip(full, part, strict=True):
        torch.testing.assert_close(b, a[:, 5:], rtol=1e-9, atol=1e-9)
    # the context matters: without positions 0..4 anchor 5 predicts differently
    cut = d(feats[:, 5:], ids[:, 5:])
    assert not torch.allclose(cut[0][:, 0], full[0][:, 5])


def test_packed_documents_do_not_see_each_other():
    d = tiny()
    fa, ia = data(7, seed=2)
    fb, ib = data(9, seed=3)
    seg = torch.tensor([[0] * 7 + [1] * 9])
    packed = d.head_states(torch.cat([fa, fb], 1), torch.cat([ia, ib], 1), segments=seg)
    alone_a, alone_b = d.head_states(fa, ia), d.head_states(fb, ib)
    for k in range(1, d.num_heads + 1):
        n_a = 7 - k  # anchors of document a whose chain stays inside it
        torch.testing.assert_close(packed[k - 1][:, :n_a], alone_a[k - 1], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(packed[k - 1][:, 7 : 7 + 9 - k], alone_b[k - 1], rtol=1e-9, atol=1e-9)



def test_rows_packed_differently_each_keep_their_own_documents():
    """Two packed rows whose documents end at different places: each row is cut by its own segments."""
    d = tiny()
    f, i = data(16, seed=4)
    seg = torch.tensor([[0] * 5 + [1] * 11, [0] * 9 + [1] * 7])
    both = d.head_states(torch.cat([f, f]), torch.cat([i, i]), segments=seg)
    for r in range(2):
        alone = d.head_states(f, i, segments=seg[r : r + 1])
        for k in range(d.num_heads):
            torch.testing.assert_close(both[k][r : r + 1], alone[k], rtol=1e-12, atol=1e-12)
    cut = 5
    first_doc = d.head_states(f[:, :cut], i[:, :cut])  # row 0's first document, by itself
    torch.testing.assert_close(both[0][:1, : cut - 1], first_doc[0], rtol=1e-9, atol=1e-9)
    assert not torch.allclose(both[0][0, cut - 1 :], both[0][1, cut - 1 :])  # row 1 still sees positions 0..8

def test_chains_run_only_at_the_given_anchors_with_the_same_values_and_gradients():
    """`anchors` (the trained anchors) changes which chains run, never their values: the states at those anchors and
    the gradients of anything computed from them equal the all-anchor pass; other anchors come back as zeros."""
    d = tiny()
    f, i = data(20, seed=5)
    seg = torch.tensor([[0] * 8 + [1] * 12])
    anchors = torch.zeros(1, 20, dtype=torch.bool)
    anchors[0, [4, 5, 6, 13, 14, 15, 16, 17]] = True  # each document's answer, as a packed training row has them
    full = d.head_states(f, i, segments=seg)
    part = d.head_states(f, i, segments=seg, anchors=anchors)
    w = torch.randn(16, dtype=torch.float64)

    def grads(states):
        d.zero_grad(set_to_none=True)
        sum((s[0, anchors[0, : s.shape[1]]] @ w).sin().sum() for s in states).backward()
        return {n: p.grad.clone() for n, p in d.named_parameters() if p.grad is not None}

    for k, (a, b) in enumerate(zip(full, part, strict=True), 1):
        m = anchors[0, : 20 - k]
        torch.testing.assert_close(b[0, m], a[0, m], rtol=1e-12, atol=1e-12)
        assert b[0, ~m].abs().max() == 0
    ref = grads(d.head_states(f, i, segments=seg))
    got = grads(d.head_states(f, i, segments=seg, anchors=anchors))
    assert ref.keys() == got.keys() and "midlayer.mlp.down_proj.weight" in got
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-10, atol=1e-12, msg=n)
    batch = d.head_states(torch.cat([f, f]), torch.cat([i, i]), segments=torch.cat([seg, seg]),
                          anchors=torch.cat([anchors, torch.ones_like(anchors)]))
    for k in range(d.num_heads):  # rows with other anchors: each row by its own
        torch.testing.assert_close(batch[k][0], part[k][0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(batch[k][1], full[k][0], rtol=1e-12, atol=1e-12)
    late = d.head_states(f, i, segments=seg, anchors=anchors, first=5)  # context-only positions as well
    for k in range(1, d.num_heads + 1):
        m = anchors[0, 5 : 20 - k]
        torch.testing.assert_close(late[k - 1][0, m], full[k - 1][0, 5:][m], rtol=1e-12, atol=1e-12)
    with pytest.raises(LkspecError, match="bool mask"):
        d.head_states(f, i, anchors=anchors.long())


def test_training_step_computes_chains_at_trained_anchors_only(tiny_target):
    """The runner hands the trunk every anchor some head trains on: the same loss and gradients as running every
    anchor's chain, from fewer chain positions."""
    from lkspec.data.source import Doc
    from lkspec.train.step import StepRunner, head_modules

    H = tiny_target.hidden_size
    d = build_draft("eagle3", seed=0, hidden_size=H, vocab_size=tiny_target.vocab_size, num_heads=3,
                    aux_layers=[0, 1, 2], num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                    intermediate_size=32)
    g = torch.Generator().manual_seed(0)
    docs = []
    for row, (n, prompt) in enumerate([(19, 9), (23, 14), (15, 4)]):
        ids = torch.randint(3, tiny_target.vocab_size, (n,), generator=g)
        last, aux = tiny_target.states(ids[None], None, [0, 1, 2])
        mask = torch.zeros(n, dtype=torch.bool)
        mask[prompt:] = True
        docs.append(Doc(row, ids, mask, last[0], aux=aux[0]))
    seen = []

    def every_anchor(*args, anchors, **kw):
        seen.append(int(anchors.sum()))
        return d.head_states(*args, **kw)

    results = []
    for trunk in (every_anchor, None):
        d.zero_grad(set_to_none=True)
        runner = StepRunner(d, tiny_target, head_modules(d), loss="lk_hybrid", eta=3.0, gamma=0.8, temperature=1.0,
                            impl="chunked", micro_batch_tokens=4096, trunk=trunk)
        sums = runner.accumulate(runner.pack(docs))
        results.append((sums.t.clone(), {n: p.grad.clone() for n, p in d.named_parameters() if p.grad is not None}))
    (ref_sums, ref), (sums, got) = results
    # head k at anchor t learns token t + k + 1: anchors prompt - K - 1 .. T - 3 of each document, 36 of its 54
    assert seen == [sum(len(x) - p + 2 for x, p in zip(docs, (9, 14, 4), strict=True))] == [36]
    torch.testing.assert_close(sums, ref_sums, rtol=1e-5, atol=1e-6)
    assert ref.keys() == got.keys()
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-4, atol=1e-6, msg=n)


def test_truncated_head_gives_zero_mass_outside_its_map():
    d = tiny(draft_vocab_size=10)
    d.set_token_map(torch.arange(0, 50, 5))
    feats, ids = data()
    logits = d(feats, ids)[0]
    assert torch.isinf(logits[..., 1]).all() and torch.isfinite(logits[..., 5]).all()
    prop = d.propose_in(_ctx(d, feats, ids), temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert set(prop.tokens.flatten().tolist()) <= set(range(0, 50, 5))
    assert prop.probs[..., 1].abs().max() == 0


def _ctx(d, feats, ids):
    ctx = d.new_context()
    d.extend(ctx, feats[:, :-1], ids[:, 1:])
    return ctx


def test_greedy_proposal_is_the_argmax_chain():
    d = tiny()
    feats, ids = data()
    prop = d.propose_in(_ctx(d, feats, ids), temperature=0.0)
    toks = prop.tokens[0].tolist()
    ext = torch.cat([ids, torch.tensor([toks])], 1)
    T = ids.shape[1]
    logits = chain_logits(d, feats, ext, T - 2, d.num_heads)
    assert [int(x.argmax()) for x in logits] == toks


def test_save_and_load_round_trip(tmp_path):
    from lkspec.drafts import load_draft

    d = tiny().float()
    d.save(tmp_path / "e3")
    back = load_draft(tmp_path / "e3")
    feats, ids = data()
    for a, b in zip(d(feats.float(), ids), back(feats.float(), ids), strict=True):
        torch.testing.assert_close(a, b)
    assert not back.embed_tokens.weight.requires_grad


# ----------------------------------------------------------------------------------------------
# in the generator and the replay, on a real (1-layer, 6-token) Llama with a KV cache
# ----------------------------------------------------------------------------------------------
def small_eagle3(target, heads=4):
    from lkspec.targets import TargetTensors

    d = build_draft("eagle3", seed=3, hidden_size=target.hidden_size, vocab_size=target.vocab_size, num_heads=heads,
                    aux_layers=[0, 1], num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                    intermediate_size=32)
    emb = target.model.get_input_embeddings().weight.detach().clone()
    d.adopt_target(lambda: TargetTensors(emb, emb, None))
    with torch.no_grad():
        d.lm_head.weight.mul_(8.0)  # peaked q, so rejections and residual draws are frequent
    return d.eval()


@pytest.mark.parametrize("rule", ["sampled", "greedy"])
def test_generator_rounds_match_the_replay_on_its_own_outputs(rule):
    """The generator's context (extended round by round with the target's aux states) and the replay's
    teacher-forced pass are the same draft: given the output, the replay gives the rounds' exact mean and
    variance (exactly the rounds for greedy drafts)."""
    import math

    from lkspec.specdec import SpeculativeGenerator
    from test_specdec import make_small_vocab_target, replay_rounds

    target = make_small_vocab_target()
    draft = small_eagle3(target)
    gen = SpeculativeGenerator(target, draft, temperature=1.0, rule=rule)
    total, mean, var, accepted = 0, 0.0, 0.0, 0
    for seed in range(10):
        res = gen.generate([1, 2, 3 + seed % 2], max_new_tokens=60, seed=seed)
        m, v = replay_rounds(target, draft, res, 1.0, rule)
        total, mean, var = total + res.rounds, mean + m, var + v
        accepted += sum(res.position_counts()[1])
    assert accepted > 0
    if rule == "greedy":
        assert var == 0 and total == mean
        return
    assert abs(total - mean) / math.sqrt(var) < 4, (total, mean, var)


def test_generator_is_lossless_with_eagle3():
    from lkspec.specdec import SpeculativeGenerator
    from test_specdec import chi_square_ranks, make_small_vocab_target

    target = make_small_vocab_target()
    res = SpeculativeGenerator(target, small_eagle3(target), temperature=1.0).generate([1, 2, 3], max_new_tokens=1200,
                                                                                       seed=0)
    tried, acc = res.position_counts()
    assert 0 < sum(acc) < sum(tried)
    p_value = chi_square_ranks(target, [1, 2, 3], res.tokens)
    assert p_value > 1e-3, p_value


@pytest.mark.parametrize("proposer", ["draft", "ngram+draft"])
def test_greedy_output_is_the_targets_with_eagle3(proposer):
    from lkspec.specdec import SpeculativeGenerator, plain_generate
    from test_specdec import make_small_vocab_target

    target = make_small_vocab_target()
    prompt = [1, 2, 3, 1, 2]
    ref, _ = plain_generate(target, prompt, max_new_tokens=80, temperature=0)
    res = SpeculativeGenerator(target, small_eagle3(target), temperature=0, proposer=proposer).generate(
        prompt, max_new_tokens=80)
    assert res.tokens == ref


# ----------------------------------------------------------------------------------------------
# export: the native EAGLE-3 layout and vllm-project/speculators', read back as the same draft
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["vllm", "speculators"])
@pytest.mark.parametrize("truncated", [False, True])
def test_export_layouts_reload_as_the_same_draft(tmp_path, fmt, truncated):
    from safetensors import safe_open

    from lkspec.drafts import load_draft, read_checkpoint
    from lkspec.export import export_draft
    from lkspec.io import read_json
    from lkspec.targets import TargetIdentity

    d = tiny(**({"draft_vocab_size": 10} if truncated else {})).float()
    if truncated:
        d.set_token_map(torch.arange(3, 50, 5)[:10])
    ident = TargetIdentity(name="HuggingFaceTB/SmolLM2-135M-Instruct", vocab_size=50, hidden_size=16,
                           tokenizer_hash="t" * 64)
    run = d.save(tmp_path / "run", target=ident)
    out = export_draft(run, tmp_path / fmt, dtype="fp32", fmt=fmt).out
    cfg = read_json(out / "config.json")
    with safe_open(out / "model.safetensors", "pt") as f:
        names = set(f.keys())
    if fmt == "speculators":
        assert cfg["architectures"] == ["Eagle3Speculator"] and "model_type" not in cfg
        assert cfg["transformer_layer_config"]["num_attention_heads"] == 4
        assert cfg["speculators_config"]["verifier"]["name_or_path"] == ident.name
        assert "layers.0.self_attn.q_proj.weight" in names and not any(n.startswith("midlayer.") for n in names)
    else:
        assert cfg["architectures"] == ["LlamaForCausalLMEagle3"]
        assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
        assert "midlayer.self_attn.q_proj.weight" in names
    assert cfg["norm_before_residual"] is False and cfg["draft_vocab_size"] == (10 if truncated else 50)
    assert ("d2t" in names) == ("t2d" in names) == truncated
    if truncated:
        with safe_open(out / "model.safetensors", "pt") as f:
            d2t, t2d = f.get_tensor("d2t"), f.get_tensor("t2d")
        assert d2t.dtype == torch.int64 and torch.equal(torch.arange(10) + d2t, d.token_map)
        assert t2d.dtype == torch.bool and int(t2d.sum()) == 10 and bool(t2d[d.token_map].all())
    back = load_draft(out, target=ident)
    assert back.config == d.config and read_checkpoint(out).layout == "lkspec-export"
    feats, ids = data()
    for a, b in zip(d(feats.float(), ids), back(feats.float(), ids), strict=True):
        torch.testing.assert_close(a, b)


def test_check_servable_refuses_what_vllm_would_misread():
    from lkspec.export.layouts import layout
    from lkspec.export.vllm_rules import check_servable

    cfg, tensors = layout(tiny().float(), fmt="speculators", dtype=torch.float32, base_model="m")
    check_servable(cfg, tensors)
    with pytest.raises(LkspecError, match="no top-level model_type"):
        check_servable({**cfg, "model_type": "llama"}, tensors)
    with pytest.raises(LkspecError, match="eagle_aux_hidden_state_layer_ids"):
        check_servable({**cfg, "eagle_aux_hidden_state_layer_ids": []}, tensors)
    native, t2 = layout(tiny().float(), fmt="vllm", dtype=torch.float32)
    with pytest.raises(LkspecError, match="would silently ignore"):
        check_servable(native, {**t2, "extra.weight": torch.zeros(1)})
    with pytest.raises(LkspecError, match="speculators"):
        layout(build_draft("medusa", hidden_size=16, vocab_size=50), fmt="speculators", dtype=torch.float32)


# ----------------------------------------------------------------------------------------------
# features: the aux states travel through the store, the combined source and the packer
# ----------------------------------------------------------------------------------------------
def test_aux_states_are_hf_hidden_states_and_survive_the_store(tiny_target, tmp_path):
    from lkspec.data.combined import CombinedSource
    from lkspec.data.features import FeatureStore, FeatureWriter
    from lkspec.data.source import Doc
    from lkspec.errors import LkspecError
    from lkspec.train.batching import pack

    ids = torch.randint(0, tiny_target.vocab_size, (1, 9))
    last, aux = tiny_target.states(ids, None, [0, 2])
    hs = tiny_target.model(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(aux, torch.cat([hs[0], hs[2]], -1))
    torch.testing.assert_close(last, tiny_target.hidden_states(ids))
    with pytest.raises(LkspecError, match=r"outside the target's 0\.\.2"):
        tiny_target.states(ids, None, [1, 3])

    def write(path, layers):
        w = FeatureWriter(path, tiny_target.identity, dtype="float32", aux_layers=layers)
        w.write_shard([Doc(0, ids[0], torch.ones(9, dtype=torch.bool), last[0], aux=aux[0] if layers else None)])
        return FeatureStore(path)

    store = write(tmp_path / "f", [0, 2])
    (doc,) = store.load_shard(0)
    torch.testing.assert_close(doc.aux, aux[0])
    store.check_aux_layers([0, 2], "the draft")
    with pytest.raises(LkspecError, match="--aux-layers 0,1"):
        store.check_aux_layers([0, 1], "the eagle3 draft")
    with pytest.raises(LkspecError, match="aux layers"):
        FeatureWriter(tmp_path / "f", tiny_target.identity, dtype="float32", aux_layers=[0, 1])
    both = CombinedSource([store, write(tmp_path / "g", [0, 2])])
    both.check_aux_layers([0, 2], "the draft")
    with pytest.raises(LkspecError, match="carry no aux layers"):
        CombinedSource([store, write(tmp_path / "h", [])]).check_aux_layers([0, 2], "the eagle3 draft")
    (mb,) = pack([doc, doc], 4, 64)
    assert mb.aux.shape == (1, 18, 2 * tiny_target.hidden_size) and mb.doc_ids[0, 9] == 1


def test_target_init_is_the_fitted_linear_predictor_token_included():
    """An untrained target-initialised draft predicts token t+2 as the ridge map of (the aux states at t, the token
    y_{t+1}) does: here the next state is an exact linear function of both, so head 1's logits point where the
    target's own at t+1 do. The token can only reach the state through attention: without its path (o_proj zeroed)
    the prediction is much worse."""
    from lkspec.data.source import Doc
    from lkspec.targets import TargetTensors

    g = torch.Generator().manual_seed(0)
    H, V = 16, 50
    lm_head, emb = torch.randn(V, H, generator=g), torch.randn(V, H, generator=g)
    scale = torch.rand(H, generator=g) + 0.5
    M, N = torch.randn(3 * H, H, generator=g) * 0.2, torch.randn(H, H, generator=g)
    e = emb / emb.pow(2).mean(-1, keepdim=True).sqrt()
    docs = []
    for r in range(8):
        aux, ids = torch.randn(40, 3 * H, generator=g), torch.randint(0, V, (40,), generator=g)
        x = aux[:-1] @ M + e[ids[1:]] @ N  # the state after position t: from a_t and the token y_{t+1}
        h = torch.cat([torch.zeros(1, H), scale * x / x.pow(2).mean(-1, keepdim=True).sqrt()])
        docs.append(Doc(r, ids, torch.ones(40, dtype=torch.bool), h, aux=aux))
    d = tiny()
    d.init_from_target(TargetTensors(lm_head, emb, scale), lambda: iter(docs))
    assert torch.equal(d.embed_tokens.weight.float(), emb)
    doc = docs[0]

    def cos_to_target() -> torch.Tensor:
        with torch.no_grad():
            head1 = d(doc.aux[None].double(), doc.input_ids[None])[0][0]  # anchors 0..38 predict token t+2
        target = doc.hidden[1:].double() @ lm_head.double().T  # head 1 at anchor t is taught by h_{t+1}
        return torch.nn.functional.cosine_similarity(head1, target, dim=-1)

    cos = cos_to_target()
    assert cos.mean() > 0.9, (cos.mean(), cos.min())  # attention is not exactly self where embeddings are close
    with torch.no_grad():
        d.midlayer.self_attn.o_proj.weight.zero_()
    assert cos_to_target().mean() < cos.mean() - 0.1


def test_authors_layout_without_embedding_loads_with_its_target(tmp_path):
    """The authors' checkpoints (e.g. yuhuili/EAGLE3-LLaMA3.1-Instruct-8B) leave out the frozen embedding: vLLM
    shares the target's, and so does lkspec when a target is at hand (eval, generate, train --init-from)."""
    from safetensors.torch import load_file, save_file

    from lkspec.drafts import load_draft, read_checkpoint
    from lkspec.errors import LkspecError
    from lkspec.export.layouts import layout
    from lkspec.io import write_json
    from lkspec.targets import TargetTensors

    d = tiny(draft_vocab_size=10).float()
    d.set_token_map(torch.arange(5, 45, 4))
    cfg, tensors = layout(d, fmt="vllm", dtype=torch.float32)
    out = tmp_path / "authors"
    out.mkdir()
    emb = tensors.pop("embed_tokens.weight")
    save_file(tensors, str(out / "model.safetensors"))
    write_json(out / "config.json", cfg)
    assert read_checkpoint(out).from_target == ["embed_tokens.weight"] and read_checkpoint(out).layout == "vllm"
    with pytest.raises(LkspecError, match=r"leaves embed_tokens\.weight to its target"):
        load_draft(out)
    back = load_draft(out, tables=lambda: TargetTensors(emb, emb, None))
    assert back.config.num_heads == 6  # the layout does not say K: the default (speculators' configs do)
    feats, ids = data()
    for a, b in zip(d(feats.float(), ids), back(feats.float(), ids), strict=False):
        torch.testing.assert_close(a, b)
    assert set(load_file(str(out / "model.safetensors"))) >= {"d2t", "t2d", "midlayer.hidden_norm.weight"}


def test_a_recurrent_draft_drafts_more_steps_than_it_was_trained_for():
    """EAGLE-3 is trained with 6 steps and evaluated at K = 7: the extra step reuses the same weights."""
    from lkspec.errors import LkspecError

    d = tiny()
    longer = d.with_num_heads(6)
    feats, ids = data()
    short, long = d(feats, ids), longer(feats, ids)
    assert len(long) == 6
    for a, b in zip(short, long, strict=False):
        torch.testing.assert_close(a, b)
    with pytest.raises(LkspecError, match="use --k 6 or fewer"):
        build_draft("medusa", hidden_size=16, vocab_size=50).with_num_heads(7)


def test_layer_shapes_and_aux_layers_come_from_the_target_config():
    """transformers 5 keeps RoPE's theta in rope_parameters (the first demo run fell back to 10000 for SmolLM2's
    100000); shallow targets still get distinct ascending aux layers."""
    from types import SimpleNamespace

    from lkspec.drafts.eagle3 import target_geometry

    cfg = SimpleNamespace(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576,
                          intermediate_size=1536, rms_norm_eps=1e-5, max_position_embeddings=8192,
                          rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    g = target_geometry(cfg)
    assert g["aux_layers"] == [2, 15, 27] and g["rope_theta"] == 100000.0 and g["head_dim"] == 64
    assert target_geometry(SimpleNamespace(**{**vars(cfg), "num_hidden_layers": 2}))["aux_layers"] == [0, 1, 2]
