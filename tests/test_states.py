"""States kept at regeneration: the feature store they give equals the teacher-forced pass's, without the pass."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lkspec.data import features as features_mod
from lkspec.data.features import FeatureStore, extract_features
from lkspec.data.prompts import load_prompts
from lkspec.data.regenerate import RegenConfig, regenerate
from lkspec.data.states import FOLDER, INDEX, StateSpec
from lkspec.targets import Target, decode_batch
from test_regenerate import KilledError, write_prompt_file


def _store_docs(path: Path) -> dict[int, object]:
    return {d.row: d for d in FeatureStore(path).iter_docs(seed=None)}


def test_decode_keeps_the_states_of_every_position(tiny_target: Target) -> None:
    """'all' = the teacher-forced pass over prompt + response (aux layers too), rows of different lengths."""
    prompts = [[5, 9, 11, 3, 7, 8, 20], [4, 6], [30, 31, 32, 33]]
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    out = decode_batch(tiny_target, prompts, temperature=1.0, max_new_tokens=6, generators=gens, keep="all",
                       aux_layers=(0, 1))
    tail = decode_batch(tiny_target, prompts, temperature=1.0, max_new_tokens=6,
                        generators=[torch.Generator().manual_seed(i) for i in range(3)])
    for p, d, t in zip(prompts, out, tail, strict=True):
        assert d.tokens == t.tokens  # keeping the states changes nothing sampled
        ids = torch.tensor(p + d.tokens)[None]
        hidden, aux = tiny_target.states(ids, None, (0, 1))
        assert d.hidden.shape == (len(p) + len(d.tokens), tiny_target.hidden_size)
        torch.testing.assert_close(d.hidden, hidden[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(d.aux, aux[0], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(t.hidden, d.hidden[len(p) - 2 : len(p) + len(d.tokens) - 1])


@pytest.mark.parametrize("aux_layers", [[], [1, 2]])
def test_features_from_kept_states_equal_the_pass(tiny_target: Target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  aux_layers: list[int]) -> None:
    ps = load_prompts(source=str(write_prompt_file(tmp_path / "p.jsonl", 9)))
    cfg = RegenConfig(max_new_tokens=8, batch_size=4, seed=3)
    spec = StateSpec("float32", tuple(aux_layers))
    regenerate(tiny_target, ps, tmp_path / "plain", cfg, progress=False)
    regenerate(tiny_target, ps, tmp_path / "kept", cfg, progress=False, states=spec)
    assert not (tmp_path / "plain" / FOLDER).exists() and (tmp_path / "kept" / FOLDER / INDEX).is_file()
    extract_features(tiny_target, tmp_path / "plain", tmp_path / "f-pass", dtype="float32", batch_size=3,
                     aux_layers=aux_layers, progress=False)

    def no_pass(*_a: object, **_k: object) -> None:
        raise AssertionError("the kept states should have made the target pass unnecessary")

    monkeypatch.setattr(features_mod, "forward_docs", no_pass)
    extract_features(tiny_target, tmp_path / "kept", tmp_path / "f-kept", dtype="float32", batch_size=3,
                     aux_layers=aux_layers, progress=False)
    assert not (tmp_path / "kept" / FOLDER).exists()  # handed over to the store
    a, b = _store_docs(tmp_path / "f-pass"), _store_docs(tmp_path / "f-kept")
    assert a.keys() == b.keys() and len(a) == 9
    for r in a:
        assert torch.equal(a[r].input_ids, b[r].input_ids) and torch.equal(a[r].loss_mask, b[r].loss_mask)
        torch.testing.assert_close(b[r].hidden, a[r].hidden, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(b[r].target_lse, a[r].target_lse, rtol=1e-4, atol=1e-4)
        if aux_layers:
            torch.testing.assert_close(b[r].aux, a[r].aux, rtol=1e-4, atol=1e-4)


def test_states_of_another_kind_or_an_incomplete_set_fall_back_to_the_pass(tiny_target: Target,
                                                                           tmp_path: Path) -> None:
    ps = load_prompts(source=str(write_prompt_file(tmp_path / "p.jsonl", 7)))
    cfg = RegenConfig(max_new_tokens=6, batch_size=3)
    regenerate(tiny_target, ps, tmp_path / "tok", cfg, progress=False, states=StateSpec("bfloat16", ()))
    # the store wants float32: the kept bf16 states are left alone and the target runs
    store = extract_features(tiny_target, tmp_path / "tok", tmp_path / "f32", dtype="float32", progress=False)
    assert store.num_docs == 7 and (tmp_path / "tok" / FOLDER / INDEX).is_file()
    # a dataset begun without states and finished with them keeps none (the early batches have none)

    def kill_after_batch_0(b: int) -> None:
        if b == 0:
            raise KilledError

    with pytest.raises(KilledError):
        regenerate(tiny_target, ps, tmp_path / "mixed", cfg, progress=False, on_batch_done=kill_after_batch_0)
    regenerate(tiny_target, ps, tmp_path / "mixed", cfg, progress=False, states=StateSpec("bfloat16", ()))
    assert not (tmp_path / "mixed" / FOLDER).exists()
    assert extract_features(tiny_target, tmp_path / "mixed", tmp_path / "fm", progress=False).num_docs == 7


def test_a_killed_regeneration_resumes_with_its_states(tiny_target: Target, tmp_path: Path) -> None:
    ps = load_prompts(source=str(write_prompt_file(tmp_path / "p.jsonl", 8)))
    cfg = RegenConfig(max_new_tokens=6, batch_size=3)
    spec = StateSpec("float32", ())

    def kill_after_batch_1(b: int) -> None:
        if b == 1:
            raise KilledError

    with pytest.raises(KilledError):
        regenerate(tiny_target, ps, tmp_path / "tok", cfg, progress=False, on_batch_done=kill_after_batch_1,
                   states=spec)
    regenerate(tiny_target, ps, tmp_path / "tok", cfg, progress=False, states=spec)
    regenerate(tiny_target, ps, tmp_path / "whole", cfg, progress=False, states=spec)
    extract_features(tiny_target, tmp_path / "tok", tmp_path / "f1", dtype="float32", progress=False)
    extract_features(tiny_target, tmp_path / "whole", tmp_path / "f2", dtype="float32", progress=False)
    a, b = _store_docs(tmp_path / "f1"), _store_docs(tmp_path / "f2")
    assert a.keys() == b.keys()
    for r in a:
        assert torch.equal(a[r].hidden, b[r].hidden)
