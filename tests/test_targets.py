"""Targets: loading from an HF directory, a GGUF and the embedded name; hidden states; identity."""

from __future__ import annotations

import pytest
import torch

from lkspec.drafts import build_draft, check_draft_target, load_draft
from lkspec.errors import LkspecError
from lkspec.targets import EMBEDDED_SHA256, _gguf_to_hf_dir, embedded_gguf_path, load_target, resolve_target


def test_tiny_dir_target_hidden_and_logits(tiny_target) -> None:
    t = tiny_target
    ids = torch.tensor([t.render_chat([{"role": "user", "content": "Write a poem about the sea."}])])
    assert t.tokenizer.decode(ids[0]).startswith("<|im_start|>user\nWrite a poem")
    h = t.hidden_states(ids)
    assert h.shape == (1, ids.shape[1], t.hidden_size)
    torch.testing.assert_close(t.logits_from_hidden(h), t.logits(ids), rtol=1e-5, atol=1e-5)
    # post-norm: the final RMSNorm's output, not the last decoder layer's
    out = t.model(ids, output_hidden_states=True)
    assert not torch.allclose(out.hidden_states[-2], h)
    assert t.eos_token_ids == [t.tokenizer.eos_token_id]


def test_hidden_states_respect_left_padding(tiny_target) -> None:
    t = tiny_target
    a = t.render_chat([{"role": "user", "content": "hi"}])
    b = t.render_chat([{"role": "user", "content": "Write a short poem about the stars."}])
    pad = len(b) - len(a)
    ids = torch.tensor([[t.pad_token_id] * pad + a, b])
    mask = torch.tensor([[0] * pad + [1] * len(a), [1] * len(b)])
    h = t.hidden_states(ids, mask)
    torch.testing.assert_close(h[0, pad:], t.hidden_states(torch.tensor([a]))[0], rtol=1e-4, atol=1e-5)


def test_identity_is_stable_and_checks(tiny_target, tiny_target_dir) -> None:
    again = load_target(tiny_target_dir, device="cpu")
    assert again.identity == tiny_target.identity
    ident = tiny_target.identity
    other = ident.model_copy(update={"name": "other", "vocab_size": ident.vocab_size + 1})
    with pytest.raises(LkspecError, match="was made for target 'other'"):
        ident.check(other, "features in /x")
    ident.check(ident.model_copy(update={"name": "moved-dir"}), "same model elsewhere")  # name alone is fine


def test_draft_must_match_target(tiny_target, tmp_path) -> None:
    t = tiny_target
    d = build_draft("medusa", hidden_size=t.hidden_size + 1, vocab_size=t.vocab_size)
    with pytest.raises(LkspecError, match="use a draft trained for this target"):
        check_draft_target(d.config, t.identity)
    ok = build_draft("medusa", hidden_size=t.hidden_size, vocab_size=t.vocab_size)
    foreign = t.identity.model_copy(update={"tokenizer_hash": "0" * 64, "name": "elsewhere"})
    ok.save(tmp_path / "d", target=foreign)
    with pytest.raises(LkspecError, match="made for target 'elsewhere'"):
        load_draft(tmp_path / "d", target=t.identity)


def test_bad_target_specs(tmp_path) -> None:
    with pytest.raises(LkspecError, match="does not exist"):
        resolve_target(tmp_path / "missing.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LkspecError, match=r"without config\.json"):
        resolve_target(tmp_path / "empty")
    with pytest.raises(LkspecError, match="not a directory"):
        resolve_target("no-such-thing")


def test_gguf_checksum_mismatch_is_refused(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LKSPEC_CACHE", str(tmp_path / "cache"))
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF not really")
    with pytest.raises(LkspecError, match="expected b179c9523d0e"):
        _gguf_to_hf_dir(fake, EMBEDDED_SHA256)
    assert not (tmp_path / "cache" / "targets").exists()


@pytest.mark.slow
def test_embedded_target_offline(embedded_target) -> None:
    t = embedded_target
    assert embedded_gguf_path().name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (t.hidden_size, t.vocab_size) == (576, 49152)
    ids = t.render_chat([{"role": "user", "content": "What is 12 times 7?"}])
    text = t.tokenizer.decode(ids)
    assert "<|im_start|>user\nWhat is 12 times 7?<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    x = torch.tensor([ids])
    torch.testing.assert_close(t.logits_from_hidden(t.hidden_states(x)), t.logits(x), rtol=1e-4, atol=1e-4)
    assert t.eos_token_ids == [2]
    # the converted directory is reused: a second load is fast and identical
    import time

    start = time.perf_counter()
    again = load_target("smollm2-135m-instruct", device="cpu")
    assert time.perf_counter() - start < 15
    assert again.identity == t.identity


@pytest.mark.parametrize("capacity", [0, 64])
def test_growing_kv_cache_gives_hf_caches_outputs(tiny_target, capacity) -> None:
    """lkspec's cache (buffers written in place) against HF's `DynamicCache` through a prefill, single-token steps past
    its capacity, a row leaving the batch and a crop back to an accepted prefix: the same logits at every step."""
    from transformers import DynamicCache

    from lkspec.targets import cached_decoder, crop_cache
    from lkspec.targets.kv_cache import new_cache

    decoder = cached_decoder(tiny_target.model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, tiny_target.vocab_size, (3, 40), generator=g)
    caches = [DynamicCache(config=tiny_target.model.config), new_cache(tiny_target.model.config, capacity)]
    assert type(caches[1].layers[0]).__name__ == "GrowingLayer"

    def run(cache, x, start):
        pos = torch.arange(start, start + x.shape[1]).expand(x.shape[0], -1)
        return decoder(input_ids=x, position_ids=pos, cache=cache, use_cache=True).last_hidden_state

    def both(x, start):
        ref, got = (run(c, x, start) for c in caches)
        torch.testing.assert_close(got, ref, rtol=0, atol=0)

    both(ids[:, :12], 0)
    for t in range(12, 30):  # one token at a time, past a capacity of 0 (doubling) and up to 30
        both(ids[:, t : t + 1], t)
    for c in caches:
        c.batch_select_indices(torch.tensor([0, 2]))
    ids = ids[[0, 2]]
    both(ids[:, 30:34], 30)  # a verification pass of 4 tokens
    for c in caches:
        crop_cache(c, 31)  # 1 of 4 accepted
        assert c.get_seq_length() == 31
    for t in range(31, 40):
        both(ids[:, t : t + 1], t)


def test_growing_kv_cache_refuses_a_batch_change_and_defers_to_other_cache_apis(tiny_target, monkeypatch) -> None:
    from transformers.cache_utils import DynamicLayer

    from lkspec.targets.kv_cache import _growing_layer, new_cache

    layer = new_cache(tiny_target.model.config, 4).layers[0]
    layer.update(torch.zeros(2, 1, 3, 8), torch.zeros(2, 1, 3, 8))
    with pytest.raises(ValueError, match="holds 2 rows"):
        layer.update(torch.zeros(3, 1, 2, 8), torch.zeros(3, 1, 2, 8))
    # transformers 4.56-4.57: lazy_initialization(key_states) only; the layer stays HF's
    monkeypatch.setattr(DynamicLayer, "lazy_initialization", lambda self, key_states: None)
    _growing_layer.cache_clear()  # the check runs once per process
    try:
        assert all(type(x) is DynamicLayer for x in new_cache(tiny_target.model.config, 4).layers)
    finally:
        _growing_layer.cache_clear()
